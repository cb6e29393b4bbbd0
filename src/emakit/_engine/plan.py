"""Plan: the typed operations one update runs, built once from layout x placement, and the
check that they still fit the model.

Every operation's ``run(weight, kernel)`` calls ``kernel(avg, src, weight, comp)`` (by default
:func:`.kernels.lerp_`; an executor may pass :class:`~.kernels.FusedLerp`) on
``(slot.avg, slot.src)`` pairs, this rank's part of an average and
the matching part of the model's tensor (see :mod:`.placements`), so every placement
gets every path:

- :class:`Foreach`: one ``kernels.lerp_`` over lists of one (device, dtype); a list element
  is a tensor or a **span**: a run of tensors whose sources tile one buffer with the same
  relative offsets as their averages tile the flat (a model laid out by
  :func:`emakit.flatten_parameters`), lerped as one 1-D view, padding included (kept 0).
- :class:`Gather`: a run of small contiguous CPU tensors laid out back to back in the
  average: one ``torch.cat`` into a staging buffer and one lerp over the run's span. On a
  CPU ``_foreach_lerp_`` is a loop of per-tensor kernels (about 0.5 us each); for tensors
  of at most ``GATHER_MAX`` elements one cat and one lerp is faster
  (``benchmarks/gather_vs_foreach.py``).
- :class:`Packed`: the other small CPU tensors (under ``PACK_MAX`` elements, ResNet-50's
  BatchNorm vectors and small convolutions wherever they sit in the average): their
  sources, averages and compensations are concatenated (``torch.cat``, one C-level call
  each) into a staging buffer, lerped as one tensor, and the averages and compensations
  copied back (``_foreach_copy_``). The arithmetic is elementwise, so the result is the
  per-tensor kernel's, bit for bit; it replaces a chain of eager ``_foreach`` passes (about
  ten with a compensation) over every small tensor by one kernel call
  (``benchmarks/update_cost.py``: ResNet-50's 225 small tensors).
- :class:`Staged`: sources of another dtype or device are converted chunk by chunk into a
  staging buffer, then lerped (a staging that stays in cache is faster on a CPU as well as
  smaller: bf16 ResNet-50 -> fp32, 12.4 ms with 2**20 elements, 22.7 ms with 2**24). With
  ``build(..., stage=False)`` (an executor whose kernel converts inside its one pass, e.g.
  :class:`emakit._engine.kernels.FusedLerp`), sources of another dtype on the same device are a
  :class:`Foreach` instead: no staging buffer.
- :class:`Offload`: a CPU average of CUDA sources: pinned host copies made without blocking,
  then the CPU arithmetic (run by the executor on a worker thread).
- :class:`Copy`: ``buffers="copy"`` entries take the model's values.

:class:`Watch` says whether the model still holds the tensors a plan was made for and would
classify them alike, with no Python loop per tensor: registrations on the model's own
modules (:class:`emakit.layout.Registrations`; those elsewhere in the process cost
nothing), a comparison of each parent module's children (a deleted or inserted layer), one
C-level pass over the live parameters' ``requires_grad`` (one that starts training joins
the average) and one over the stored tensors' ``data_ptr`` (a replaced parameter or
buffer, a ``.data`` moved anywhere in a span, a changed dtype or device: new storage).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import kernels
from .layout import ALIGN, Entry, FlatEntry, Kind, Registrations, align
from .placements import Key, Slot

__all__ = [
    "Foreach",
    "Gather",
    "Packed",
    "Staged",
    "Chunk",
    "Offload",
    "Copy",
    "Plan",
    "Watch",
    "build",
    "STAGING_ELEMENTS",
    "STAGING_ELEMENTS_CPU",
    "GATHER_MAX",
    "GATHER_MIN",
    "PACK_MAX",
]

# Bound on a staging buffer for dtype/device conversion, in elements (see Staged above).
STAGING_ELEMENTS = 1 << 24
STAGING_ELEMENTS_CPU = 1 << 20
# Runs of at least GATHER_MIN tensors of at most GATHER_MAX elements each are gathered
# (1 thread: 1000 x 1024 elements 0.34 ms vs 0.57 ms, 2000 x 32 0.24 ms vs 0.88 ms).
GATHER_MAX = 2048
GATHER_MIN = 8
# Small CPU tensors not in a gathered run are packed (at least GATHER_MIN of them) when under
# PACK_MAX elements, the size under which the fused kernel's per-call host time (25-40 us)
# exceeds its arithmetic (kernels.FusedLerp's eager_below).
PACK_MAX = 1 << 16

Weight = float | Tensor
# kernel(avg, src, weight, comp): kernels.lerp_ or a kernels.FusedLerp
Kernel = Callable[[list[Tensor], list[Tensor], Weight, "list[Tensor] | None"], None]


def _comp_of(avg: Tensor, comps: dict | None, key) -> Tensor | None:
    """The compensation view laid out exactly as ``avg`` in its flat."""
    if comps is None:
        return None
    return comps[key].as_strided(avg.shape, avg.stride(), avg.storage_offset())


@dataclass
class Foreach:
    """``avg[i] <- avg[i] + w (src[i] - avg[i])`` for lists of one dtype and device."""

    avg: list[Tensor]
    src: list[Tensor]
    comp: list[Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.avg[0].device

    def run(self, weight: Weight, kernel: Kernel = kernels.lerp_) -> None:
        kernel(self.avg, self.src, weight, self.comp)


@dataclass
class Gather:
    """A run of small CPU tensors: ``cat(parts) -> staging``, then one lerp of ``span``."""

    span: Tensor
    parts: list[Tensor]
    staging: Tensor
    comp: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.span.device

    def run(self, weight: Weight, kernel: Kernel = kernels.lerp_) -> None:
        torch.cat(self.parts, out=self.staging)
        comp = None if self.comp is None else [self.comp]
        kernel([self.span], [self.staging], weight, comp)


@dataclass
class Packed:
    """Small CPU tensors anywhere in the average: ``cat`` sources, averages and
    compensations into ``staging`` rows, one lerp over them, averages and compensations
    copied back. ``avg``, ``src`` and ``comp`` are 1-D views of contiguous tensors;
    ``parts[k]`` are the pieces of staging row ``k`` matching them."""

    avg: list[Tensor]
    src: list[Tensor]
    comp: list[Tensor] | None
    staging: Tensor  # (2 or 3, n): average, source[, compensation]
    parts: list[list[Tensor]]

    @property
    def device(self) -> torch.device:
        return self.staging.device

    def run(self, weight: Weight, kernel: Kernel = kernels.lerp_) -> None:
        a, s = self.staging[0], self.staging[1]
        torch.cat(self.avg, out=a)
        torch.cat(self.src, out=s)
        comp = None
        if self.comp is not None:
            comp = [self.staging[2]]
            torch.cat(self.comp, out=comp[0])
        kernel([a], [s], weight, comp)
        torch._foreach_copy_(self.avg, self.parts[0])
        if self.comp is not None:
            torch._foreach_copy_(self.comp, self.parts[2])


@dataclass
class Chunk:
    avg: list[Tensor]
    src: list[Tensor]
    staging: list[Tensor]
    comp: list[Tensor] | None = None


@dataclass
class Staged:
    """Sources converted chunk by chunk into a staging buffer (storage dtype and device)."""

    chunks: list[Chunk]

    @property
    def device(self) -> torch.device:
        return self.chunks[0].avg[0].device

    def run(self, weight: Weight, kernel: Kernel = kernels.lerp_) -> None:
        for c in self.chunks:
            torch._foreach_copy_(c.staging, c.src)
            kernel(c.avg, c.staging, weight, c.comp)


@dataclass
class Offload:
    """A CPU average of CUDA sources: ``pinned`` (source dtype) receives non-blocking copies
    of ``sources`` (:meth:`launch`); ``ops`` then run on the CPU."""

    sources: list[Tensor]
    pinned: Tensor
    host: list[Tensor]
    ops: list[Foreach | Staged]

    @property
    def device(self) -> torch.device:
        return self.sources[0].device

    def launch(self) -> None:
        torch._foreach_copy_(self.host, self.sources, non_blocking=True)

    def nbytes(self) -> int:
        return self.pinned.numel() * self.pinned.element_size()


@dataclass
class Copy:
    """``dst[i] <- src[i]`` (converted) for the ``copy`` entries."""

    dst: list[Tensor] = field(default_factory=list)
    src: list[Tensor] = field(default_factory=list)

    def run(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)


Op = Foreach | Gather | Packed | Staged


_MODULES = operator.attrgetter("_modules")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
# containers whose insert() writes _modules directly: no hook runs, even when one is empty
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class Watch:
    """Whether the model still holds the tensors a plan was made for, and would classify
    them alike.

    ``valid()`` checks, cheapest first, with no Python loop per tensor:

    1. registrations on the model's own modules since the plan
       (:class:`~emakit.layout.Registrations`; one attribute read when there were none:
       registrations elsewhere in the process are forgotten as they happen);
    2. each parent module's children (its ``_modules`` compared with a copy, in C): a layer
       deleted (``del model[1]``, ``pop``) or inserted (``insert``), which no hook reports;
    3. ``requires_grad`` of the parameters the plan leaves live (frozen ones, one C-level
       ``map``; none in full training): one that starts training joins the average;
    4. each watched tensor's ``data_ptr`` (one C-level ``map``, read afresh from the
       modules' dicts): a tensor replaced behind torch's hooks (``module._buffers[k] = x``,
       ``module.to()``), ``.data`` moved anywhere in a span, a dtype or device change.
    """

    def __init__(
        self,
        entries: Sequence[Entry],
        local: Sequence[Callable[[Tensor], Tensor] | None],
        model: nn.Module | None = None,
        live: Sequence[Entry] = (),
    ) -> None:
        """``local[i]``: what maps ``entries[i]``'s tensor to the part to watch (None: the
        tensor); entries that share one are checked in one ``map``. ``model``: whose
        modules' registrations and children are watched. ``live``: the parameters the plan
        leaves live, whose ``requires_grad`` is watched (an FSDP1 parameter's own flag, as
        :attr:`~emakit._engine.flat_params.FlatView.requires_grad` reads it)."""
        groups: dict[Callable | None, tuple[Callable | None, list, list]] = {}
        for e, f in zip(entries, local, strict=True):
            g = groups.setdefault(f, (f, [], []))  # bound methods of one object are equal
            g[1].append(e.table)
            g[2].append(e.attr)
        self.groups = list(groups.values())
        self.model = model
        plain = [e for e in live if not isinstance(e, FlatEntry)]
        self.flag_tables = [e.table for e in plain]
        self.flag_attrs = [e.attr for e in plain]
        self.flag_objects = [_flag_holder(e) for e in live if isinstance(e, FlatEntry)]
        self.refresh()

    def _ptrs(self) -> list[int]:
        out: list[int] = []
        for f, tables, attrs in self.groups:
            ts = map(dict.__getitem__, tables, attrs)
            if f is not None:
                ts = map(f, ts)
            out += map(Tensor.data_ptr, ts)
        return out

    def _flags(self) -> list[bool]:
        out = list(map(_REQUIRES_GRAD, map(dict.__getitem__, self.flag_tables,
                                           self.flag_attrs)))
        return out + list(map(_REQUIRES_GRAD, self.flag_objects))

    def same_tensors(self) -> bool:
        """Whether every watched tensor is where it was (addresses only)."""
        try:
            return self._ptrs() == self.ptrs
        except Exception:  # a removed key, a tensor set to None: re-plan
            return False

    def valid(self) -> bool:
        if self.registrations.changed():
            return False
        try:
            return (
                list(map(_MODULES, self.parents)) == self.children
                and self._flags() == self.flags
                and self._ptrs() == self.ptrs
            )
        except Exception:  # a removed key, a tensor set to None: re-plan
            return False

    def refresh(self) -> None:
        """Accept the model as it is now (after a check found that nothing it plans for
        changed)."""
        modules = [] if self.model is None else list(self.model.modules())
        self.registrations = Registrations(modules)
        self.parents = [m for m in modules if m._modules or isinstance(m, _CONTAINERS)]
        self.children = [dict(m._modules) for m in self.parents]
        self.flags = self._flags()
        self.ptrs = self._ptrs()


def _flag_holder(e: FlatEntry) -> Tensor:
    """The tensor whose ``requires_grad`` an FSDP1 parameter's classification reads."""
    view = e.view
    if view is None:
        raise RuntimeError(f"model: {e.name} has no FSDP1 view")
    return view.param if view.param is not None else view.flat


@dataclass
class Plan:
    """Everything one update runs: ``main`` on the current stream, ``offloads`` (CPU
    arithmetic on a worker), ``copy``."""

    main: list[Op]
    offloads: list[Offload]
    copy: Copy
    workspace: list[Tensor]
    watch: Watch

    def workspace_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.workspace) + sum(
            o.nbytes() for o in self.offloads
        )


# building ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Bound:
    """A slot with a local part: this rank's ``avg`` and the matching ``src`` (both set),
    what every operation is built from."""

    slot: Slot
    avg: Tensor
    src: Tensor

    @property
    def key(self) -> Key:
        return self.slot.key

    @property
    def entry(self) -> Entry:
        return self.slot.entry

    @classmethod
    def of(cls, slots: Sequence[Slot]) -> list[Bound]:
        """The slots that have a non-empty local part on this rank."""
        out = []
        for s in slots:
            if s.avg is not None and s.src is not None and s.avg.numel() > 0:
                out.append(cls(s, s.avg, s.src))
        return out


def _successors(slots: list[Bound]) -> dict[int, Bound]:
    """id(slot) -> the slot laid out right after it in the same flat."""
    by_storage: dict[tuple, list[Bound]] = {}
    for s in slots:
        key = (s.avg.device, s.avg.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append(s)
    nxt: dict[int, Bound] = {}
    for ss in by_storage.values():
        ss.sort(key=lambda s: s.avg.storage_offset())
        for a, b in zip(ss, ss[1:], strict=False):
            nxt[id(a)] = b
    return nxt


def _tiles(a: Bound, b: Bound, successor: dict[int, Bound], members: set[int]) -> bool:
    """Whether ``b`` continues ``a``'s span: ``b`` follows ``a`` in the average with nothing
    stored between them, and their sources sit in one buffer at the same relative offsets."""
    if successor.get(id(a)) is not b or id(b) not in members:
        return False
    sa, sb = a.src.detach(), b.src.detach()
    if type(sa) is not Tensor or type(sb) is not Tensor:
        return False
    return (
        (sa.device, sa.dtype) == (sb.device, sb.dtype)
        and sa.is_contiguous()
        and sb.is_contiguous()
        and sa.untyped_storage().data_ptr() == sb.untyped_storage().data_ptr()
        and sb.storage_offset() - sa.storage_offset()
        == b.avg.storage_offset() - a.avg.storage_offset()
    )


def _span(first: Tensor, n: int) -> Tensor:
    return first.as_strided((n,), (1,), first.storage_offset())


@torch.no_grad()
def _zero_gaps(views: list[Tensor]) -> None:
    """Zero the padding between consecutive views: a span lerps it along."""
    for a, b in zip(views, views[1:], strict=False):
        start = a.storage_offset() + a.numel()
        gap = b.storage_offset() - start
        if gap:
            a.as_strided((gap,), (1,), start).zero_()


@dataclass
class _Item:
    slots: list[Bound]
    avg: Tensor
    src: Tensor
    comp: Tensor | None


class _Builder:
    def __init__(self, comps: dict | None, stage: bool = True) -> None:
        self.comps = comps
        self.staging = stage
        self.workspace: list[Tensor] = []
        self.offloads: list[Offload] = []

    def comp(self, s: Bound, view: Tensor) -> Tensor | None:
        return _comp_of(view, self.comps, s.key)

    def items(self, slots: list[Bound], position: dict[int, Bound]) -> list[_Item]:
        members = {id(s) for s in slots}
        items: list[_Item] = []
        i = 0
        while i < len(slots):
            run = [slots[i]]
            while i + len(run) < len(slots) and _tiles(run[-1], slots[i + len(run)], position,
                                                       members):
                run.append(slots[i + len(run)])
            i += len(run)
            first, last = run[0], run[-1]
            if len(run) > 1:
                n = int(last.avg.storage_offset() + last.avg.numel() - first.avg.storage_offset())
                avg = _span(first.avg, n)
                src = _span(first.src.detach(), n)
                _zero_gaps([s.avg for s in run])
                comp = self.comp(first, avg)
                if comp is not None:
                    comp.zero_()
                items.append(_Item(run, avg, src, comp))
            else:
                items.append(_Item(run, first.avg, first.src, self.comp(first, first.avg)))
        return items

    def ops(self, slots: list[Bound], position: dict[int, Bound]) -> list[Op]:
        rest: list[_Item] = []
        gathers = []
        for group in _gather_runs(self.items(slots, position), position):
            if len(group) >= GATHER_MIN:
                gathers.append(group)
            else:
                rest += group
        packs = [it for it in rest if self.packable(it)]
        if len(packs) < GATHER_MIN:
            packs = []
        packed_ids = {id(it) for it in packs}
        rest = [it for it in rest if id(it) not in packed_ids]
        packed = [self.packed(packs)] if packs else []
        return self.gathers(gathers) + packed + self.foreach(rest)

    def packable(self, it: _Item) -> bool:
        """A small contiguous CPU tensor of the storage's dtype (a floating compensation of
        that dtype or none)."""
        src = it.src.detach()
        return (
            it.avg.device.type == "cpu"
            and (src.device, src.dtype) == (it.avg.device, it.avg.dtype)
            and type(src) is Tensor
            and type(it.avg) is Tensor
            and src.is_contiguous()
            and it.avg.is_contiguous()
            and it.avg.numel() < PACK_MAX
            and (it.comp is None or (it.comp.dtype == it.avg.dtype and it.comp.is_contiguous()))
        )

    def packed(self, items: list[_Item]) -> Packed:
        comps = self.comps is not None and all(it.comp is not None for it in items)
        if self.comps is not None and not comps:  # (a compensated store has one for each)
            raise RuntimeError("plan: a compensated average without its compensation")
        sizes = [it.avg.numel() for it in items]
        first = items[0].avg
        staging = torch.empty(3 if comps else 2, sum(sizes), dtype=first.dtype)
        self.workspace.append(staging)
        parts = [list(row.split(sizes)) for row in staging]
        return Packed(
            [it.avg.view(-1) for it in items],
            [it.src.detach().view(-1) for it in items],
            [it.comp.view(-1) for it in items if it.comp is not None] if comps else None,
            staging,
            parts,
        )

    def gathers(self, groups: list[list[_Item]]) -> list[Op]:
        """One :class:`Gather` per group; runs are gathered one after another, so one
        staging buffer per dtype serves them all."""
        staging: dict[torch.dtype, Tensor] = {}
        for group in groups:
            dtype, n = group[0].avg.dtype, _span_numel(group)
            if dtype not in staging or staging[dtype].numel() < n:
                staging[dtype] = torch.empty(n, dtype=dtype)
        self.workspace += list(staging.values())
        return [self.gather(group, staging[group[0].avg.dtype]) for group in groups]

    def foreach(self, rest: list[_Item]) -> list[Op]:
        """Items grouped by (source device and dtype, storage device and dtype): one
        :class:`Foreach`, :class:`Staged` or :class:`Offload` per group."""
        ops: list[Op] = []
        groups: dict[tuple, list[_Item]] = {}
        for it in rest:
            key = (it.src.device, it.src.dtype, it.avg.device, it.avg.dtype)
            groups.setdefault(key, []).append(it)
        for (s_dev, s_dtype, v_dev, v_dtype), its in groups.items():
            avg = [it.avg for it in its]
            src = [it.src for it in its]
            comp = None if self.comps is None else [c for it in its if (c := it.comp) is not None]
            if (s_dev, s_dtype) == (v_dev, v_dtype) or (s_dev == v_dev and not self.staging):
                ops.append(Foreach(avg, src, comp))
            elif s_dev.type == "cuda" and v_dev.type == "cpu":
                self.offloads.append(self.offload(avg, src, comp))
            else:
                ops.append(self.stage(avg, src, comp))
        return ops

    def gather(self, group: list[_Item], staging: Tensor) -> Gather:
        """One op for a run of small CPU tensors laid out back to back in the average."""
        views = [v for it in group for v in ([s.avg for s in it.slots])]
        _zero_gaps(views)
        first = group[0].avg
        n = _span_numel(group)
        span = _span(first, n)
        comp = _comp_of(span, self.comps, group[0].slots[0].key)
        if comp is not None:
            comp.zero_()
        zeros = torch.zeros(ALIGN, dtype=first.dtype, device=first.device)
        parts: list[Tensor] = []
        for k, it in enumerate(group):
            parts.append(it.src.detach().view(-1))
            if k + 1 < len(group):
                gap = group[k + 1].avg.storage_offset() - it.avg.storage_offset() - it.avg.numel()
                while gap > 0:  # alignment padding between two views
                    parts.append(zeros[: min(gap, ALIGN)])
                    gap -= ALIGN
        return Gather(span, parts, staging[:n], comp)

    def stage(self, avg: list[Tensor], src: list[Tensor], comp: list[Tensor] | None) -> Staged:
        """Chunks of (avg, src, staging views): the staging holds at most ``max(bound,
        largest non-contiguous tensor)`` elements; larger contiguous tensors are split into
        1-D pieces."""
        cpu = avg[0].device.type == "cpu"
        bound = STAGING_ELEMENTS_CPU if cpu else STAGING_ELEMENTS
        whole = [align(a.numel()) for a, s in zip(avg, src, strict=True) if not s.is_contiguous()]
        total = sum(align(a.numel()) for a in avg)
        size = min(total, max(whole + [bound]))
        pieces = _pieces(avg, src, comp, size)
        staging = torch.empty(size, dtype=avg[0].dtype, device=avg[0].device)
        self.workspace.append(staging)
        chunks: list[Chunk] = []
        used = size  # forces a new chunk first
        for a, s, c in pieces:
            n = align(a.numel())
            if used + n > size:
                chunks.append(Chunk([], [], [], None if comp is None else []))
                used = 0
            ch = chunks[-1]
            ch.avg.append(a)
            ch.src.append(s)
            ch.staging.append(staging[used : used + a.numel()].view(a.shape))
            if ch.comp is not None and c is not None:
                ch.comp.append(c)
            used += n
        return Staged(chunks)

    def offload(self, avg, src, comp) -> Offload:
        total = sum(align(s.numel()) for s in src)
        pinned = torch.empty(total, dtype=src[0].dtype, pin_memory=True)
        host: list[Tensor] = []
        offset = 0
        for s in src:
            host.append(pinned[offset : offset + s.numel()].view(s.shape))
            offset += align(s.numel())
        if pinned.dtype == avg[0].dtype:
            ops: list = [Foreach(avg, host, comp)]
        else:
            ops = [self.stage(avg, host, comp)]
        return Offload(list(src), pinned, host, ops)


def _pieces(
    avg: list[Tensor], src: list[Tensor], comp: list[Tensor] | None, size: int
) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """(avg, src, comp) triples of at most ``size`` elements: contiguous tensors larger than
    that are split into 1-D pieces; others stay whole."""
    comps: list[Tensor | None] = list(comp) if comp is not None else [None] * len(avg)
    pieces: list[tuple[Tensor, Tensor, Tensor | None]] = []
    for a, s, c in zip(avg, src, comps, strict=True):
        if a.numel() <= size or not s.is_contiguous():
            pieces.append((a, s, c))
            continue
        a, s = a.reshape(-1), s.detach().reshape(-1)
        c = None if c is None else c.reshape(-1)
        for k in range(0, a.numel(), size):
            pieces.append((a[k : k + size], s[k : k + size],
                           None if c is None else c[k : k + size]))
    return pieces


def _gather_runs(items: list[_Item], successor: dict[int, Bound]) -> list[list[_Item]]:
    """Split ``items`` into groups: maximal runs of small, contiguous CPU sources of the
    storage dtype, laid out one right after another in the average, of at most
    ``STAGING_ELEMENTS_CPU`` elements; every other item alone."""

    def small(it: _Item) -> bool:
        return (
            it.avg.device.type == "cpu"
            and (it.src.device, it.src.dtype) == (it.avg.device, it.avg.dtype)
            and type(it.src.detach()) is Tensor
            and it.src.is_contiguous()
            and it.src.numel() <= GATHER_MAX
        )

    groups: list[list[_Item]] = []
    current: list[_Item] = []
    size = 0
    for it in items:
        if not small(it):
            groups += [current, [it]] if current else [[it]]
            current, size = [], 0
            continue
        follows = current and successor.get(id(current[-1].slots[-1])) is it.slots[0]
        if current and (not follows or size + align(it.avg.numel()) > STAGING_ELEMENTS_CPU):
            groups.append(current)
            current, size = [], 0
        current.append(it)
        size += align(it.avg.numel())
    if current:
        groups.append(current)
    return groups


def _span_numel(group: list[_Item]) -> int:
    """Elements from the first view of a gather group to the end of its last."""
    first, last = group[0].avg, group[-1].avg
    return int(last.storage_offset() + last.numel() - first.storage_offset())


@torch.no_grad()
def build(
    slots: Sequence[Slot],
    watch: Watch,
    comps: dict | None = None,
    stage: bool = True,
) -> Plan:
    """The plan for ``slots`` (bound: ``avg`` and ``src`` set). Averaged slots are grouped by
    (source device and dtype, storage device and dtype); spans, gathers, foreach, staged and
    offload operations as in the module docstring. ``stage=False``: a source of another
    dtype on the storage's device is read by the kernel directly (no staging buffer)."""
    live = Bound.of(slots)
    position = _successors(live)
    main: list[Bound] = []
    copy = Copy()
    for s in live:
        if s.entry.kind is Kind.COPY:
            copy.dst.append(s.avg)
            copy.src.append(s.src)
        else:
            main.append(s)
    b = _Builder(comps, stage)
    main_ops = b.ops(main, position)
    return Plan(main_ops, b.offloads, copy, b.workspace, watch)
