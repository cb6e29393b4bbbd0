"""DTensorShard: FSDP2 (``fully_shard``) and other DTensor parameters, shard by shard."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from ..collectives import distribute_tensor, is_dtensor
from .base import Key, Placement, Slot, whole

__all__ = ["DTensorShard"]

_LOCAL_TENSOR = operator.attrgetter("_local_tensor")  # a DTensor's local shard, C-level


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

    def local(self, t: Tensor) -> Tensor:
        return t._local_tensor if is_dtensor(t) else t

    def watch_local(self, slot: Slot) -> Callable[[Tensor], Tensor] | None:
        return _LOCAL_TENSOR if slot.meta is not None else None

    def allocate(self, slots: Sequence[Slot]) -> dict[Key, Tensor]:
        for s in slots:
            t = s.entry.tensor()
            s.meta = (
                (t.device_mesh, tuple(t.placements), t.shape, t.stride())
                if is_dtensor(t)
                else None
            )
        return super().allocate(slots)

    def _wrap(self, s: Slot, local: Tensor) -> Tensor:
        if s.meta is None:
            return local
        from torch.distributed.tensor import DTensor  # loaded: the slot's tensor was one

        mesh, placements, shape, stride = s.meta
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )

    def values(
        self, slots: Sequence[Slot], attr: str = "avg", convert: bool = False
    ) -> list[Tensor]:
        parts = whole([self.part(s, attr, convert) for s in slots])
        return [self._wrap(s, p) for s, p in zip(slots, parts, strict=True)]

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for s in slots:
            t = self._wrap(s, getattr(s, attr))
            out.append(t.full_tensor() if is_dtensor(t) else t)
        return out

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        if slot.meta is None:
            return super().scatter(slot, value)
        mesh, placements = slot.meta[0], slot.meta[1]
        if is_dtensor(value):
            if value.device_mesh != mesh or tuple(value.placements) != tuple(placements):
                value = value.redistribute(mesh, placements)
            return value.to_local()
        return distribute_tensor(value, mesh, placements, src_data_rank=None).to_local()
