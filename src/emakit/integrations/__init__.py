"""Thin adapters that drive an average of emakit from trainers.

One module per trainer; each imports its trainer, so import the one you use:

- ``emakit.integrations.lightning``: ``EMACallback`` for ``lightning.pytorch.Trainer``
- ``emakit.integrations.transformers``: ``EMACallback`` for ``transformers.Trainer``, and
  ``EMATrainer``/``EMATrainerMixin``
- ``emakit.integrations.composer``: ``EMA``, a Composer ``Algorithm``
- ``emakit.integrations.accelerate``: ``register(accelerator, ema)``, the average in
  ``save_state``/``load_state`` through emakit's safe state file

Each takes the arguments of the average through a configuration (a ``config=`` or the
:class:`~emakit.EMAConfig` fields as keyword arguments), so every argument of
:class:`emakit.EMA` reaches every trainer; ``config=BEMAConfig(...)`` makes an adapter drive a
:class:`~emakit.BEMA`, ``config=PostHocEMAConfig(...)`` a :class:`~emakit.PostHocEMA`
(evaluated on its first profile). What the adapters share is in ``_adapter``.
Nothing in the core imports this package.
"""

from __future__ import annotations

from ._adapter import (
    EVALUATE_WITH,
    STATE_FILE,
    AdapterConfig,
    adapter_config,
    build_average,
    with_total,
)

__all__ = ["AdapterConfig", "adapter_config", "with_total", "build_average", "EVALUATE_WITH",
           "STATE_FILE"]
