"""The shadow: which tensors of a model are averaged, and where and in which dtype they live.

Each state-dict entry of the model falls in one of three kinds:

- ``average``: trainable floating parameters, and floating buffers with ``buffers="average"``;
  stored in the storage dtype and updated with ``lerp``.
- ``copy``: floating buffers with ``buffers="copy"``; stored and copied at each update.
- ``live``: frozen parameters, integer buffers (``num_batches_tracked``) and extra state;
  never stored twice: exports read them from the live model.

Stored tensors are views into one flat allocation per (device, dtype), built once, so an
update is a fixed set of ``torch._foreach_*`` calls over lists made at construction.

Under FSDP2 (``fully_shard``) parameters are DTensors. The shadow stores only the local
shard of each (a plain tensor in the flat buffer) and keeps the mesh, placements and global
shape beside it, so the update runs on local shards with no communication (DTensor has no
sharding rule for some foreach ops, ``_foreach_copy_`` among them). DTensors are rebuilt
only at the edges: ``tensors()``, ``mapping()``, ``load()`` and ``export()`` (which gathers).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:  # public since torch 2.5; torch 2.4 has it under a private name
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    try:
        from torch.distributed._tensor import DTensor, distribute_tensor
    except ImportError:  # a torch built without distributed: no parameter is a DTensor

        class DTensor:  # type: ignore[no-redef]
            pass

        distribute_tensor = None  # type: ignore[assignment]

from .functional import all_finite, check_same_names, copy_, unwrap_model, values_swapped
from .streams import SideStream

__all__ = ["Shadow", "BUFFER_MODES", "classify"]

BUFFER_MODES = ("average", "copy")
_ALIGN = 16  # elements; keeps every view 64-byte aligned for vectorized kernels
# Bound on a staging buffer for dtype/device conversion, in elements. On a CPU a staging that
# stays in cache is faster as well as smaller (bf16 ResNet-50 -> fp32: 12.4 ms with 2**20,
# 22.7 ms with 2**24); on a GPU fewer, larger chunks mean fewer kernel launches.
_STAGING_ELEMENTS = 1 << 24
_STAGING_ELEMENTS_CPU = 1 << 20
# On a CPU, `_foreach_lerp_` is a loop of per-tensor kernels (about 0.5 us each); for small
# tensors one `torch.cat` into a staging buffer and one `lerp_` is faster (1 thread:
# 1000 x 1024 elements 0.34 ms vs 0.57 ms, 2000 x 32 0.24 ms vs 0.88 ms; even at 4096;
# slower above: benchmarks/gather_vs_foreach.py). Runs of at least _GATHER_MIN tensors of at
# most _GATHER_MAX elements each are gathered.
_GATHER_MAX = 2048
_GATHER_MIN = 8


@dataclass
class _Entry:
    names: list[str]  # the first is canonical; the others are tied aliases
    module: nn.Module
    attr: str
    is_param: bool
    kind: str  # "average" | "copy" | "live"
    view: Tensor | None = None
    # Under FSDP2: (mesh, placements, global shape, global stride) of the DTensor parameter.
    spec: tuple[Any, tuple, torch.Size, tuple[int, ...]] | None = None

    def tensor(self) -> Tensor:
        """The model's tensor as the model holds it (a DTensor under FSDP2)."""
        table = self.module._parameters if self.is_param else self.module._buffers
        return table[self.attr]

    def source(self) -> Tensor:
        """The model's tensor on this rank: the local shard of a DTensor, else the tensor."""
        t = self.tensor()
        return t._local_tensor if isinstance(t, DTensor) else t

    @property
    def shape(self) -> torch.Size:
        """The global shape (the local shape times the mesh, under FSDP2)."""
        return self.spec[2] if self.spec is not None else self.source().shape

    def wrap(self, local: Tensor) -> Tensor:
        """``local`` as this entry's DTensor (same mesh and placements), or as is."""
        if self.spec is None:
            return local
        mesh, placements, shape, stride = self.spec
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )

    def unwrap(self, value: Tensor) -> Tensor:
        """The local part of ``value`` for this rank: ``value`` may be a DTensor of any
        placements, or a full tensor (sliced locally, no communication)."""
        if self.spec is None:
            return value.full_tensor() if isinstance(value, DTensor) else value
        mesh, placements = self.spec[0], self.spec[1]
        if isinstance(value, DTensor):
            if value.device_mesh != mesh or tuple(value.placements) != tuple(placements):
                value = value.redistribute(mesh, placements)
            return value.to_local()
        return distribute_tensor(value, mesh, placements, src_data_rank=None).to_local()


def _gather(t: Tensor) -> Tensor:
    """A full tensor from a DTensor (a collective: every rank of its mesh must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def check_storage(
    dtype: torch.dtype | None, device: torch.device | str | None, buffers: str
) -> tuple[torch.dtype | None, torch.device | None, str]:
    """Validate the storage arguments shared by every shadow; return them normalized."""
    if buffers not in BUFFER_MODES:
        raise ValueError(f"buffers: expected one of {BUFFER_MODES}, got {buffers!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
    return dtype, (torch.device(device) if device is not None else None), buffers


def classify(model: nn.Module, buffers: str) -> list[_Entry]:
    """The model's state-dict entries as ``average`` / ``copy`` / ``live`` entries, tied
    tensors merged (the first name is canonical), extra state left out."""
    entries: list[_Entry] = []
    by_id: dict[int, _Entry] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in by_id:
            by_id[id(tensor)].names.append(name)
            continue
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix)
        is_param = attr in module._parameters
        is_buffer = not is_param and attr in module._buffers
        if is_param and tensor.requires_grad and tensor.is_floating_point():
            kind = "average"
        elif is_buffer and tensor.is_floating_point():
            kind = buffers
        else:
            kind = "live"
        if not (is_param or is_buffer):  # extra state: not a tensor we can track
            continue
        spec = None
        if isinstance(tensor, DTensor):
            spec = (tensor.device_mesh, tuple(tensor.placements), tensor.shape, tensor.stride())
        entry = _Entry([name], module, attr, is_param, kind, spec=spec)
        entries.append(entry)
        by_id[id(tensor)] = entry
    return entries


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _successors(stored: list[_Entry]) -> dict[int, _Entry]:
    """id(entry) -> the stored entry laid out right after it in the same flat buffer."""
    by_storage: dict[tuple, list[_Entry]] = {}
    for e in stored:
        key = (e.view.device, e.view.untyped_storage().data_ptr())
        by_storage.setdefault(key, []).append(e)
    nxt: dict[int, _Entry] = {}
    for es in by_storage.values():
        es.sort(key=lambda e: e.view.storage_offset())
        for a, b in zip(es, es[1:], strict=False):
            nxt[id(a)] = b
    return nxt


def _tiles(a: _Entry, b: _Entry, successor: dict[int, _Entry], members: set[int]) -> bool:
    """Whether ``b`` continues ``a``'s span: ``b`` follows ``a`` in the average with nothing
    stored between them, and their sources sit in one buffer at the same relative offsets."""
    if successor.get(id(a)) is not b or id(b) not in members:
        return False
    sa, sb = a.source().detach(), b.source().detach()
    if type(sa) is not Tensor or type(sb) is not Tensor:  # e.g. DTensor shards
        return False
    return (
        (sa.device, sa.dtype) == (sb.device, sb.dtype)
        and sa.is_contiguous()
        and sb.is_contiguous()
        and sa.untyped_storage().data_ptr() == sb.untyped_storage().data_ptr()
        and sb.storage_offset() - sa.storage_offset()
        == b.view.storage_offset() - a.view.storage_offset()
    )


@torch.no_grad()
def _zero_gaps(run: list[_Entry]) -> None:
    """Zero the padding between the views of a span: it is lerped along with the span."""
    for a, b in zip(run, run[1:], strict=False):
        start = a.view.storage_offset() + a.view.numel()
        gap = b.view.storage_offset() - start
        if gap:
            a.view.as_strided((gap,), (1,), start).zero_()


def _gather_runs(
    items: list[tuple[list[_Entry], Tensor, Tensor]], successor: dict[int, _Entry]
) -> list[list[tuple[list[_Entry], Tensor, Tensor]]]:
    """Split ``items`` into groups: maximal runs of small, contiguous CPU sources of the
    storage dtype, laid out one right after another in the average (nothing stored between),
    of at most ``_STAGING_ELEMENTS_CPU`` elements; every other item alone."""

    def small(run: list[_Entry], view: Tensor, src: Tensor) -> bool:
        return (
            view.device.type == "cpu"
            and (src.device, src.dtype) == (view.device, view.dtype)
            and type(src.detach()) is Tensor
            and src.is_contiguous()
            and src.numel() <= _GATHER_MAX
        )

    groups: list[list] = []
    current: list = []
    size = 0
    for item in items:
        run, view, src = item
        if not small(*item):
            groups += [current, [item]] if current else [[item]]
            current, size = [], 0
            continue
        follows = current and successor.get(id(current[-1][0][-1])) is run[0]
        if current and (not follows or size + _align(view.numel()) > _STAGING_ELEMENTS_CPU):
            groups.append(current)
            current, size = [], 0
        current.append(item)
        size += _align(view.numel())
    if current:
        groups.append(current)
    return groups


def _span_numel(group: list[tuple[list[_Entry], Tensor, Tensor]]) -> int:
    """Elements from the first view of a gather group to the end of its last."""
    first, last = group[0][0][0].view, group[-1][0][-1].view
    return last.storage_offset() + last.numel() - first.storage_offset()


def _run(ops: list[tuple], weight: float) -> None:
    for op in ops:
        if op[0] == "lerp":
            torch._foreach_lerp_(op[1], op[2], weight)
        elif op[0] == "gather":
            _, span, parts, staging = op
            torch.cat(parts, out=staging)
            span.lerp_(staging, weight)
        else:
            for views, sources, staging in op[1]:
                torch._foreach_copy_(staging, sources)
                torch._foreach_lerp_(views, staging, weight)


class _Offload:
    """A CPU average of CUDA sources: a pinned host buffer in the source dtype that the
    sources are copied into without blocking, and the CPU operations that lerp from it."""

    def __init__(self, views: list[Tensor], sources: list[Tensor], stage, side: bool) -> None:
        self.device = sources[0].device
        self.side = side
        self.sources = sources
        total = sum(_align(s.numel()) for s in sources)
        self.pinned = torch.empty(total, dtype=sources[0].dtype, pin_memory=True)
        self.host: list[Tensor] = []
        offset = 0
        for s in sources:
            self.host.append(self.pinned[offset : offset + s.numel()].view(s.shape))
            offset += _align(s.numel())
        if self.pinned.dtype == views[0].dtype:
            self.ops: list[tuple] = [("lerp", views, self.host)]
        else:
            self.ops = [("staged", stage(views, self.host))]

    def launch(self) -> None:
        torch._foreach_copy_(self.host, self.sources, non_blocking=True)

    def nbytes(self) -> int:
        return self.pinned.numel() * self.pinned.element_size()


def _finish_offloads(offloads: list[_Offload], events: list, weight: float) -> None:
    """Worker thread: wait for the device-to-host copies, then the CPU arithmetic."""
    with torch.no_grad():
        for event in events:
            event.synchronize()
        for off in offloads:
            _run(off.ops, weight)


class Shadow:
    """Averaged copies of a model's tensors, with the kernels that update, swap and export them.

    Args:
        model: the training model (DDP and ``torch.compile`` wrappers are seen through).
        dtype: storage dtype of stored tensors; ``None`` keeps each tensor's own dtype.
        device: where stored tensors live; ``None`` keeps each tensor's own device.
        buffers: ``"average"`` or ``"copy"`` for floating buffers.
        side_stream: on CUDA, update parameters on a side stream (see :mod:`emakit.streams`);
            ignored for tensors not on CUDA.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        buffers: str = "average",
        side_stream: bool = False,
    ) -> None:
        self.model = unwrap_model(model)
        self.dtype, self.device, self.buffers = check_storage(dtype, device, buffers)
        self.side_stream = bool(side_stream)
        self._sides: dict[torch.device, SideStream] = {}
        self._workspace: list[Tensor] = []
        # (source, data_ptr) for every source that an op reads through a view made at plan time
        self._layout_checks: list[tuple[Tensor, int]] = []
        self._future: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.entries = self._classify()
        self.stored = [e for e in self.entries if e.kind != "live"]
        self._allocate()
        self._plan()

    @property
    def fsdp(self) -> bool:
        """Whether the model's parameters are DTensors (FSDP2): the average is kept shard by
        shard, and a forward pass with it needs the model's own (FSDP) forward."""
        return any(e.spec is not None for e in self.entries)

    # construction ------------------------------------------------------------------------

    def _classify(self) -> list[_Entry]:
        return classify(self.model, self.buffers)

    def _storage(self, t: Tensor) -> tuple[torch.device, torch.dtype]:
        return (self.device or t.device, self.dtype or t.dtype)

    def _allocate(self) -> None:
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for e in self.stored:
            key = self._storage(e.source())
            sizes[key] = sizes.get(key, 0) + _align(e.source().numel())
        self.flat = {k: torch.empty(n, device=k[0], dtype=k[1]) for k, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        for e in self.stored:
            src = e.source()
            key = self._storage(src)
            start = offsets[key]
            e.view = self.flat[key][start : start + src.numel()].view(src.shape)
            offsets[key] = start + _align(src.numel())
        self.reset()

    def _plan(self) -> None:
        """Build the operations that one update runs, once, so that an update is a fixed set
        of kernel calls over lists made here.

        Averaged entries are grouped by (source device and dtype, storage device and dtype).
        Within a group, a run of entries whose sources tile one buffer with the same offsets
        as their views tile the average (see :func:`emakit.flatten_parameters`) becomes one
        pair of 1-D spans: one ``lerp`` for the whole run. Same device and dtype: one
        ``_foreach_lerp_`` per group. Another dtype or device: chunked staging
        (:meth:`_stage`). A CUDA source with a CPU average: pinned staging, a non-blocking
        copy, and the CPU arithmetic on a worker thread (:class:`_Offload`). With
        ``side_stream``, CUDA parameters are updated on a :class:`~emakit.streams.SideStream`;
        buffers stay on the current stream, since the forward pass writes them.
        """
        self.synchronize()  # pending work may still use the lists about to be dropped
        self._workspace = []
        self._layout_checks = []
        position = _successors(self.stored)
        main: list[_Entry] = []
        side: dict[torch.device, list[_Entry]] = {}
        copies: tuple[list, list] = ([], [])
        for e in self.stored:
            src = e.source()
            if e.kind == "copy":
                copies[0].append(e.view)
                copies[1].append(src)
            elif self.side_stream and e.is_param and src.device.type == "cuda":
                side.setdefault(src.device, []).append(e)
            else:
                main.append(e)
        self._offloads: list[_Offload] = []
        self._ops = self._lerp_ops(main, position, side=False)
        self._side_ops = {d: self._lerp_ops(es, position, side=True) for d, es in side.items()}
        for d in side:
            if d not in self._sides:
                self._sides[d] = SideStream(d)
        self._copies = copies
        # Buffers can be replaced (module.to()), and so can a DTensor's local shard.
        self._buffer_refs = [
            (e, e.source()) for e in self.stored if not e.is_param or e.spec is not None
        ]

    def _lerp_ops(
        self, entries: list[_Entry], position: dict[int, _Entry], side: bool
    ) -> list[tuple]:
        """The operations for ``entries`` (averaged, one stream): spans of tiled sources,
        gathers of small CPU tensors, then foreach/staged/offload groups of the rest."""
        members = {id(e) for e in entries}
        items: list[tuple[list[_Entry], Tensor, Tensor]] = []  # (entries, view, source)
        i = 0
        while i < len(entries):
            run = [entries[i]]
            while i + len(run) < len(entries) and _tiles(
                run[-1], entries[i + len(run)], position, members
            ):
                run.append(entries[i + len(run)])
            i += len(run)
            first, last = run[0], run[-1]
            if len(run) > 1:
                src = first.source().detach()
                n = last.view.storage_offset() + last.view.numel() - first.view.storage_offset()
                view = first.view.as_strided((n,), (1,), first.view.storage_offset())
                src = src.as_strided((n,), (1,), src.storage_offset())
                _zero_gaps(run)
                self._layout_checks += [
                    (first.source(), first.source().data_ptr()),
                    (last.source(), last.source().data_ptr()),
                ]
                items.append((run, view, src))
            else:
                items.append((run, first.view, first.source()))
        ops: list[tuple] = []
        rest: list[tuple[Tensor, Tensor]] = []
        gathers = []
        for group in _gather_runs(items, position):
            if len(group) >= _GATHER_MIN:
                gathers.append(group)
            else:
                rest += [(view, src) for _, view, src in group]
        # runs are gathered one after another: one staging buffer per dtype serves them all
        staging: dict[torch.dtype, Tensor] = {}
        for group in gathers:
            dtype, n = group[0][1].dtype, _span_numel(group)
            if dtype not in staging or staging[dtype].numel() < n:
                staging[dtype] = torch.empty(n, dtype=dtype)
        self._workspace += list(staging.values())
        ops += [self._gather(group, staging[group[0][1].dtype]) for group in gathers]
        groups: dict[tuple, tuple[list, list]] = {}
        for view, src in rest:
            key = (src.device, src.dtype, view.device, view.dtype)
            lists = groups.setdefault(key, ([], []))
            lists[0].append(view)
            lists[1].append(src)
        for (s_dev, s_dtype, v_dev, v_dtype), (views, sources) in groups.items():
            if (s_dev, s_dtype) == (v_dev, v_dtype):
                ops.append(("lerp", views, sources))
            elif s_dev.type == "cuda" and v_dev.type == "cpu":
                self._offloads.append(_Offload(views, sources, self._stage, side))
            else:
                ops.append(("staged", self._stage(views, sources)))
        return ops

    def _gather(self, group: list[tuple[list[_Entry], Tensor, Tensor]], staging: Tensor) -> tuple:
        """One op for a run of small CPU tensors laid out back to back in the average:
        ``torch.cat`` of the sources (and zeros for the padding) into a staging buffer, then
        one ``lerp_`` over the run's span of the average."""
        entries = [e for run, _, _ in group for e in run]
        _zero_gaps(entries)
        first = entries[0].view
        n = _span_numel(group)
        span = first.as_strided((n,), (1,), first.storage_offset())
        zeros = torch.zeros(_ALIGN, dtype=first.dtype, device=first.device)
        parts: list[Tensor] = []
        for k, (_, view, src) in enumerate(group):
            self._layout_checks.append((src, src.data_ptr()))
            parts.append(src.detach().view(-1))
            if k + 1 < len(group):
                gap = group[k + 1][1].storage_offset() - view.storage_offset() - view.numel()
                while gap > 0:  # alignment padding between two views
                    parts.append(zeros[: min(gap, _ALIGN)])
                    gap -= _ALIGN
        return ("gather", span, parts, staging[:n])

    def _stage(self, views: list[Tensor], sources: list[Tensor]) -> list[tuple[list, list, list]]:
        """Chunks of (views, sources, staging views): sources are converted into a staging
        buffer in the storage dtype and device, then lerped, chunk by chunk. The staging holds
        at most ``max(bound, largest non-contiguous tensor)`` elements, the bound being
        ``_STAGING_ELEMENTS`` (``_STAGING_ELEMENTS_CPU`` on a CPU): tensors larger than that are
        split into 1-D pieces."""
        cpu = views[0].device.type == "cpu"
        bound = _STAGING_ELEMENTS_CPU if cpu else _STAGING_ELEMENTS
        pairs = list(zip(views, sources, strict=True))
        whole = [_align(v.numel()) for v, s in pairs if not s.is_contiguous()]
        total = sum(_align(v.numel()) for v in views)
        size = min(total, max(whole + [bound]))
        pieces: list[tuple[Tensor, Tensor]] = []
        for v, s in pairs:
            if v.numel() > size and s.is_contiguous():
                self._layout_checks.append((s, s.data_ptr()))
                v, s = v.reshape(-1), s.detach().reshape(-1)
                pieces += [(v[k : k + size], s[k : k + size]) for k in range(0, v.numel(), size)]
            else:
                pieces.append((v, s))
        staging = torch.empty(size, dtype=views[0].dtype, device=views[0].device)
        self._workspace.append(staging)
        chunks: list[tuple[list, list, list]] = []
        used = size  # forces a new chunk first
        for v, s in pieces:
            n = _align(v.numel())
            if used + n > size:
                chunks.append(([], [], []))
                used = 0
            chunks[-1][0].append(v)
            chunks[-1][1].append(s)
            chunks[-1][2].append(staging[used : used + v.numel()].view(v.shape))
            used += n
        return chunks

    # the update --------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Rebuild the lists if a buffer was replaced (``module.to()`` replaces buffers) or a
        flattened parameter's storage moved (``p.data = ...``)."""
        for e, t in self._buffer_refs:
            if e.source() is not t:
                self._plan()
                return
        for t, ptr in self._layout_checks:
            if t.data_ptr() != ptr:
                self._plan()
                return

    @torch.no_grad()
    def update(self, weight: float) -> None:
        """``stored <- stored + weight * (source - stored)``; ``copy`` entries take the source.

        With a side stream or a CPU average of a CUDA model this returns before the work is
        done; :meth:`synchronize` (called by the EMA before it reads, swaps, saves or loads the
        average) orders it, and side streams are also joined before every optimizer step.
        """
        self._refresh()
        self._wait_host()
        for device, ops in self._side_ops.items():
            with self._sides[device].launch():
                _run(ops, weight)
        _run(self._ops, weight)
        if self._offloads:
            self._launch_offloads(weight)
        if self._copies[0]:
            torch._foreach_copy_(self._copies[0], self._copies[1])

    def _launch_offloads(self, weight: float) -> None:
        events = []
        for off in self._offloads:
            device = off.device
            # parameters only: buffers are written by the next forward pass
            side = self._sides[device] if off.side else None
            if side is not None:
                with side.launch():
                    off.launch()
                events.append(side.done)
            else:
                event = torch.cuda.Event()
                off.launch()
                event.record(torch.cuda.current_stream(device))
                events.append(event)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emakit")
        self._future = self._executor.submit(_finish_offloads, self._offloads, events, weight)

    def _wait_host(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def synchronize(self) -> None:
        """Order every pending update before what comes next: the current CUDA streams wait
        for the side streams (on the device, the host is not blocked) and the host waits for
        the CPU arithmetic of a CPU average. A no-op when nothing is pending."""
        self._wait_host()
        for side in self._sides.values():
            side.join()

    def __del__(self) -> None:
        # Pending side-stream work must not outlive the buffers it writes.
        with contextlib.suppress(Exception):
            self.synchronize()

    def workspace_nbytes(self) -> int:
        """Bytes of staging buffers (dtype/device conversion, pinned host copies)."""
        return sum(t.numel() * t.element_size() for t in self._workspace) + sum(
            off.nbytes() for off in self._offloads
        )

    @torch.no_grad()
    def reset(self) -> None:
        """Set every stored tensor to the model's current value."""
        copy_([e.view for e in self.stored], [e.source() for e in self.stored])

    def sources_finite(self) -> bool:
        """Whether the model's averaged tensors are all finite (one host-device sync)."""
        return all_finite([e.source() for e in self.stored if e.kind == "average"])

    # views of the state ------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """Stored tensors by canonical name, in storage dtype (views, not copies). Under FSDP2
        each is a DTensor over the local shard, with the parameter's mesh and placements."""
        return {e.names[0]: e.wrap(e.view) for e in self.stored}

    def check_load(self, tensors: Mapping[str, Tensor], what: str = "state_dict") -> None:
        """Raise what :meth:`load` would for ``tensors``, changing nothing."""
        bad = [n for n, t in tensors.items() if not isinstance(t, Tensor)]
        if bad:
            raise ValueError(f"{what}: expected tensors, got other values for {bad}")
        check_same_names(
            {e.names[0]: e.shape for e in self.stored},
            {n: t.shape for n, t in tensors.items()},
            what,
        )

    @torch.no_grad()
    def load(self, tensors: Mapping[str, Tensor], what: str = "state_dict") -> None:
        """Copy ``tensors`` (as from ``tensors()``) into the stored views, after checking names
        and (global) shapes. Under FSDP2 a value may be a DTensor of any placements or a full
        tensor: each rank takes its own shard."""
        self.check_load(tensors, what)
        copy_([e.view for e in self.stored], [e.unwrap(tensors[e.names[0]]) for e in self.stored])

    @torch.no_grad()
    def export(self, started: bool = True, rank0_only: bool = False) -> OrderedDict[str, Tensor]:
        """A plain state dict of the averaged model: keys and dtypes as ``model.state_dict()``.

        Stored tensors are cast back to the model's dtype; live ones are read from the model.
        Before ``started`` the average follows the model, so the model's own values are given.
        Under FSDP2 sharded tensors are gathered into full ones (a collective: every rank must
        call it). ``rank0_only``: only rank 0 keeps the tensors, on the CPU; other ranks get
        an empty dict.
        """
        keep = not rank0_only or _rank() == 0
        averaged: dict[str, _Entry] = {}
        if started:
            averaged = {name: e for e in self.stored for name in e.names}
        out: OrderedDict[str, Tensor] = OrderedDict()
        done: dict[int, Tensor] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            e = averaged.get(name)
            key = id(e) if e is not None else id(tensor)
            if key not in done:
                if e is not None:
                    value = _gather(e.wrap(e.view)).to(dtype=e.source().dtype, copy=True)
                else:
                    value = _gather(tensor.detach()).clone()
                done[key] = value.cpu() if rank0_only else value
            if keep:
                out[name] = done[key]
        if not keep:
            return OrderedDict()
        return out

    def mapping(self, started: bool = True) -> dict[str, Tensor]:
        """Name -> tensor for ``torch.func.functional_call``: stored views in the model's dtype
        and device (a transient cast only when they differ), live tensors from the model.
        Under FSDP2 the values are DTensors over the local shards."""
        result: dict[str, Tensor] = {}
        for e in self.entries:
            src = e.source()
            if started and e.view is not None:
                t = e.view
                if (t.device, t.dtype) != (src.device, src.dtype):
                    t = t.to(device=src.device, dtype=src.dtype)
                t = e.wrap(t)
            else:
                t = e.tensor().detach()
            for name in e.names:
                result[name] = t
        return result

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Averaged values in the model's tensors inside the block; the training values are
        restored bitwise after it, also when it raises. Tensor identity is kept."""
        with values_swapped([e.source() for e in self.stored], [e.view for e in self.stored]):
            yield

    def state_nbytes(self) -> int:
        """Bytes held by the stored average (flat buffers), staging excluded."""
        return sum(f.numel() * f.element_size() for f in self.flat.values())
