"""Thin adapters that drive :class:`emakit.EMA` from trainers.

One module per trainer; each imports its trainer, so import the one you use:

- ``emakit.integrations.lightning``: ``EMACallback`` for ``lightning.pytorch.Trainer``
- ``emakit.integrations.transformers``: ``EMACallback`` for ``transformers.Trainer``, and
  ``EMATrainer``/``EMATrainerMixin``
- ``emakit.integrations.composer``: ``EMA``, a Composer ``Algorithm``

Each takes the EMA arguments through :class:`~emakit.EMAConfig` (a ``config=`` or its fields
as keyword arguments), so every argument of :class:`emakit.EMA` reaches every trainer.
A ``config=BEMAConfig(...)`` makes an adapter drive a :class:`~emakit.BEMA` instead.
Accelerate needs no adapter: build ``emakit.EMA`` on the prepared model (wrappers are seen
through) and carry it through ``save_state``/``load_state`` with the save and load hooks of
``docs/integrations.md`` (emakit's own safe file, not ``register_for_checkpointing``, whose
``load_state`` unpickles).
Nothing in the core imports this package.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .. import BEMA, EMA, BEMAConfig, EMAConfig

__all__ = ["AdapterConfig", "adapter_config", "with_total", "build_average", "EVALUATE_WITH"]

EVALUATE_WITH = ("ema", "model")

#: The configurations an adapter drives: an EMA's or a BEMA's.
AdapterConfig = EMAConfig | BEMAConfig


def adapter_config(
    trainer: str,
    config: AdapterConfig | None,
    kwargs: dict[str, Any],
    counts: tuple[str, ...] = ("ba", "ep"),
) -> AdapterConfig:
    """The configuration of a trainer adapter, checked at the adapter's construction rather
    than when training starts: ``config`` (an :class:`~emakit.EMAConfig` or
    :class:`~emakit.BEMAConfig`) or an :class:`~emakit.EMAConfig` of ``kwargs``. ``dur``
    times may lack ``total`` here (see :func:`with_total`). ``counts``: the units the adapter
    can count; a ``start`` (or a ``total`` for ``dur`` times) in another unit is refused,
    naming ``trainer``."""
    if config is None:
        config = EMAConfig(**kwargs)
    elif kwargs:
        raise TypeError(f"{trainer} adapter: pass either config or keyword arguments, not "
                        f"both (got config and {sorted(kwargs)})")
    elif not isinstance(config, (EMAConfig, BEMAConfig)):
        raise TypeError(f"config: expected an emakit.EMAConfig or emakit.BEMAConfig, got "
                        f"{type(config).__name__}")
    for name in ("start", "total"):
        t = getattr(config, name)
        if t is not None and t.unit in ("sp", "tok") and t.unit not in counts:
            raise ValueError(
                f"{name}={str(t)!r}: the {trainer} adapter counts "
                f"{' and '.join(counts)}, not {'samples' if t.unit == 'sp' else 'tokens'}"
            )
    return config


def with_total(config: AdapterConfig, total: str) -> AdapterConfig:
    """``config`` with ``total`` set to the trainer's planned length ``total`` when a ``dur``
    time needs it and none was given; then checked as :class:`emakit.EMA` checks it."""
    if config.total is None and config.uses_dur():
        config = dataclasses.replace(config, total=total)
    config.require_total()
    return config


def build_average(model: Any, config: AdapterConfig) -> EMA | BEMA:
    """The average an adapter drives: a :class:`~emakit.BEMA` for a
    :class:`~emakit.BEMAConfig`, else an :class:`~emakit.EMA`."""
    if isinstance(config, BEMAConfig):
        return BEMA(model, config=config)
    return EMA(model, config=config)
