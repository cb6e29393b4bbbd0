"""PyTorch's first FSDP (``FullyShardedDataParallel``): the average kept flat shard by flat shard.

FSDP1 flattens the parameters of each unit (each ``FullyShardedDataParallel`` module:
the root, and the nested units of an ``auto_wrap_policy`` or of nested ``FSDP(...)`` calls)
into one ``FlatParameter``, pads it to a multiple of the world size ``W`` and keeps on rank
``r`` the elements ``[r * S, (r + 1) * S)`` of the padded flat vector, ``S`` being the
padded shard size. Each original parameter is a run of that vector (after FSDP's own
alignment padding under ``use_orig_params=True``), so rank ``r`` holds a 1-D piece of some
of them: ``flat_param._shard_param_infos`` says which (offset in the shard, length, and
where the piece starts in the flattened parameter). :class:`FlatShard` keeps the average
the same way:

- **What is averaged.** The sharded, full-precision flat parameter ``flat_param._local_shard``:
  the tensor the optimizer steps (through the ``FlatParameter`` with ``use_orig_params=False``,
  through the original parameters, views into it, with ``use_orig_params=True``). Under
  ``MixedPrecision(param_dtype=torch.bfloat16)`` FSDP casts that shard to a low-precision
  copy (``_mp_shard``) before each all-gather and frees it after; averaging that copy would
  average weights rounded to 8 bits of mantissa, and miss every optimizer update smaller
  than their rounding step, so the full-precision shard is averaged. Between optimizer
  steps FSDP points ``flat_param.data`` at the unsharded (and, under mixed precision,
  low-precision) storage around each forward and backward pass; the average never reads
  ``flat_param.data`` once ``_local_shard`` exists, so an update, an export or an EMA built
  inside a forward pass reads the sharded values.
- **Memory.** One piece per averaged parameter held by this rank, laid out as in the
  local shard (same relative offsets: the update is one lerp per unit): about ``N / W``
  elements per rank, ``2 N / W`` with the compensation (``compensated=True``, the default).
  Buffers (not sharded by FSDP) are kept whole on every rank.
- **Update**: on ``(piece of the average, piece of the local shard)`` pairs, no communication.
- **Export** (``ema_state_dict``, ``state_dict``, snapshots): one all-gather per unit of the
  pieces the export needs (a gather to rank 0 with ``rank0_only``), into tensors of the
  original parameters' shapes, under the names of FSDP's own full state dict (no
  ``_fsdp_wrapped_module.``, no ``_flat_param``). Frozen parameters (not averaged) are
  gathered from the local shards the same way.
- **Swap** (``swapped()``, ``ema.module``, ``copy_to()``) writes the averaged pieces into the
  local shards, so FSDP's own all-gather in the next forward computes with the average; no
  communication. FSDP keeps some units' unsharded parameters allocated after a forward pass
  (the root under ``FULL_SHARD``, every unit under ``SHARD_GRAD_OP``) and reuses them in the
  next forward or backward without gathering again; before and after a swap those copies
  are freed (as FSDP frees them after a backward pass), so a forward with the average never
  reuses training values, and the backward pass after a teacher forward (DINO, BYOL)
  gathers the training values again.

Supported: ``FULL_SHARD``, ``SHARD_GRAD_OP`` and ``NO_SHARD``; ``use_orig_params`` True or
False; nested units; ``MixedPrecision``; activation-checkpointing wrappers. Refused at
construction with a ValueError naming the parameter: hybrid strategies (``HYBRID_SHARD``,
``_HYBRID_SHARD_ZERO2``), ``CPUOffload(offload_params=True)``, tensor-parallel flat
parameters (an FSDP extension), units on different process groups, and a model that is
part of an FSDP unit it does not contain (pass the ``FullyShardedDataParallel`` module
itself, not the module it wraps).

>>> from torch import nn
>>> from emakit._engine.placements import choose
>>> type(choose(nn.Linear(2, 2))).__name__  # FlatShard only for an FSDP1 model
'Whole'
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..flat_params import FlatView, fsdp1_group, unit_name
from ..layout import align
from .base import Key, Placement, Slot, whole

__all__ = ["FlatShard"]

# The watch reads each unit's FlatParameter (``handle.flat_param``, C-level) and maps this
# over it: the sharded full-precision storage, whatever flat_param.data points at now.
_LOCAL_SHARD = operator.attrgetter("_local_shard")


@dataclass(frozen=True)
class _Run:
    """Elements ``[lo, hi)`` of a unit's unsharded flat vector, as its ranks' shards split
    them: rank ``q`` holds ``[q * S, (q + 1) * S)`` (every rank all of it under NO_SHARD)."""

    lo: int
    hi: int
    unit: FlatView  # any view of the unit: its shard size, world and strategy

    def span(self, q: int) -> tuple[int, int]:
        if not self.unit.sharded:
            return self.lo, self.hi
        size = self.unit.shard_numel
        return max(self.lo, q * size), min(self.hi, (q + 1) * size)

    def longest(self) -> int:
        return max(max(0, b - a) for a, b in map(self.span, range(self.unit.world)))

    def assemble(self, pieces: list[Tensor]) -> Tensor:
        """The run from each rank's piece (``pieces[q]`` starts at ``span(q)[0]``)."""
        full = pieces[0].new_empty(self.hi - self.lo)
        for q, piece in enumerate(pieces):
            a, b = self.span(q)
            if b > a:
                full[a - self.lo : b - self.lo].copy_(piece[: b - a])
        return full


class FlatShard(Placement):
    """The placement of a model trained with FSDP1; see the module docstring. Slots of
    flattened parameters carry their :class:`FlatView` in ``slot.meta`` (None for buffers
    and parameters FSDP does not manage, kept whole)."""

    model_forward = True

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        own = fsdp1_group(model)  # refuses what cannot be averaged exactly, naming it
        self.group = own if own is not None else group
        fsdp = torch.distributed.fsdp.FullyShardedDataParallel
        self.handles = [u._handle for u in model.modules()
                        if isinstance(u, fsdp) and u._handle is not None]

    # local parts --------------------------------------------------------------------------

    def local(self, t: Tensor) -> Tensor:
        return t.piece() if isinstance(t, FlatView) else t

    def watch_local(self, slot: Slot) -> Callable[[Tensor], Tensor] | None:
        if slot.meta is None:
            return None
        # Before FSDP's lazy initialization the flat parameter is its shard: watch it itself
        # (its storage becomes _local_shard, so the plan stays valid after the initialization).
        return _LOCAL_SHARD if "_local_shard" in slot.meta.flat.__dict__ else None

    def allocate(self, slots: Sequence[Slot]) -> dict[Key, Tensor]:
        """Per storage key: for each flat parameter, the span of its local shard that this
        rank's averaged pieces cover, with their offsets in the shard (so one lerp updates a
        unit), then the whole tensors; each region aligned."""
        regions: dict[tuple[Key, int], list[int]] = {}  # -> [lo, hi, base]
        sizes: dict[Key, int] = {}
        for s in slots:
            t = s.entry.tensor()
            s.meta = t if isinstance(t, FlatView) else None
            if s.meta is not None and s.meta.offset >= 0:
                s.start = s.meta.first
                r = regions.setdefault((s.key, id(s.meta.flat)), [s.meta.offset, 0, 0])
                r[0] = min(r[0], s.meta.offset)
                r[1] = max(r[1], s.meta.offset + s.meta.count)
        for (key, _), r in regions.items():
            r[2] = sizes.get(key, 0)
            sizes[key] = r[2] + align(r[1] - r[0])
        whole: dict[int, int] = {}
        for s in slots:
            if s.meta is None:
                whole[id(s)] = sizes.get(s.key, 0)
                sizes[s.key] = whole[id(s)] + align(s.entry.tensor().numel())
        flats = {k: torch.zeros(n, device=k[0], dtype=k[1]) for k, n in sizes.items()}
        for s in slots:
            if s.meta is None:
                t = s.entry.tensor()
                s.avg = flats[s.key][whole[id(s)] : whole[id(s)] + t.numel()].view(t.shape)
            elif s.meta.offset < 0:
                s.avg = None  # this rank's shard holds none of the parameter
            else:
                lo, _, base = regions[(s.key, id(s.meta.flat))]
                at = base + s.meta.offset - lo
                s.avg = flats[s.key][at : at + s.meta.count]
        return flats

    def bind(self, slot: Slot) -> None:
        if slot.meta is None:
            slot.src = slot.entry.tensor()
        else:
            slot.src = None if slot.avg is None else slot.meta.piece()

    # gathering ----------------------------------------------------------------------------

    def _gather_views(
        self, parts: list[tuple[FlatView, Tensor | None]], rank0_only: bool
    ) -> list[Tensor | None]:
        """The whole parameters of ``parts`` (views of one flat parameter, each with this
        rank's piece or None) from every rank's pieces: one all-gather (a gather to rank 0
        with ``rank0_only``: None elsewhere) of the range of the flat vector they span."""
        v0 = parts[0][0]
        run = _Run(min(v.begin for v, _ in parts), max(v.begin + v.numel for v, _ in parts), v0)
        dtype = next((p.dtype for _, p in parts if p is not None), None) or v0.dtype
        device = v0.flat.device  # collectives run on the compute device (NCCL: CUDA)
        mine = run.span(v0.rank)
        buf = torch.zeros(run.longest(), dtype=dtype, device=device)
        for v, p in parts:
            if p is not None and p.numel():
                at = v.begin + v.first - mine[0]
                buf[at : at + p.numel()].copy_(p.reshape(-1))
        pieces = self._collect(buf, v0, rank0_only)
        if pieces is None:
            return [None] * len(parts)
        full = run.assemble(pieces)
        out: list[Tensor | None] = []
        for v, p in parts:
            flat = full[v.begin - run.lo : v.begin - run.lo + v.numel]
            value = flat.view(v.shape) if v.contiguous else flat.clone().as_strided(
                v.shape, v.stride)
            out.append(value if p is None else value.to(p.device))
        return out

    def _collect(self, buf: Tensor, v0: FlatView, rank0_only: bool) -> list[Tensor] | None:
        """Every rank's ``buf`` (None on ranks other than 0 with ``rank0_only``)."""
        if not v0.sharded or v0.world == 1:
            return None if rank0_only and dist.get_rank(self.group) != 0 else [buf]
        pieces = [torch.empty_like(buf) for _ in range(v0.world)]
        if not rank0_only:
            dist.all_gather(pieces, buf, group=self.group)
            return pieces
        dst = dist.get_global_rank(self.group, 0)
        dist.gather(buf, pieces if v0.rank == 0 else None, dst=dst, group=self.group)
        return pieces if v0.rank == 0 else None

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(slots)
        units: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s.meta is None:
                out[i] = getattr(s, attr)
            else:
                units.setdefault(id(s.meta.flat), []).append(i)
        for idx in units.values():
            parts = [(slots[i].meta, getattr(slots[i], attr)) for i in idx]
            if all(p is None for _, p in parts):  # no piece here: gather in the storage dtype
                key = slots[idx[0]].key
                parts[0] = (parts[0][0], torch.empty(0, dtype=key[1], device=key[0]))
            for i, value in zip(idx, self._gather_views(parts, rank0_only), strict=True):
                out[i] = value if value is None else value.to(slots[i].key[0])
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
        v: FlatView | None = slot.meta
        if v is None:
            return value
        if v.contiguous:
            flat = value.reshape(-1)
        else:  # the parameter's elements in its storage order, as the flat vector holds them
            dense = torch.empty_strided(v.shape, v.stride, dtype=value.dtype, device=value.device)
            flat = dense.copy_(value).as_strided((v.numel,), (1,))
        n = 0 if slot.avg is None else slot.avg.numel()
        return flat[v.first : v.first + n]

    @torch.no_grad()
    def full(self, t: Tensor) -> Tensor:
        """A model tensor the EMA does not keep (a frozen parameter), gathered: a collective."""
        if not isinstance(t, FlatView):
            return super().full(t)
        value = self._gather_views([(t, t.piece())], rank0_only=False)[0]
        assert value is not None
        return value

    # swapping -----------------------------------------------------------------------------

    def _release(self, strict: bool) -> None:
        """Free the unsharded flat parameters FSDP keeps allocated after a forward pass, so
        its next forward or backward gathers the shards again (as FSDP itself does after a
        backward pass). ``strict``: raise when a unit is unsharded now (inside a forward,
        a backward or ``summon_full_params``), where a swap would not be seen."""
        for handle in self.handles:
            flat = handle.flat_param
            local = flat.__dict__.get("_local_shard")
            if local is None or not handle.uses_sharded_strategy:
                continue  # not initialized (nothing gathered yet), or NO_SHARD: no copy
            if flat.data_ptr() != local.data_ptr():
                if strict:
                    raise RuntimeError(
                        f"the {unit_name(flat)} holds its unsharded "
                        "parameters now (inside a forward or backward pass, or "
                        "summon_full_params): swap the average in outside of them"
                    )
                continue
            for attr in ("_full_param_padded", "_full_prec_full_param_padded"):
                full = flat.__dict__.get(attr)
                if full is None or full.untyped_storage().size() == 0:
                    continue
                if full.device.type != "cpu":  # as FSDP frees it: after the kernels queued
                    full.record_stream(handle._device_handle.current_stream())
                full.untyped_storage().resize_(0)

    def swap_pairs(self, slots: Sequence[Slot]) -> tuple[list[Tensor], list[Tensor]]:
        """Targets: the pieces of the local shards (and whole buffers); values: the averaged
        pieces. No communication; unsharded copies FSDP kept are freed first."""
        self._release(strict=True)
        targets: list[Tensor] = []
        values: list[Tensor] = []
        for s in slots:
            if s.avg is None:
                continue  # this rank's shard holds none of the parameter
            if s.meta is None:
                targets.append(s.entry.tensor())
                values.append(s.avg)
            else:
                targets.append(s.meta.piece())
                values.append(s.avg)
        return targets, values

    @contextlib.contextmanager
    def swap_scope(self, slots: Sequence[Slot]) -> Iterator[None]:
        """After a swap, free what FSDP gathered from the averaged shards inside it."""
        try:
            yield
        finally:
            self._release(strict=False)
