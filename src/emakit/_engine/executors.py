"""Executors: how a plan runs, and which executor a store gets.

Every executor runs the same :class:`~emakit.plan.Plan` (``avg <- avg + w (src - avg)`` per
operation, ``copy`` entries take the source); they differ in the kernel and in how the
kernels are launched:

- :class:`Eager`: each operation with the eager :func:`emakit._engine.kernels.lerp_` (``_foreach``
  chains): three passes without compensation (the difference is halved so that it cannot
  overflow), about ten with compensation, a staging buffer for a source of another dtype
  (bf16 model, fp32 average).
- :class:`Fused`: each operation with :class:`emakit._engine.kernels.FusedLerp`, one compiled pass
  per tensor that reads the model once, the average and compensation once and writes them
  once (10 B per element for a bf16 model into an fp32 average, 18 with the compensation),
  converting the source inside the pass: its plans have no staging buffer. One
  ``FusedLerp`` serves every store of the process, so a dtype combination compiles once;
  where compiling is unavailable or fails it runs the eager ``lerp_``.
- :class:`Graphed`: the plan's CUDA operations captured in one CUDA graph per device
  (:class:`emakit._engine.kernels.CUDAGraphUpdate`, the weight in a static device tensor) and
  replayed: one launch per update whatever the number of tensors. Its kernel is
  ``FusedLerp`` or ``lerp_``. A new plan (the store re-plans when the model's tensors
  move) is captured afresh at its first update. Inside a capture of the caller's own
  (``torch.cuda.graph``) the operations run directly, so they join that graph.

Whatever the executor, a CPU average of a CUDA model (``plan.offloads``) is copied without
blocking into pinned host buffers, and the CPU arithmetic (eager ``lerp_``) runs on a
worker thread; the next update and :meth:`Eager.synchronize` wait for it. When the next
update finds it still running, the training step is waiting for the host: a
``RuntimeWarning`` says so, once per executor.

A weight (``1 - smoothing``) is a float or a 0-d tensor; a tensor is moved to each
operation's device without a host synchronization (non-blocking; through a pinned host
scalar for the CPU arithmetic of an offload).

:func:`select` picks the executor (``"auto"``, measured in ``docs/performance.md``): on CUDA
:class:`Graphed` with ``FusedLerp`` where Triton is available (else with ``lerp_``); on a
CPU :class:`Fused` where a C++ compiler is at hand (one pass against three eagerly without
compensation, about ten with), else :class:`Eager`.

>>> import torch
>>> from emakit._engine.plan import Foreach, Plan, Copy, Watch
>>> avg, src = torch.zeros(3), torch.ones(3)
>>> plan = Plan([Foreach([avg], [src])], [], Copy(), [], Watch([], []))
>>> Eager().run(plan, 0.25); avg
tensor([0.2500, 0.2500, 0.2500])
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from ..config import EXECUTORS
from . import kernels
from .plan import Kernel, Offload, Op, Plan, Weight

__all__ = ["Executor", "Eager", "Fused", "Graphed", "select", "shared_fused", "REGISTRY"]

_log = logging.getLogger(__name__)

_fused: kernels.FusedLerp | None = None


def shared_fused() -> kernels.FusedLerp:
    """The process's ``FusedLerp``: every store shares its compiled kernels."""
    global _fused
    if _fused is None:
        _fused = kernels.FusedLerp()
    return _fused


def _on(weight: Weight, device: torch.device, cache: dict) -> Weight:
    if not isinstance(weight, Tensor) or weight.device == device:
        return weight
    if device not in cache:
        cache[device] = weight.to(device, non_blocking=True)
    return cache[device]


def _finish(offloads: list[Offload], events: list, weight: Weight) -> None:
    """Worker thread: wait for the device-to-host copies, then the CPU arithmetic."""
    with torch.no_grad():
        for event in events:
            event.synchronize()
        for off in offloads:
            for op in off.ops:
                op.run(weight)


class Executor:
    """Runs plans with ``self.kernel`` (the eager ``lerp_`` unless a subclass says
    otherwise); owns the offload worker. :class:`Eager`, :class:`Fused` and :class:`Graphed`
    are its siblings."""

    #: whether plans for this executor convert sources through staging buffers
    stage = True

    def __init__(self) -> None:
        self.kernel: Kernel = kernels.lerp_
        self._future: Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._warned = False

    @torch.no_grad()
    def run(self, plan: Plan, weight: Weight) -> None:
        """One update: ``avg <- avg + weight * (src - avg)``; ``copy`` entries take the
        source. May return before offloaded work is done."""
        self._wait_host(at_update=True)
        cache: dict = {}
        self._main(plan, weight, cache)
        if plan.offloads:
            self._offload(plan.offloads, weight)
        plan.copy.run()

    def _main(self, plan: Plan, weight: Weight, cache: dict) -> None:
        _run_ops(plan.main, weight, self.kernel, cache)

    @torch.no_grad()
    def copy(self, plan: Plan) -> None:
        """Only the ``copy`` entries (an update that skips the average keeps buffers fresh)."""
        plan.copy.run()

    def _offload(self, offloads: list[Offload], weight: Weight) -> None:
        events = []
        host_weight: Weight = weight
        if isinstance(weight, Tensor) and weight.device.type == "cuda":
            host_weight = torch.empty((), dtype=weight.dtype, pin_memory=True)
            host_weight.copy_(weight, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(weight.device))
            events.append(event)
        for off in offloads:
            # on the current stream: the copies are ordered before the next optimizer step
            off.launch()
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(off.device))
            events.append(event)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emakit")
        self._future = self._pool.submit(_finish, offloads, events, host_weight)

    def _wait_host(self, at_update: bool = False) -> None:
        future, self._future = self._future, None
        if future is None:
            return
        if at_update and not self._warned and not future.done():
            self._warned = True
            warnings.warn(
                "device='cpu': the previous update's CPU arithmetic was still running when "
                "this update began, so the training step now waits for it; update less "
                "often (e.g. update_interval='10ba') or keep the average on the GPU "
                "(see docs/performance.md)",
                RuntimeWarning,
                stacklevel=4,
            )
        future.result()

    def synchronize(self) -> None:
        """Wait for the CPU arithmetic of an offload (a no-op when nothing is pending)."""
        self._wait_host()

    def __del__(self) -> None:
        # Pending work must not outlive the buffers it writes.
        try:
            self.synchronize()
        except Exception:  # at interpreter exit, or a failed update already raised
            pass


def _replay(ops: list[Op], kernel: Kernel, weight: Tensor) -> None:
    """What a CUDA graph captures: every operation of one device, with a tensor weight."""
    _run_ops(ops, weight, kernel, {})


def _run_ops(ops: Iterable[Op], weight: Weight, kernel: Kernel, cache: dict) -> None:
    for op in ops:
        op.run(_on(weight, op.device, cache), kernel)


class Eager(Executor):
    """Runs plans with the eager ``lerp_`` (``_foreach`` chains)."""


class Fused(Executor):
    """Runs plans with the process's ``FusedLerp``: one pass per tensor, no staging."""

    stage = False

    def __init__(self) -> None:
        super().__init__()
        self.kernel = shared_fused()


class Graphed(Executor):
    """Replays the plan's CUDA operations from one CUDA graph per device.

    Args:
        fused: the captured kernel is the process's ``FusedLerp`` (else the eager
            ``lerp_``, with staging buffers for sources of another dtype).
    """

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.kernel = shared_fused() if fused else kernels.lerp_
        self.stage = not fused
        self.plan: Plan | None = None
        self.graphs: dict[torch.device, kernels.CUDAGraphUpdate] = {}
        self.rest: list[Op] = []  # operations not on a CUDA device: run directly

    def _prepare(self, plan: Plan) -> None:
        by_device: dict[torch.device, list[Op]] = {}
        self.rest = []
        for op in plan.main:
            if op.device.type == "cuda":
                by_device.setdefault(op.device, []).append(op)
            else:
                self.rest.append(op)
        kernel = self.kernel
        self.graphs = {
            device: kernels.CUDAGraphUpdate(functools.partial(_replay, ops, kernel), device)
            for device, ops in by_device.items()
        }
        self.plan = plan

    def _main(self, plan: Plan, weight: Weight, cache: dict) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            _run_ops(plan.main, weight, self.kernel, cache)  # joins the caller's graph
            return
        if plan is not self.plan:  # the store re-planned: the old graphs hold old addresses
            self._prepare(plan)
        for device, graph in list(self.graphs.items()):
            w = _on(weight, device, cache)
            if graph.graph is None:
                try:
                    graph.capture()  # runs the operations at weight 0 only: no change
                except Exception as e:  # capture unsupported here: launch directly
                    _log.warning("emakit: CUDA graph capture failed on %s (%s); updating "
                                 "without a graph", device, e)
                    self.rest += [op for op in plan.main if op.device == device]
                    del self.graphs[device]
                    continue
            graph.update(w)
        _run_ops(self.rest, weight, self.kernel, cache)


def _auto(devices: set[torch.device], compensated: bool) -> Executor:
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        return Graphed(fused=all(kernels.compiler_present(d) for d in cuda))
    if devices and all(kernels.compiler_present(d) for d in devices):
        return Fused()  # also uncompensated: the eager update is three passes (no overflow)
    return Eager()


def _graph(devices: set[torch.device], compensated: bool) -> Executor:
    cuda = [d for d in devices if d.type == "cuda"]
    return Graphed(fused=any(kernels.compiler_present(d) for d in cuda))


#: One factory per name of :data:`emakit.config.EXECUTORS`: ``(devices, compensated) ->
#: Executor``.
REGISTRY: dict[str, Callable[[set[torch.device], bool], Executor]] = {
    "auto": _auto,
    "eager": lambda devices, compensated: Eager(),
    "fused": lambda devices, compensated: Fused(),
    "graph": _graph,
}


def select(kind: str, devices: Iterable[torch.device], compensated: bool = False) -> Executor:
    """The executor ``kind`` names (one of :data:`emakit.config.EXECUTORS`) for averages on
    ``devices``.

    ``"auto"``: on CUDA a :class:`Graphed` with ``FusedLerp`` where Triton compiles (else
    with ``lerp_``); on a CPU :class:`Fused` where a C++ compiler is at hand, compensated or
    not (ResNet-50 compensated: 33 ms per update against 140 ms eagerly; plain: 1.6x a
    ``lerp_`` over one buffer against 2.6x eagerly; after a one-off compile of 5-15 s per
    dtype combination; tensors under 64Ki elements never compile), else :class:`Eager`.
    ``compensated`` no longer changes the choice (kept for callers). ``"fused"`` and
    ``"graph"`` fall back to the eager kernel where compiling is unavailable; ``"graph"``
    launches non-CUDA operations directly.

    >>> import torch
    >>> type(select("eager", [torch.device("cpu")])).__name__
    'Eager'
    >>> select("fast", [])
    Traceback (most recent call last):
    ...
    ValueError: executor: expected one of ('auto', 'eager', 'fused', 'graph'), got 'fast'
    """
    if kind not in REGISTRY:
        raise ValueError(f"executor: expected one of {EXECUTORS}, got {kind!r}")
    return REGISTRY[kind](set(devices), compensated)
