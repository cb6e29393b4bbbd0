"""Thin adapters that drive :class:`emakit.EMA` from trainers.

One module per trainer; each imports its trainer, so import the one you use:

- ``emakit.integrations.lightning``: ``EMACallback`` for ``lightning.pytorch.Trainer``
- ``emakit.integrations.transformers``: ``EMACallback`` for ``transformers.Trainer``
- ``emakit.integrations.composer``: ``EMA``, a Composer ``Algorithm``

Accelerate needs no adapter: build ``emakit.EMA`` on the prepared model (wrappers are seen
through) and register it with ``accelerator.register_for_checkpointing(ema)``.
Nothing in the core imports this package.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from torch import nn

from ..ema import EMA
from ..time import Time

__all__ = ["check_ema_arguments", "atomic_torch_save"]


def check_ema_arguments(kwargs: dict[str, Any]) -> None:
    """Raise the ValueError/TypeError that ``EMA(model, **kwargs)`` would, at the adapter's
    construction rather than when training starts. ``dur`` times may lack ``total`` here:
    adapters fill it from the trainer's planned length."""
    probe = dict(kwargs)
    uses_dur = any(
        probe.get(name) is not None and Time.parse(probe[name], name).unit == "dur"
        for name in ("half_life", "start")
    )
    if uses_dur and probe.get("total") is None:
        probe["total"] = "1ba"
    EMA(nn.Linear(1, 1), **probe)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed, then renamed over
    ``path``: a reader sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
