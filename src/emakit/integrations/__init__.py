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

from typing import Any

from torch import nn

from ..ema import EMA
from ..time import Time

__all__ = ["check_ema_arguments"]


def check_ema_arguments(kwargs: dict[str, Any], owner: str) -> None:
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
    try:
        EMA(nn.Linear(1, 1), **probe)
    except TypeError as err:
        if "unexpected keyword argument" in str(err):
            raise TypeError(f"{owner}: {err}".replace("__init__()", "EMA()")) from None
        raise
