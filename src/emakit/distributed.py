"""The average under ``torch.distributed``, and its sharded checkpoints.

- **FSDP2** (``fully_shard``): the average of each DTensor parameter is kept as its local
  shard and updated with no communication.
- **DDP**: every rank holds the same parameters. By default every rank keeps the whole
  average (as Composer, Lightning and timm do). With ``EMA(..., shard=True)`` the averaged
  tensors are laid end to end (aligned) in one virtual flat vector of ``N`` elements per
  (device, dtype) and rank ``r`` of ``W`` keeps only elements ``[r * c, min((r + 1) * c,
  N))`` with ``c = ceil(N / W)`` rounded up to 16 elements; it gets the fast paths of every
  other placement. The elementwise update ``avg <- s * avg + (1 - s) * param`` needs nothing
  from other ranks, so an update is communication-free and memory per rank is ``N / W``
  elements. The slices are gathered (one ``all_gather`` per flat vector) only to evaluate,
  export or checkpoint.
- **DeepSpeed ZeRO-3**: the average is kept partition by partition, as the parameters are.
- Checks: under FSDP2 or with ``shard=True``, a rank that builds its EMA over a different
  model (names, shapes or dtypes) gets a ValueError naming the rank, on every rank, instead
  of a hang in a later collective.
- Checkpoints: :func:`save` and :func:`load` write and read ``EMA.state_dict()`` with
  ``torch.distributed.checkpoint`` (sharded under FSDP2; reloadable on any number of ranks).
"""

from __future__ import annotations

from .checkpoint import load, save

__all__ = ["save", "load"]
