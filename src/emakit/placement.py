"""Placement: where this rank's part of each stored tensor lives.

The store keeps the average of each stored tensor (a :class:`Slot`) as a view of one flat
buffer per storage (device, dtype). A placement decides which part of each tensor this rank
keeps, lays those parts out in the flats, and moves values between that local form and the
full tensors the outside world sees. The update itself never communicates: it runs on
``(slot.avg, slot.src)`` pairs, this rank's part of the average and the matching part of the
model's tensor, whatever the placement.

What a placement must provide (one small class each; a new parallelism scheme is a new
subclass, nothing else changes):

- ``local(t)``: the part of model tensor ``t`` that this rank holds and reads, as a plain
  tensor (a DTensor's local shard, a ZeRO-3 partition, or ``t`` itself). The staleness check
  watches its ``data_ptr``, and swaps write into it.
- ``shape(t)``: ``t``'s global shape (what checkpoints and exports use).
- ``full(t)``: the whole value of a model tensor the store does not keep (a live one),
  gathered where the model spreads it; exports read live tensors through it.
- ``allocate(slots)``: one flat per ``slot.key``; sets ``slot.avg`` to this rank's part of
  the average (a view of the flat; ``None`` when this rank keeps none of it), aligned to
  :data:`~emakit.layout.ALIGN` and in slot order, so that a model laid out by
  :func:`~emakit.flatten_parameters` tiles the average with the same relative offsets.
- ``bind(slot)``: sets ``slot.src``, the part of the model's current tensor that matches
  ``slot.avg`` (same shape), or raises a ValueError naming the tensor.
- ``values(slots)``: the averages in the model's own form, storage dtype: views (one
  process), DTensors over the local parts (FSDP2), full tensors (gathered). May communicate.
- ``gather(slots, rank0_only)``: full tensors (a collective where the parts are spread);
  with ``rank0_only`` other ranks get ``None`` and need not hold full tensors.
- ``scatter(slot, value)``: this rank's part of ``value`` (a full tensor or any DTensor),
  shaped like ``slot.avg``; no communication for a full tensor.
- ``swap_pairs(slots)``: the model tensors a swap writes and the values it writes there.
- optionally ``watch_local(slot)``: a C-level callable (``operator.attrgetter``) that the
  staleness check maps over the slot's model tensor to reach ``local(t)``, or None for the
  tensor itself (default: ``local``, a Python call per tensor).
- attributes ``group`` (process group of the collectives, or None), ``collective`` (whether
  ``values``/``gather``/``swap_pairs`` are collectives every rank must call) and
  ``model_forward`` (a forward on the average must run the model's own forward, because the
  model gathers its parameters in its forward pass: FSDP2, ZeRO-3).

:func:`choose` picks the placement for a model: :class:`ReplicaSlice` for ``shard=True``,
:class:`DTensorShard` when parameters are DTensors, else :class:`Whole`.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layout import Entry, align

try:  # public since torch 2.5; torch 2.4 has it under a private name
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    try:
        from torch.distributed._tensor import DTensor, distribute_tensor
    except ImportError:  # a torch built without distributed: no parameter is a DTensor

        class DTensor:  # type: ignore[no-redef]
            pass

        distribute_tensor = None  # type: ignore[assignment]

__all__ = [
    "Key",
    "Slot",
    "Placement",
    "Whole",
    "DTensorShard",
    "ReplicaSlice",
    "DTensor",
    "choose",
    "rank",
]

Key = tuple[torch.device, torch.dtype]
_LOCAL_TENSOR = operator.attrgetter("_local_tensor")  # a DTensor's local shard, C-level


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without an initialized process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


@dataclass(eq=False)
class Slot:
    """One stored tensor of the model, as this rank keeps it."""

    entry: Entry
    shape: torch.Size  # global shape of the model's tensor
    dtype: torch.dtype  # the model's dtype
    key: Key  # (device, dtype) of the flat that holds the average
    avg: Tensor | None = None  # this rank's part of the average (a view of the flat)
    src: Tensor | None = None  # the matching part of the model's tensor
    comp: Tensor | None = None  # compensation, laid out as ``avg`` in a second flat
    start: int = 0  # where ``avg`` starts in the tensor's flattened elements
    meta: Any = None  # the placement's own data (DTensor spec, virtual offset, ...)


class Placement:
    """Base class; see the module docstring for what a subclass provides."""

    group: Any = None
    collective: bool = False
    model_forward: bool = False

    def local(self, t: Tensor) -> Tensor:
        return t

    def watch_local(self, slot: Slot) -> Callable[[Tensor], Tensor] | None:
        """What the staleness check maps over the model's tensor of ``slot`` to reach the
        part whose ``data_ptr`` it compares (None: the tensor itself). Slots that share a
        callable are checked in one C-level ``map``: return a C-level callable
        (``operator.attrgetter``), one object for all slots, not a Python function."""
        return None if type(self).local is Placement.local else self.local

    def shape(self, t: Tensor) -> torch.Size:
        return t.shape

    def full(self, t: Tensor) -> Tensor:
        """The whole value of model tensor ``t`` (a live one: frozen, integer), gathered where
        the model spreads it (a collective then); exports read live tensors through it."""
        t = t.detach()
        return t.full_tensor() if isinstance(t, DTensor) else t

    def allocate(self, slots: Sequence[Slot]) -> dict[Key, Tensor]:
        """Default: every slot keeps its whole local part, aligned, in slot order."""
        sizes: dict[Key, int] = {}
        for s in slots:
            sizes[s.key] = sizes.get(s.key, 0) + align(self._local_numel(s))
        flats = {k: torch.zeros(n, device=k[0], dtype=k[1]) for k, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        for s in slots:
            local = self.local(s.entry.tensor())
            n = local.numel()
            start = offsets[s.key]
            s.avg = flats[s.key][start : start + n].view(local.shape)
            offsets[s.key] = start + align(n)
        return flats

    def _local_numel(self, s: Slot) -> int:
        return self.local(s.entry.tensor()).numel()

    def bind(self, slot: Slot) -> None:
        slot.src = self.local(slot.entry.tensor())

    def part(self, s: Slot, attr: str = "avg", convert: bool = False) -> Tensor:
        """``slot.avg`` (or ``slot.comp``), cast to the model's dtype and device with
        ``convert``."""
        t = getattr(s, attr)
        if convert:
            src = self.local(s.entry.tensor())
            if (t.device, t.dtype) != (src.device, s.dtype):
                t = t.to(device=src.device, dtype=s.dtype)
        return t

    def values(
        self, slots: Sequence[Slot], attr: str = "avg", convert: bool = False
    ) -> list[Tensor]:
        return [self.part(s, attr, convert) for s in slots]

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        return [getattr(s, attr) for s in slots]

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        return value.full_tensor() if isinstance(value, DTensor) else value

    def swap_pairs(self, slots: Sequence[Slot]) -> tuple[list[Tensor], list[Tensor]]:
        return [self.local(s.entry.tensor()) for s in slots], [s.avg for s in slots]

    def swap_scope(self, slots: Sequence[Slot]) -> contextlib.AbstractContextManager:
        """A context around a swap, for placements that must tidy up after the model's
        forward (ZeRO-3 releases the parameters it gathered with averaged values)."""
        return contextlib.nullcontext()


class Whole(Placement):
    """One process, or a replicated model (DDP) with a whole average on every rank: each
    slot keeps the whole tensor; nothing is communicated."""


class DTensorShard(Placement):
    """FSDP2 (``fully_shard``) and other DTensor parameters: each slot keeps the local shard,
    with the parameter's mesh, placements and global shape in ``slot.meta``, so the update
    runs on local shards with no communication (DTensor has no sharding rule for some foreach
    ops, ``_foreach_copy_`` among them). DTensors are rebuilt only at the edges: ``values``
    wraps the local parts, ``gather`` all-gathers them. Plain tensors in the same model are
    kept whole."""

    model_forward = True

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.collective = True

    def local(self, t: Tensor) -> Tensor:
        return t._local_tensor if isinstance(t, DTensor) else t

    def watch_local(self, slot: Slot) -> Callable[[Tensor], Tensor] | None:
        return _LOCAL_TENSOR if slot.meta is not None else None

    def allocate(self, slots: Sequence[Slot]) -> dict[Key, Tensor]:
        for s in slots:
            t = s.entry.tensor()
            s.meta = (
                (t.device_mesh, tuple(t.placements), t.shape, t.stride())
                if isinstance(t, DTensor)
                else None
            )
        return super().allocate(slots)

    def _wrap(self, s: Slot, local: Tensor) -> Tensor:
        if s.meta is None:
            return local
        mesh, placements, shape, stride = s.meta
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )

    def values(
        self, slots: Sequence[Slot], attr: str = "avg", convert: bool = False
    ) -> list[Tensor]:
        return [self._wrap(s, self.part(s, attr, convert)) for s in slots]

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for s in slots:
            t = self._wrap(s, getattr(s, attr))
            out.append(t.full_tensor() if isinstance(t, DTensor) else t)
        return out

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        if slot.meta is None:
            return super().scatter(slot, value)
        mesh, placements = slot.meta[0], slot.meta[1]
        if isinstance(value, DTensor):
            if value.device_mesh != mesh or tuple(value.placements) != tuple(placements):
                value = value.redistribute(mesh, placements)
            return value.to_local()
        return distribute_tensor(value, mesh, placements, src_data_rank=None).to_local()


class ReplicaSlice(Placement):
    """``shard=True`` over a replicated (DDP) model: per storage key, the stored tensors are
    laid end to end (each aligned to :data:`~emakit.layout.ALIGN`) in one virtual vector of
    ``N`` elements, and rank ``r`` of ``W`` keeps elements ``[r * c, min((r + 1) * c, N))``,
    ``c = align(ceil(N / W))``. Every rank holds the same parameters, so the elementwise
    update of a slice needs nothing from the others: memory per rank is about ``N / W``, and
    the slices are gathered (one collective per flat) only to evaluate, export or save.
    A slot's ``avg`` is the 1-D part of its tensor inside this rank's slice, ``src`` the
    matching 1-D slice of the model's (contiguous) tensor."""

    def __init__(self, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("shard=True needs an initialized torch.distributed process group")
        self.group = group
        self.collective = True
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bounds: dict[Key, tuple[int, int, int, int]] = {}  # lo, hi, N, c

    def allocate(self, slots: Sequence[Slot]) -> dict[Key, Tensor]:
        totals: dict[Key, int] = {}
        for s in slots:
            if isinstance(s.entry.tensor(), DTensor):
                raise ValueError(
                    "shard=True is for replicated (DDP) models; this model's parameters are "
                    "DTensors (FSDP2), whose average is already kept shard by shard: drop shard"
                )
            s.meta = totals.get(s.key, 0)  # offset in the virtual vector
            totals[s.key] = s.meta + align(math.prod(s.shape))
        self.bounds = {}
        flats: dict[Key, Tensor] = {}
        for key, n in totals.items():
            c = align(math.ceil(n / self.world))
            lo, hi = min(self.rank * c, n), min((self.rank + 1) * c, n)
            self.bounds[key] = (lo, hi, n, c)
            flats[key] = torch.zeros(hi - lo, device=key[0], dtype=key[1])
        for s in slots:
            lo, hi, _, _ = self.bounds[s.key]
            off, n = s.meta, math.prod(s.shape)
            a, b = max(lo, off), min(hi, off + n)
            s.start = max(a - off, 0)
            s.avg = flats[s.key][a - lo : b - lo] if a < b else None
        return flats

    def bind(self, slot: Slot) -> None:
        t = slot.entry.tensor()
        if slot.avg is None:
            slot.src = None
            return
        if not t.is_contiguous():
            raise ValueError(f"model: {slot.entry.name} is not contiguous; shard=True needs it")
        slot.src = t.detach().view(-1)[slot.start : slot.start + slot.avg.numel()]

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        """One ``all_gather`` (``gather`` to rank 0 with ``rank0_only``) per storage key of
        this rank's slice, rebuilt from the slots' parts (gaps are zero)."""
        slices: dict[Key, Tensor] = {}
        for s in slots:
            lo, hi, n, c = self.bounds[s.key]
            if s.key not in slices:
                slices[s.key] = torch.zeros(c, device=s.key[0], dtype=s.key[1])
            part = getattr(s, attr)
            if part is not None:
                a = s.meta + s.start - lo
                slices[s.key][a : a + part.numel()].copy_(part.reshape(-1))
        full: dict[Key, Tensor] = {}
        for key, padded in slices.items():
            n = self.bounds[key][2]
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            if rank0_only:
                dst = dist.get_global_rank(self.group, 0) if self.group is not None else 0
                dist.gather(padded, parts if self.rank == 0 else None, dst=dst, group=self.group)
                if self.rank != 0:
                    continue
            else:
                dist.all_gather(parts, padded, group=self.group)
            full[key] = torch.cat(parts)[:n]
        out: list[Tensor | None] = []
        for s in slots:
            f = full.get(s.key)
            n = math.prod(s.shape)
            out.append(None if f is None else f[s.meta : s.meta + n].view(s.shape))
        return out

    def values(
        self, slots: Sequence[Slot], attr: str = "avg", convert: bool = False
    ) -> list[Tensor]:
        full = self.gather(slots, attr=attr)
        if convert:
            full = [
                f.to(device=s.entry.tensor().device, dtype=s.dtype)
                for s, f in zip(slots, full, strict=True)
            ]
        return full  # type: ignore[return-value]

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        value = super().scatter(slot, value)
        n = 0 if slot.avg is None else slot.avg.numel()
        return value.reshape(-1)[slot.start : slot.start + n]

    def swap_pairs(self, slots: Sequence[Slot]) -> tuple[list[Tensor], list[Tensor]]:
        return [s.entry.tensor() for s in slots], self.values(slots)


def choose(model: nn.Module, shard: bool = False, group: Any = None) -> Placement:
    """The placement for ``model``: :class:`ReplicaSlice` with ``shard``,
    :class:`~emakit.zero.ZeroPartition` when DeepSpeed ZeRO-3 partitions the parameters,
    :class:`DTensorShard` when a parameter is a DTensor, else :class:`Whole`."""
    # FSDP1 (FullyShardedDataParallel): emakit.fsdp1.FlatShard --------------------------
    from .fsdp1 import FlatShard, uses_fsdp1

    if uses_fsdp1(model):
        if shard:
            raise ValueError(
                "shard=True is for replicated models; FSDP1 (FullyShardedDataParallel) shards "
                "this model's parameters, and their average is kept shard by shard already: "
                "drop shard"
            )
        return FlatShard(model, group)
    # ------------------------------------------------------------------------------------
    zero3 = any(getattr(p, "ds_tensor", None) is not None for p in model.parameters())
    if shard and zero3:
        raise ValueError(
            "shard=True is for replicated models; DeepSpeed ZeRO-3 partitions this model's "
            "parameters, and their average is kept partition by partition already: drop shard"
        )
    if shard:
        return ReplicaSlice(group)
    if zero3:
        from .zero import ZeroPartition  # DeepSpeed ZeRO-3 partitions

        return ZeroPartition(group)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return DTensorShard(group)
    return Whole()
