"""Placements: where this rank's part of each stored tensor lives (see :mod:`.base`), one
small class per parallelism scheme, and :func:`choose`, which picks one for a model."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..collectives import is_dtensor, is_zero3
from ..flat_params import uses_fsdp1
from .base import Key, Placement, Slot, Whole
from .dtensor import DTensorShard
from .fsdp1 import FlatShard
from .replica import ReplicaSlice
from .zero import ZeroPartition

__all__ = [
    "Key",
    "Slot",
    "Placement",
    "Whole",
    "DTensorShard",
    "FlatShard",
    "ReplicaSlice",
    "ZeroPartition",
    "choose",
]


def choose(model: nn.Module, shard: bool = False, group: Any = None) -> Placement:
    """The placement for ``model``: :class:`FlatShard` for an FSDP1 model,
    :class:`ReplicaSlice` with ``shard``,
    :class:`ZeroPartition` when DeepSpeed ZeRO-3 partitions the parameters,
    :class:`DTensorShard` when a parameter is a DTensor, else :class:`Whole`."""
    if uses_fsdp1(model):
        if shard:
            raise ValueError(
                "shard=True is for replicated models; FSDP1 (FullyShardedDataParallel) shards "
                "this model's parameters, and their average is kept shard by shard already: "
                "drop shard"
            )
        return FlatShard(model, group)
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
    if any(is_dtensor(p) for p in model.parameters()):
        return DTensorShard(group)
    return Whole()
