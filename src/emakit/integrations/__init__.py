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

from ..config import EMAConfig

__all__ = ["check_ema_arguments", "callback_arguments", "EVALUATE_WITH"]

EVALUATE_WITH = ("ema", "model", "both")


def check_ema_arguments(kwargs: dict[str, Any]) -> EMAConfig:
    """The :class:`~emakit.EMAConfig` of ``EMA(model, **kwargs)``, raising its
    ValueError/TypeError at the adapter's construction rather than when training starts.
    ``dur`` times may lack ``total`` here: adapters fill it from the trainer's planned length
    (``dataclasses.replace(config, total=...)``)."""
    return EMAConfig(**kwargs)


def callback_arguments(
    trainer: str, evaluate_with: str, allowed: tuple[str, ...] = EVALUATE_WITH, **ema_kwargs: Any
) -> dict[str, Any]:
    """Check a trainer callback's arguments at its construction and return the EMA keyword
    arguments. ``trainer`` names the trainer in messages; callbacks count optimizer steps and
    epochs, so times in samples or tokens are refused."""
    if evaluate_with not in allowed:
        raise ValueError(f"evaluate_with: expected one of {allowed}, got {evaluate_with!r}")
    config = check_ema_arguments(ema_kwargs)
    if config.start.unit in ("sp", "tok"):
        raise ValueError(
            f"start={str(config.start)!r}: the {trainer} callback counts optimizer steps and "
            "epochs, not samples or tokens"
        )
    return ema_kwargs
