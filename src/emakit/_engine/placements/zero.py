"""DeepSpeed ZeRO-3: the average kept partition by partition, as the parameters are.

Under ZeRO stage 3 every parameter's ``.data`` is an empty placeholder outside the forward
pass; rank ``r`` of ``W`` (in ``param.ds_process_group``) keeps ``param.ds_tensor``, a 1-D
partition of ``c = ceil(N / W)`` elements of the flattened parameter: elements
``[r * c, min((r + 1) * c, N))``, the rest of the last partitions being padding that holds
whatever memory it was given. :class:`ZeroPartition` keeps the average the same way:

- **update** from this rank's partition, padding cut off, with no communication: memory per
  rank is about ``N / W`` elements of the average;
- **source**: the partition the forward pass uses (bf16 or fp16 under mixed precision),
  averaged into the storage dtype (fp32 by default);
- **export** all-gathers the partitions (padding never gathered into a value) into tensors
  of the parameter's shape (``param.ds_shape``); frozen parameters, not averaged, are
  gathered from the model with ``deepspeed.zero.GatheredParameters``;
- **swap** writes the averaged partition into ``ds_tensor``, so ZeRO-3's own gather in the
  forward pass computes with the average. A parameter that ZeRO-3 holds gathered already
  (persistent small parameters, and parameters an evaluation forward left gathered) gets
  the gathered average in ``.data`` too; after the swap, parameters that the forward left
  gathered are released, so training never computes with an averaged ``.data``.

Persistent parameters (``stage3_param_persistence_threshold``) are partitioned like the
others in ``ds_tensor`` (DeepSpeed updates that partition and re-gathers ``.data`` after each
step), so they are averaged the same way. Tensors that are not ZeRO-3 parameters (buffers)
are kept whole on every rank.

>>> from torch import nn
>>> from emakit._engine.collectives import is_zero3
>>> any(is_zero3(p) for p in nn.Linear(2, 2).parameters())
False
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..collectives import is_zero3
from .base import Placement, Slot, whole

__all__ = ["ZeroPartition"]

# The staleness check compares data_ptr: that of ds_tensor is that of the partition's view,
# and a C-level getter keeps the check one C-level map over the slots.
_DS_TENSOR = operator.attrgetter("ds_tensor")


@dataclass(frozen=True)
class _Part:
    """Where this rank's partition of one parameter sits in the flattened parameter."""

    group: Any  # the parameter's ds_process_group
    world: int
    size: int  # c: elements per partition, padding included
    start: int  # r * c
    numel: int  # the partition's elements that are the parameter's (0 to c)


def _part(t: Tensor) -> _Part:
    ds: Any = t  # DeepSpeed's attributes on a ZeRO-3 parameter
    group = ds.ds_process_group
    world = dist.get_world_size(group)
    size = ds.ds_tensor.numel()
    n = math.prod(ds.ds_shape)
    if size != math.ceil(n / world):
        raise ValueError(
            f"model: a ZeRO-3 partition of {size} elements for a parameter of {n} elements "
            f"over {world} ranks (expected {math.ceil(n / world)}); ZeRO++ hierarchical or "
            "quantized partitions are not supported"
        )
    start = dist.get_rank(group) * size
    return _Part(group, world, size, start, max(0, min(size, n - start)))


def _gathered(t: Tensor) -> bool:
    """Whether ZeRO-3 holds the full parameter in ``t.data`` now."""
    ds: Any = t
    return t.data.numel() == math.prod(ds.ds_shape) and t.data.numel() > 0


class ZeroPartition(Placement):
    """The placement of a model whose parameters DeepSpeed ZeRO-3 partitions; see the module
    docstring."""

    model_forward = True

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def local(self, t: Tensor) -> Tensor:
        if not is_zero3(t):
            return t
        ds: Any = t
        local: Tensor = ds.ds_tensor.narrow(0, 0, _part(t).numel)
        return local

    def watch_local(self, slot: Slot) -> Callable[[Tensor], Tensor] | None:
        return _DS_TENSOR if slot.meta is not None else None

    def shape(self, t: Tensor) -> torch.Size:
        ds: Any = t
        return torch.Size(ds.ds_shape) if is_zero3(t) else t.shape

    def allocate(self, slots: Sequence[Slot]) -> dict:
        for s in slots:
            t = s.entry.tensor()
            s.meta = _part(t) if is_zero3(t) else None
            if s.meta is not None:
                s.start = s.meta.start
        flats = super().allocate(slots)
        for s in slots:
            if s.meta is not None and s.meta.numel == 0:
                s.avg = None  # this rank's partition is padding only
        return flats

    def bind(self, slot: Slot) -> None:
        t = slot.entry.tensor()
        if slot.meta is None:
            slot.src = t
            return
        slot.src = None if slot.avg is None else self.local(t)

    # gathering ---------------------------------------------------------------------------

    def _gather_one(self, s: Slot, part: Tensor | None, rank0_only: bool) -> Tensor | None:
        """The full tensor from every rank's partition (``part``: this rank's, or None when
        it is padding only); None on ranks other than 0 with ``rank0_only``."""
        m: _Part = s.meta
        padded = torch.zeros(m.size, device=s.key[0], dtype=s.key[1])
        if part is not None:
            padded[: m.numel].copy_(part.reshape(-1))
        pieces = [torch.empty_like(padded) for _ in range(m.world)]
        if rank0_only:
            first = dist.get_global_rank(m.group, 0) if m.group is not None else 0
            mine = dist.get_rank(m.group) == 0
            dist.gather(padded, pieces if mine else None, dst=first, group=m.group)
            if not mine:
                return None
        else:
            dist.all_gather(pieces, padded, group=m.group)
        return torch.cat(pieces)[: math.prod(s.shape)].view(s.shape)

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        out = []
        for s in slots:
            part = getattr(s, attr)
            out.append(part if s.meta is None else self._gather_one(s, part, rank0_only))
        return out

    def values(
        self, slots: Sequence[Slot], attr: str = "avg", convert: bool = False
    ) -> list[Tensor]:
        full = whole(self.gather(slots, attr=attr))
        if convert:
            full = [f.to(dtype=s.dtype) for s, f in zip(slots, full, strict=True)]
        return full

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        value = super().scatter(slot, value)
        if slot.meta is None:
            return value
        n = 0 if slot.avg is None else slot.avg.numel()
        return value.reshape(-1)[slot.start : slot.start + n]

    @torch.no_grad()
    def full(self, t: Tensor) -> Tensor:
        """A model tensor that is not averaged (a frozen parameter), gathered: a collective."""
        if not is_zero3(t):
            return super().full(t)
        import deepspeed

        with deepspeed.zero.GatheredParameters([t]):
            return t.data.detach().clone()

    # swapping ----------------------------------------------------------------------------

    def swap_pairs(self, slots: Sequence[Slot]) -> tuple[list[Tensor], list[Tensor]]:
        """Targets: each partition (``ds_tensor``, padding cut off), plus the full ``.data``
        of parameters ZeRO-3 holds gathered now; values: the averaged partitions and the
        gathered averages (a collective)."""
        targets: list[Tensor] = []
        values: list[Tensor] = []
        zero = [s for s in slots if s.meta is not None]
        gathered = [s for s in zero if _gathered(s.entry.tensor())]
        fulls = whole(self.gather(gathered))
        for s in slots:
            t = s.entry.tensor()
            if s.avg is not None:
                targets.append(t if s.meta is None else self.local(t))
                values.append(s.avg)
        for s, f in zip(gathered, fulls, strict=True):
            targets.append(s.entry.tensor().data)
            values.append(f.view(s.entry.tensor().data.shape))
        return targets, values

    @contextlib.contextmanager
    def swap_scope(self, slots: Sequence[Slot]) -> Iterator[None]:
        """Around a swap: parameters that ZeRO-3 gathered inside the block (with averaged
        values) are released after it, so the next forward gathers the training values."""
        params = [s.entry.tensor() for s in slots if s.meta is not None]
        before = [_gathered(t) for t in params]
        try:
            yield
        finally:
            fresh = [t for t, was in zip(params, before, strict=True) if not was and _gathered(t)]
            if fresh:
                first: Any = fresh[0]
                first.partition(param_list=fresh, has_been_updated=False)
