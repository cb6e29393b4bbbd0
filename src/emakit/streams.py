"""Asynchronous updates on CUDA: a side stream for the arithmetic, and joins.

An EMA update only reads the training weights, so on a GPU it can run on a side stream
(:class:`torch.cuda.Stream`) beside the next forward and backward pass. Correctness needs two
orderings, both made on the device without blocking the host:

- the side stream waits for the training stream (the optimizer step that wrote the weights)
  before the update starts: :meth:`SideStream.launch`;
- the training stream waits for the update before anything writes the weights again, or
  reads the average: :meth:`SideStream.join`. Joins happen before every ``torch.optim``
  optimizer step (a global optimizer step pre-hook, registered once), and before the EMA
  swaps, exports, loads or saves.

The kernels are the ones of the plain path, so the results are bitwise the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["SideStream", "join_all"]

_pending: weakref.WeakSet[SideStream] = weakref.WeakSet()
_hook_handle = None


def join_all() -> None:
    """Make the current streams wait for every pending EMA update (device-side, no host
    sync). Runs before every ``torch.optim`` optimizer step."""
    for side in list(_pending):
        side.join()


def _before_optimizer_step(optimizer, args, kwargs) -> None:  # noqa: ARG001
    join_all()


def _ensure_hook() -> None:
    global _hook_handle
    if _hook_handle is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _hook_handle = register_optimizer_step_pre_hook(_before_optimizer_step)


class SideStream:
    """A CUDA stream for EMA updates on one device, with the event that ends the last one."""

    def __init__(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"device: a side stream needs a CUDA device, got {device}")
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.done: torch.cuda.Event | None = None
        _ensure_hook()

    @contextmanager
    def launch(self) -> Iterator[torch.cuda.Stream]:
        """Run the block's kernels on the side stream, after all work queued so far on the
        current stream; record the end event after it."""
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            yield self.stream
        self.done = torch.cuda.Event()
        self.done.record(self.stream)
        _pending.add(self)

    def join(self) -> None:
        """The current stream waits (on the device) for the last launched update."""
        if self.done is not None:
            torch.cuda.current_stream(self.device).wait_event(self.done)
            self.done = None
        _pending.discard(self)
