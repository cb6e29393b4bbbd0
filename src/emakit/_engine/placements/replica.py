"""ReplicaSlice: ``shard=True`` over a replicated (DDP) model, 1/world per rank."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..collectives import is_dtensor
from ..layout import align
from .base import Key, Placement, Slot, whole

__all__ = ["ReplicaSlice"]


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
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bounds: dict[Key, tuple[int, int, int, int]] = {}  # lo, hi, N, c

    def allocate(self, slots: Sequence[Slot]) -> dict[Key, Tensor]:
        totals: dict[Key, int] = {}
        for s in slots:
            if is_dtensor(s.entry.tensor()):
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
        full = whole(self.gather(slots, attr=attr))
        if convert:
            full = [
                f.to(device=s.entry.tensor().device, dtype=s.dtype)
                for s, f in zip(slots, full, strict=True)
            ]
        return full

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        value = super().scatter(slot, value)
        n = 0 if slot.avg is None else slot.avg.numel()
        return value.reshape(-1)[slot.start : slot.start + n]

    def swap_pairs(self, slots: Sequence[Slot]) -> tuple[list[Tensor], list[Tensor]]:
        return [s.entry.tensor() for s in slots], self.values(slots)
