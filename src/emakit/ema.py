"""EMA: the exponential moving average, a face of the :class:`~emakit.averager.Averager`
with the :class:`~emakit.laws.Exponential` law."""

from __future__ import annotations

from typing import Any

from torch import nn

from .averager import Averager, EMAModule
from .config import EMAConfig, EMAOptions, Unpack
from .laws import Exponential
from .time import Time

__all__ = ["EMA", "EMAModule"]


class EMA(Averager):
    r"""An exponential moving average of a model's weights, driven by the training loop.

    Each update computes, for every trainable parameter and floating buffer,

    .. math:: \bar\theta \leftarrow s\,\bar\theta + (1 - s)\,\theta

    in the storage ``dtype`` (fp32 by default, also for bf16 models). With a half-life
    ``h`` and an update interval ``u`` (same unit, or converted with ``batches_per_epoch``)
    the smoothing is ``s = 2 ** (-u / h)``. At the first ``step()`` (or ``epoch_end()``, for
    an interval in epochs) on or after ``start`` the average is set to the model's weights
    (with ``copy_at_construction=True``: when the EMA is built); from then on it is updated
    whenever the batch (epoch) count is a multiple of the interval (with
    ``update_phase="start"``: every interval after that start copy). Before that, every export
    gives the model's own weights.

    Args:
        model: the model being trained (DDP and ``torch.compile`` wrappers are seen through).
            Build the EMA after moving the model to its device.
        config: an :class:`~emakit.EMAConfig`, or its fields as keyword arguments (see there
            for each: ``half_life``, ``smoothing``, ``start``, ``copy_at_construction``,
            ``update_interval``, ``update_phase``, ``total``, ``batches_per_epoch``,
            ``warmup``, ``skip_nonfinite``, ``switch_every``, ``grad_scaler`` and the
            storage: ``buffers``, ``dtype``, ``device``, ``compensated``, ``side_stream``,
            ``shard``, ``exclude``, ``include``, ``executor``).

    Training time: ``k`` counts the interval's units (batches for ``"ba"``) from the start,
    the start being k = 1. The start copies the model (update 1, counted in
    ``num_updates``); an update covering k = a..b uses the product of the per-unit factors
    ``s_k`` (``2 ** (-1 / half_life)``, capped by the warmup at each k), so the averaging
    horizon does not depend on the interval. A smoothing schedule is instead called with
    the number of the update it is for (2 for the first averaging update).

    Under FSDP2 (DTensor parameters) or with ``shard=True`` construction is a collective:
    every rank must build its EMA over the same model, or every rank gets a ValueError naming
    the rank that differs. A DDP model without ``shard`` needs no communication at all.

    Example:
        >>> import torch, emakit
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> ema = emakit.EMA(model, half_life="10ba")
        >>> for _ in range(20):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 4)).square().mean().backward()
        ...     opt.step()
        ...     ema.step()
        >>> ema.num_updates  # the start copy at the first step, then 19 updates
        20
        >>> with ema.swapped():
        ...     averaged_out = model(torch.ones(1, 4))
    """

    def __init__(
        self, model: nn.Module, config: EMAConfig | None = None, **kwargs: Unpack[EMAOptions]
    ) -> None:
        config = EMAConfig.resolve(config, dict(kwargs), type(self).__name__)
        config.require_total()
        law = Exponential(
            per_unit=config.max_smoothing(),
            warmup=config.warmup,
            schedule=config.smoothing if callable(config.smoothing) else None,
        )
        super().__init__(model, config, [law])
        self.config: EMAConfig = config
        self._constructed()

    @property
    def half_life(self) -> Time | None:
        """The half-life (``"1000ba"`` when neither it nor ``smoothing`` was given)."""
        return self.config.effective_half_life

    @property
    def start(self) -> Time:
        return self.config.start

    @property
    def total(self) -> Time | None:
        return self.config.total

    @property
    def batches_per_epoch(self) -> int | None:
        return self.config.batches_per_epoch

    @property
    def warmup(self) -> Any:
        return self.config.warmup

    @property
    def skip_nonfinite(self) -> bool:
        return self.config.skip_nonfinite

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loads with ``torch.load(weights_only=True)``.

        Format (version 2): ``version``, ``config`` (how it was made, for a warning on
        mismatch: half-life, interval, start and the smoothing law), ``clock`` (batch, epoch,
        sample and token counts), ``num_updates`` (the start copy counted),
        ``skipped_updates``, ``started``, ``origin`` and ``k`` (the warmup's training time:
        the clock count at which k = 1, and the k the average was last brought to) and
        ``average``: name -> averaged tensor in the storage dtype, and with
        ``compensated=True`` ``compensation``: name -> the compensation term (the exact
        average is ``average + compensation``). A state without it loads with a zero
        compensation; a compensation is ignored by an EMA built with ``compensated=False``.
        Version 1 states (emakit 0.1) load too."""
        return super().state_dict()

    def _config_record(self) -> dict[str, Any]:
        h = self.half_life
        return {
            "half_life": None if h is None else str(h),
            **super()._config_record(),
            "law": self._laws[0].describe(),
        }

    def __repr__(self) -> str:
        how = str(self.half_life) if self.half_life else f"smoothing={self.config.smoothing}"
        return (
            f"{type(self).__name__}({how}, start={self.start}, "
            f"update_interval={self.update_interval}, num_updates={self.num_updates}, "
            f"started={self.started})"
        )
