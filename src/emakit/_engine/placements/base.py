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
- attributes ``group`` (process group of the collectives, or None) and ``model_forward``
  (a forward on the average must run the model's own forward, because the model gathers its
  parameters in its forward pass: FSDP2, ZeRO-3).

One placement per module of this package; :func:`~emakit._engine.placements.choose` picks
the one for a model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..collectives import is_dtensor
from ..layout import Entry, align

__all__ = ["Key", "Slot", "Placement", "Whole", "whole"]

Key = tuple[torch.device, torch.dtype]


def whole(parts: Sequence[Tensor | None]) -> list[Tensor]:
    """``parts`` of a gather that every rank keeps (no ``rank0_only``): no None among them."""
    out = [p for p in parts if p is not None]
    if len(out) != len(parts):
        raise RuntimeError("a gather without rank0_only returned no tensor for a slot")
    return out


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
        return t.full_tensor() if is_dtensor(t) else t

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

    def part(self, s: Slot, attr: str = "avg", convert: bool = False) -> Tensor | None:
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
        return whole([self.part(s, attr, convert) for s in slots])

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        return [getattr(s, attr) for s in slots]

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        return value.full_tensor() if is_dtensor(value) else value

    def swap_pairs(self, slots: Sequence[Slot]) -> tuple[list[Tensor], list[Tensor]]:
        return [self.local(s.entry.tensor()) for s in slots], whole([s.avg for s in slots])

    def swap_scope(self, slots: Sequence[Slot]) -> contextlib.AbstractContextManager:
        """A context around a swap, for placements that must tidy up after the model's
        forward (ZeRO-3 releases the parameters it gathered with averaged values)."""
        return contextlib.nullcontext()


class Whole(Placement):
    """One process, or a replicated model (DDP) with a whole average on every rank: each
    slot keeps the whole tensor; nothing is communicated."""
