"""Placements: where this rank's part of each stored tensor lives (see :mod:`.base`), one
small class per parallelism scheme, and :func:`choose`, which picks one for a model."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..collectives import DTensor, is_zero3
from .base import Key, Placement, Slot, Whole
from .dtensor import DTensorShard
from .replica import ReplicaSlice
from .zero import ZeroPartition

__all__ = [
    "Key",
    "Slot",
    "Placement",
    "Whole",
    "DTensorShard",
    "ReplicaSlice",
    "ZeroPartition",
    "choose",
]


def choose(model: nn.Module, shard: bool = False, group: Any = None) -> Placement:
    """The placement for ``model``: :class:`ReplicaSlice` with ``shard``,
    :class:`ZeroPartition` when DeepSpeed ZeRO-3 partitions the parameters,
    :class:`DTensorShard` when a parameter is a DTensor, else :class:`Whole`."""
    zero3 = any(is_zero3(p) for p in model.parameters())
    if shard and zero3:
        raise ValueError(
            "shard=True is for replicated models; DeepSpeed ZeRO-3 partitions this model's "
            "parameters, and their average is kept partition by partition already: drop shard"
        )
    if shard:
        return ReplicaSlice(group)
    if zero3:
        return ZeroPartition(group)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return DTensorShard(group)
    return Whole()
