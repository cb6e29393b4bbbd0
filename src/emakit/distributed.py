"""The average under ``torch.distributed``: DDP, the ``shard=True`` store, FSDP2 checkpoints.

- **FSDP2** (``fully_shard``): nothing here is needed for the update; :class:`~emakit.shadow.Shadow`
  keeps the local shard of each DTensor parameter and updates it with no communication.
- **DDP**: every rank holds the same parameters. By default every rank keeps the whole
  average (as Composer, Lightning and timm do). With ``EMA(..., shard=True)`` the average is a
  :class:`ShardedShadow`: the averaged tensors are laid end to end in one virtual flat vector
  of ``N`` elements per (device, dtype) and rank ``r`` of ``W`` keeps only elements
  ``[r * c, min((r + 1) * c, N))`` with ``c = ceil(N / W)`` (``torch.chunk``'s split). The
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

import contextlib
import hashlib
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .functional import (
    all_finite,
    check_same_names,
    copy_,
    lerp_,
    unwrap_model,
    values_swapped,
)
from .shadow import DTensor, _Entry, check_storage, classify

if TYPE_CHECKING:
    from .ema import EMA

__all__ = ["ShardedShadow", "process_group", "check_same_model", "all_ranks", "save", "load"]


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

    Under FSDP2 the group of a 1-D mesh (the default group for a larger mesh); with
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
    for p in unwrap_model(model).parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            return mesh.get_group() if mesh.ndim == 1 else dist.group.WORLD
    return dist.group.WORLD if shard else None


def _describe(model: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (name, tuple(t.shape), str(t.dtype))
        for name, t in model.state_dict(keep_vars=True).items()
        if isinstance(t, Tensor)
    ]


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


class ShardedShadow:
    """The average of a replicated (DDP) model, 1/world of it per rank.

    Same interface as :class:`~emakit.shadow.Shadow` (``update``, ``reset``, ``swapped``,
    ``export``, ``mapping``, ``tensors``, ``load``). Per (device, dtype) the stored tensors
    are laid end to end in a virtual vector of ``N`` elements; this rank keeps the slice
    ``[r * c, min((r + 1) * c, N))``, ``c = ceil(N / W)``, in ``self.flat``. ``update`` lerps
    the slice against the matching slice of the parameters (no communication, since every
    rank holds the same parameters); ``tensors``, ``export``, ``mapping`` and ``swapped``
    gather the slices first (a collective: every rank must call them).

    Args:
        model: the training model (a DDP wrapper is seen through).
        dtype, device, buffers: as for :class:`~emakit.shadow.Shadow`.
        group: the process group over which the average is split (default: the world).
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        buffers: str = "average",
        group: Any = None,
    ) -> None:
        self.dtype, self.device, self.buffers = check_storage(dtype, device, buffers)
        if not _initialized():
            raise ValueError("shard=True needs an initialized torch.distributed process group")
        self.model = unwrap_model(model)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.entries = classify(self.model, buffers)
        if any(e.spec is not None for e in self.entries):
            raise ValueError(
                "shard=True is for replicated (DDP) models; this model's parameters are "
                "DTensors (FSDP2), whose average is already kept shard by shard: drop shard"
            )
        self.stored = [e for e in self.entries if e.kind != "live"]
        for e in self.stored:
            if not e.source().is_contiguous():
                raise ValueError(f"model: {e.names[0]} is not contiguous; shard=True needs it")

        # layout: entry -> (key, offset in the virtual vector)
        self._where: dict[int, tuple[tuple[torch.device, torch.dtype], int]] = {}
        totals: dict[tuple[torch.device, torch.dtype], int] = {}
        for e in self.stored:
            src = e.source()
            key = (self.device or src.device, self.dtype or src.dtype)
            self._where[id(e)] = (key, totals.get(key, 0))
            totals[key] = totals.get(key, 0) + src.numel()
        self._bounds: dict[tuple[torch.device, torch.dtype], tuple[int, int, int, int]] = {}
        self.flat: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        for key, n in totals.items():
            c = math.ceil(n / self.world)
            lo, hi = min(self.rank * c, n), min((self.rank + 1) * c, n)
            self._bounds[key] = (lo, hi, n, c)
            self.flat[key] = torch.empty(hi - lo, device=key[0], dtype=key[1])
        self._plan()
        self.reset()

    # construction ------------------------------------------------------------------------

    def _pieces(self) -> Iterator[tuple[_Entry, Tensor, Tensor, int]]:
        """(entry, slice of this rank's flat, matching slice of the entry's flattened source,
        where that slice starts in the entry) for every entry that overlaps this rank's
        slice."""
        for e in self.stored:
            key, off = self._where[id(e)]
            lo, hi, _, _ = self._bounds[key]
            n = e.source().numel()
            a, b = max(lo, off), min(hi, off + n)
            if a < b:
                src = e.source().detach().view(-1)[a - off : b - off]
                yield e, self.flat[key][a - lo : b - lo], src, a - off

    def _plan(self) -> None:
        self._avg: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._copy: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._all: tuple[list[Tensor], list[Tensor]] = ([], [])
        for e, dst, src, _ in self._pieces():
            lists = self._avg if e.kind == "average" else self._copy
            for pair in (lists, self._all):
                pair[0].append(dst)
                pair[1].append(src)
        self._ptrs = [(e, e.source().data_ptr()) for e in self.stored]

    def _refresh(self) -> None:
        """Rebuild the slices if a tensor was replaced (``module.to()``, ``.data = ...``)."""
        for e, ptr in self._ptrs:
            if e.source().data_ptr() != ptr:
                self._plan()
                return

    # the update --------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, weight: float) -> None:
        """On this rank's slice, ``stored <- stored + weight * (source - stored)``; ``copy``
        entries take the source. No communication."""
        self._refresh()
        lerp_(self._avg[0], self._avg[1], weight)
        copy_(self._copy[0], self._copy[1])

    @torch.no_grad()
    def reset(self) -> None:
        """Set this rank's slice to the model's current values."""
        self._refresh()
        copy_(self._all[0], self._all[1])

    def sources_finite(self) -> bool:
        """Whether the model's averaged tensors are finite on this rank's slice (combine the
        ranks' answers with :func:`all_ranks`)."""
        self._refresh()
        return all_finite([s for e, _, s, _ in self._pieces() if e.kind == "average"])

    # gathering ---------------------------------------------------------------------------

    @torch.no_grad()
    def _gathered(self, rank0_only: bool = False) -> dict[int, Tensor]:
        """Entry id -> the full averaged tensor (storage dtype), gathered from all ranks (a
        collective). ``rank0_only``: one ``gather`` to the group's rank 0; the others get {}
        and never hold more than their slice."""
        full: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        for key, flat in self.flat.items():
            lo, hi, n, c = self._bounds[key]
            padded = torch.zeros(c, device=flat.device, dtype=flat.dtype)
            padded[: hi - lo].copy_(flat)
            if rank0_only:
                parts = [torch.empty_like(padded) for _ in range(self.world)]
                dst = dist.get_global_rank(self.group, 0) if self.group is not None else 0
                dist.gather(padded, parts if self.rank == 0 else None, dst=dst, group=self.group)
                if self.rank != 0:
                    continue
            else:
                parts = [torch.empty_like(padded) for _ in range(self.world)]
                dist.all_gather(parts, padded, group=self.group)
            full[key] = torch.cat(parts)[:n]
        out: dict[int, Tensor] = {}
        for e in self.stored:
            key, off = self._where[id(e)]
            if key in full:
                src = e.source()
                out[id(e)] = full[key][off : off + src.numel()].view(src.shape)
        return out

    def tensors(self) -> dict[str, Tensor]:
        """Stored tensors by canonical name, gathered (full tensors, storage dtype)."""
        full = self._gathered()
        return {e.names[0]: full[id(e)] for e in self.stored}

    def check_load(self, tensors: Mapping[str, Tensor], what: str = "state_dict") -> None:
        """Raise what :meth:`load` would for ``tensors``, changing nothing."""
        check_same_names(
            {e.names[0]: e.source().shape for e in self.stored},
            {n: t.shape for n, t in tensors.items()},
            what,
        )

    @torch.no_grad()
    def load(self, tensors: Mapping[str, Tensor], what: str = "state_dict") -> None:
        """Take this rank's slice of full tensors (as from ``tensors()``), after checking
        names and shapes."""
        self.check_load(tensors, what)
        self._refresh()
        dst, src = [], []
        for e, d, _, start in self._pieces():
            value = tensors[e.names[0]]
            if isinstance(value, DTensor):
                value = value.full_tensor()
            dst.append(d)
            src.append(value.reshape(-1)[start : start + d.numel()])
        copy_(dst, src)

    @torch.no_grad()
    def synchronize(self) -> None:
        """Nothing to join: updates of the slice run on the training stream."""

    def export(self, started: bool = True, rank0_only: bool = False) -> OrderedDict[str, Tensor]:
        """A plain state dict of the averaged model (gathered; a collective). ``rank0_only``:
        only rank 0 keeps the tensors, on the CPU; other ranks get an empty dict."""
        full = self._gathered(rank0_only) if started else {}
        if rank0_only and self.rank != 0:
            return OrderedDict()
        by_name = {n: e for e in self.stored for n in e.names}
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, tensor in self.model.state_dict().items():
            e = by_name.get(name)
            if e is not None and started:
                value = full[id(e)].to(dtype=e.source().dtype, copy=True)
            else:
                value = tensor.detach().clone()
            out[name] = value.cpu() if rank0_only else value
        return out

    def mapping(self, started: bool = True) -> dict[str, Tensor]:
        """Name -> tensor for ``torch.func.functional_call`` (gathered: a collective)."""
        full = self._gathered() if started else {}
        result: dict[str, Tensor] = {}
        for e in self.entries:
            src = e.source()
            t = full.get(id(e))
            if t is None:
                t = src.detach()
            elif (t.device, t.dtype) != (src.device, src.dtype):
                t = t.to(device=src.device, dtype=src.dtype)
            for name in e.names:
                result[name] = t
        return result

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Averaged values (gathered) in the model's tensors inside the block; the training
        values are restored bitwise after it, also when it raises."""
        full = self._gathered()
        sources = [e.source() for e in self.stored]
        with values_swapped(sources, [full.pop(id(e)) for e in self.stored]):
            yield

    def state_nbytes(self) -> int:
        """Bytes of the average held on this rank (its slices)."""
        return sum(f.numel() * f.element_size() for f in self.flat.values())


# checkpoints with torch.distributed.checkpoint ------------------------------------------


def save(ema: EMA, checkpoint_id: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``ema.state_dict()`` with ``torch.distributed.checkpoint`` (a collective: every
    rank calls it). Under FSDP2 each rank writes its shards; the folder loads on any number
    of ranks (see :func:`load`), or in one process without a process group. A checkpoint
    already in the folder is a FileExistsError (on every rank) unless ``overwrite=True``; the
    folder's metadata is written last (temporary name, then rename), so a crash leaves no
    loadable half."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(checkpoint_id)
    exists = os.path.exists(os.path.join(path, ".metadata"))
    if _initialized():  # a rank that sees it tells the others: all raise, none hangs
        exists = not all_ranks(not exists)
    if exists and not overwrite:
        raise FileExistsError(
            f"checkpoint_id: {path!r} already holds a checkpoint; pass overwrite=True to "
            "replace it, or save to a new folder"
        )
    writer = dcp.FileSystemWriter(path, overwrite=overwrite)
    dcp.save({"ema": ema.state_dict()}, storage_writer=writer)


def load(ema: EMA, checkpoint_id: str | os.PathLike) -> None:
    """Read what :func:`save` wrote into ``ema`` (resharded to this run's ranks)."""
    import torch.distributed.checkpoint as dcp

    state = {"ema": ema.state_dict()}
    dcp.load(state, checkpoint_id=os.fspath(checkpoint_id))
    ema.load_state_dict(state["ema"])
