"""Ranks, process groups and the checks that need them.

- :func:`process_group`: the group an average's collectives run over (FSDP2's mesh, ZeRO-3's
  partition group, DDP's group with ``shard=True``), or None when it needs none.
- :func:`check_same_model`: every rank built its average over the same model, or every rank
  gets a ValueError naming the rank that differs (instead of a hang in a later collective).
- :func:`all_ranks`: a flag that holds on every rank (one all-reduce of one element).
- the DTensor names (public since torch 2.5, private before) and :func:`is_zero3`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .flat_params import fsdp1_group, named_state
from .tensors import check_same_names, distribute_tensor, is_dtensor, unwrap_model

__all__ = [
    "is_dtensor",
    "distribute_tensor",
    "initialized",
    "rank",
    "is_zero3",
    "process_group",
    "check_same_model",
    "all_ranks",
]


def initialized() -> bool:
    """Whether a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without an initialized process group)."""
    return dist.get_rank(group) if initialized() else 0


def is_zero3(t: Tensor) -> bool:
    """Whether ``t`` is a DeepSpeed ZeRO-3 parameter (it carries its partition in
    ``ds_tensor`` and its full shape in ``ds_shape``)."""
    return getattr(t, "ds_tensor", None) is not None and hasattr(t, "ds_shape")


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    current: Any = model
    while isinstance(current, nn.Module):
        if isinstance(current, nn.parallel.DistributedDataParallel):
            return current
        current = getattr(current, "_orig_mod", None)
    return None


def process_group(model: nn.Module, shard: bool = False) -> Any:
    """The process group the average's collectives run over, or ``None`` when it needs none.

    Under FSDP2 the group of a 1-D mesh (the default group for a larger mesh); under
    DeepSpeed ZeRO-3 the parameters' partition group (``ds_process_group``); with
    ``shard=True`` DDP's own group, or the default group; under FSDP1 the units' group. A
    DDP model without ``shard`` needs none: every rank keeps the whole average and nothing
    is communicated (DDP itself checks the ranks' shapes when it wraps the model), so an
    EMA built on rank 0 alone works.
    ``shard=True`` without an initialized process group is a ValueError.
    """
    if shard and not initialized():
        raise ValueError(
            "shard=True keeps 1/world of the average on each rank, so it needs an initialized "
            "torch.distributed process group: call torch.distributed.init_process_group() first"
        )
    ddp = _ddp(model)
    if ddp is not None:
        return ddp.process_group if shard else None
    fsdp1 = fsdp1_group(unwrap_model(model))  # refuses what cannot be averaged, naming it
    if fsdp1 is not None:
        return fsdp1
    for p in unwrap_model(model).parameters():
        if is_dtensor(p):
            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
        if is_zero3(p):
            return getattr(p, "ds_process_group")  # noqa: B009 - DeepSpeed's attribute
    return dist.group.WORLD if shard else None


def _describe(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    # global shapes, without FSDP1's gathering state_dict()
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
    """Whether ``flag`` holds on every rank of ``group`` (one all-reduce of one element);
    ``flag`` itself without an initialized process group."""
    if not initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item() > 0.5)


def _collective_device(group: Any = None) -> torch.device:
    backend = dist.get_backend(group)
    if "nccl" in str(backend) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
