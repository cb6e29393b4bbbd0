"""Executors: how a plan runs.

:class:`Eager` runs a :class:`~emakit.plan.Plan` with eager kernels:

- ``plan.main`` on the current stream;
- ``plan.side`` (``side_stream=True``, CUDA parameters) on a per-device
  :class:`~emakit.streams.SideStream`, which waits for the training stream before it starts
  and is joined before every ``torch.optim`` step and before the average is read;
- ``plan.offloads`` (a CPU average of a CUDA model): non-blocking copies into pinned host
  buffers, an event, and the CPU arithmetic on a worker thread, so the training loop does
  not wait for it; the next update, and :meth:`Eager.synchronize`, wait for the worker.

A weight (``1 - smoothing``) is a float or a 0-d tensor; a tensor is moved to each
operation's device without a host synchronization (non-blocking; through a pinned host
scalar for the CPU arithmetic of an offload).
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from .plan import Offload, Plan, Weight
from .streams import SideStream

__all__ = ["Eager"]


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


class Eager:
    """Runs plans with eager kernels; owns the side streams and the offload worker."""

    def __init__(self) -> None:
        self.sides: dict[torch.device, SideStream] = {}
        self._future: Future | None = None
        self._pool: ThreadPoolExecutor | None = None

    @torch.no_grad()
    def run(self, plan: Plan, weight: Weight) -> None:
        """One update: ``avg <- avg + weight * (src - avg)``; ``copy`` entries take the
        source. May return before side-stream or offloaded work is done."""
        self._wait_host()
        cache: dict = {}
        for device, ops in plan.side.items():
            side = self._side(device)
            with side.launch() as stream:
                for op in ops:
                    w = _on(weight, op.device, cache)
                    if isinstance(w, Tensor):  # the caller may free it before the stream runs
                        w.record_stream(stream)
                    op.run(w)
        for op in plan.main:
            op.run(_on(weight, op.device, cache))
        if plan.offloads:
            self._offload(plan.offloads, weight)
        plan.copy.run()

    @torch.no_grad()
    def copy(self, plan: Plan) -> None:
        """Only the ``copy`` entries (an update that skips the average keeps buffers fresh)."""
        plan.copy.run()

    def _side(self, device: torch.device) -> SideStream:
        if device not in self.sides:
            self.sides[device] = SideStream(device)
        return self.sides[device]

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
            if off.side:
                side = self._side(off.device)
                with side.launch():
                    off.launch()
                events.append(side.done)
            else:
                off.launch()
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(off.device))
                events.append(event)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emakit")
        self._future = self._pool.submit(_finish, offloads, events, host_weight)

    def _wait_host(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            future.result()

    def synchronize(self) -> None:
        """Order every pending update before what comes next: the current CUDA streams wait
        for the side streams (on the device, the host is not blocked) and the host waits for
        the CPU arithmetic of an offload. A no-op when nothing is pending."""
        self._wait_host()
        for side in self.sides.values():
            side.join()

    def __del__(self) -> None:
        # Pending work must not outlive the buffers it writes.
        with contextlib.suppress(Exception):
            self.synchronize()
