"""The average under ``torch.distributed``: process groups, the every-rank model check, and
the entry points of sharded checkpoints (implemented in :mod:`emakit.checkpoint`).

- **FSDP2** (``fully_shard``): nothing here is needed for the update; the store
  (:class:`~emakit.placement.DTensorShard`) keeps the local shard of each DTensor parameter
  and updates it with no communication.
- **DDP**: every rank holds the same parameters. By default every rank keeps the whole
  average (as Composer, Lightning and timm do). With ``EMA(..., shard=True)`` the average is
  placed by :class:`~emakit.placement.ReplicaSlice`: the averaged tensors are laid end to
  end (aligned) in one virtual flat vector of ``N`` elements per (device, dtype) and rank
  ``r`` of ``W`` keeps only elements ``[r * c, min((r + 1) * c, N))`` with
  ``c = align(ceil(N / W))``; it gets the fast paths of every other placement. The
  elementwise update ``avg <- s * avg + (1 - s) * param`` needs nothing from other ranks, so
  an update is communication-free and memory per rank is ``N / W`` elements. The slices are
  gathered (one ``all_gather`` per flat vector) only to evaluate, export or checkpoint.
- Checks: under FSDP2 or with ``shard=True``, a rank that builds its EMA over a different
  model (names, shapes or dtypes) gets a ValueError naming the rank, on every rank, instead
  of a hang in a later collective.
- Checkpoints: :func:`save` and :func:`load` write and read ``EMA.state_dict()`` with
  ``torch.distributed.checkpoint`` (sharded under FSDP2; reloadable on any number of ranks).
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from .functional import check_same_names, unwrap_model
from .placement import DTensor

if TYPE_CHECKING:
    from .ema import EMA

__all__ = ["process_group", "check_same_model", "all_ranks", "save", "load"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    while isinstance(model, nn.Module):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)
        model = inner if isinstance(inner, nn.Module) else None
    return None


def process_group(model: nn.Module, shard: bool = False) -> Any:
    """The process group the EMA's collectives run over, or ``None`` when it needs none.

    Under FSDP2 the group of a 1-D mesh (the default group for a larger mesh); under
    DeepSpeed ZeRO-3 the parameters' partition group (``ds_process_group``); with
    ``shard=True`` DDP's own group, or the default group. A DDP model without ``shard`` needs
    none: every rank keeps the whole average and nothing is communicated (DDP itself checks
    the ranks' shapes when it wraps the model), so an EMA built on rank 0 alone works.
    ``shard=True`` without an initialized process group is a ValueError.
    """
    if shard and not _initialized():
        raise ValueError(
            "shard=True keeps 1/world of the average on each rank, so it needs an initialized "
            "torch.distributed process group: call torch.distributed.init_process_group() first"
        )
    ddp = _ddp(model)
    if ddp is not None:
        return ddp.process_group if shard else None
    from .fsdp1 import fsdp1_group  # FSDP1: the units' process group

    fsdp1 = fsdp1_group(unwrap_model(model))
    if fsdp1 is not None:
        return fsdp1
    for p in unwrap_model(model).parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
        if getattr(p, "ds_tensor", None) is not None:  # DeepSpeed ZeRO-3 partitions
            return p.ds_process_group
    return dist.group.WORLD if shard else None


def _describe(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    from .fsdp1 import named_state  # FSDP1: global shapes, without its gathering state_dict

    return [(name, tuple(t.shape), str(t.dtype)) for name, t in named_state(model)]


def check_same_model(model: nn.Module, group: Any = None) -> None:
    """Raise a ValueError on every rank of ``group`` when ranks hold different models.

    A collective (two ``all_gather_object`` calls at most): every rank of the group must call
    it. Compares names, global shapes and dtypes of the state dict; the message names the
    first rank that differs from rank 0 and what differs.
    """
    desc = _describe(unwrap_model(model))
    digest = hashlib.sha256(repr(desc).encode()).hexdigest()
    world = dist.get_world_size(group)
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if all(d == digests[0] for d in digests):
        return
    descs: list[Any] = [None] * world
    dist.all_gather_object(descs, desc, group=group)
    bad = next(r for r, d in enumerate(digests) if d != digests[0])
    ref = {n: s for n, s, _ in descs[0]}
    got = {n: s for n, s, _ in descs[bad]}
    try:
        check_same_names(ref, got, "rank")
    except ValueError as err:
        what = str(err).split(": ", 1)[1]
        raise ValueError(
            f"model: rank {bad} passed a different model than rank 0 ({what}, as rank {bad} "
            "sees it); every rank must build its EMA over the same model"
        ) from None
    pairs = zip(descs[0], descs[bad], strict=True)
    dtypes = [f"{n}: {a} vs {b}" for (n, _, a), (_, _, b) in pairs if a != b]
    raise ValueError(
        f"model: rank {bad} passed a different model than rank 0 (dtypes "
        f"[{'; '.join(dtypes)}]); every rank must build its EMA over the same model"
    )


def all_ranks(flag: bool, group: Any = None) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (one all-reduce of one element)."""
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item() > 0.5)


def _collective_device(group: Any = None) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# checkpoints: emakit.checkpoint (kept importable from here) ---------------------------


def save(ema: EMA, checkpoint_id: str | os.PathLike, overwrite: bool = False) -> None:
    """Same as :func:`emakit.checkpoint.save`."""
    from .checkpoint import save as _save

    _save(ema, checkpoint_id, overwrite=overwrite)


def load(ema: EMA, checkpoint_id: str | os.PathLike) -> None:
    """Same as :func:`emakit.checkpoint.load` (never unpickles code)."""
    from .checkpoint import load as _load

    _load(ema, checkpoint_id)
