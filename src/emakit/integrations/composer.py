r"""EMA for MosaicML Composer, as an ``Algorithm`` with the seed's arguments and events.

Weights are updated according to

.. math:: W_{ema}^{(t+1)} = s\,W_{ema}^{(t)} + (1 - s)\,W_{model}^{(t)},
          \qquad s = 2^{-\text{update\_interval} / \text{half\_life}}

at ``BATCH_END`` (``update_interval`` in ``ba``) or ``EPOCH_END`` (in ``ep``), from
``ema_start`` on. Evaluation (``EVAL_START`` to ``EVAL_END``, also within ``trainer.eval()``)
and prediction run on the averaged weights. At ``BATCH_CHECKPOINT``/``EPOCH_CHECKPOINT``,
when a ``CheckpointSaver`` is about to save, the averaged weights are put in the model, so the
checkpoint's model weights are the average; the algorithm's own state in that checkpoint holds
the training weights, which come back at the next ``BATCH_START`` and on resume.

Unlike the seed (``composer.algorithms.EMA``), buffers such as BatchNorm statistics are
averaged, evaluation does see the average, ``smoothing`` alone works, and the average is kept in
fp32 by default.

Example (not a doctest: Composer lives in its own environment)::

    from composer import Trainer
    from emakit.integrations.composer import EMA

    algorithm = EMA(half_life="1000ba", update_interval="1ba")
    trainer = Trainer(model=model, train_dataloader=train_dataloader,
                      eval_dataloader=eval_dataloader, max_duration="1ep",
                      algorithms=[algorithm], optimizers=[optimizer])
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from composer.callbacks.checkpoint_saver import CheckpointSaver
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from ..config import EMAConfig
from ._adapter import Average, Swap, adapter_config, build_average

__all__ = ["EMA"]

_HANDLED = {
    Event.INIT, Event.FIT_START, Event.BATCH_START, Event.BATCH_END, Event.EPOCH_END,
    Event.EVAL_START, Event.EVAL_END, Event.PREDICT_START, Event.PREDICT_END, Event.FIT_END,
}
_CHECKPOINT_EVENTS = {Event.BATCH_CHECKPOINT, Event.EPOCH_CHECKPOINT}


def _time_string(t: Any) -> str:
    """Composer ``Time`` -> emakit time string (units ba, ep, sp, tok, dur are shared)."""
    return f"{t.value}{t.unit.value}"


def _signature() -> inspect.Signature:
    """Composer's four arguments first (the seed's), then every other EMA keyword."""
    own = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (("half_life", None), ("smoothing", None),
                              ("ema_start", "0.0dur"), ("update_interval", None))
    ]
    rest = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                          annotation=f.type)
        for f in dataclasses.fields(EMAConfig)
        if f.name not in ("half_life", "smoothing", "start", "update_interval", "total")
    ]
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation="EMAConfig | BEMAConfig | PostHocEMAConfig | None")
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                              *own, config, *rest])


class EMA(Algorithm):
    """Maintains an exponential moving average of the model's weights (see the module doc).

    Args:
        half_life: time string (``ba`` or ``ep``, or ``dur`` of ``max_duration``); default
            ``"1000ba"`` unless ``smoothing`` is given. Giving both is a ValueError.
        smoothing: per-update factor in [0, 1], not adjusted by ``update_interval``.
        ema_start: time before which the average follows the model (default ``"0.0dur"``).
        update_interval: ``ba`` or ``ep``; default 1 unit of ``half_life``'s unit, or ``1ba``.
        **kwargs: every other argument of :class:`emakit.EMA` (``buffers``, ``dtype``,
            ``warmup``, ``skip_nonfinite``, ...), through :class:`~emakit.EMAConfig`;
            ``total`` is the Trainer's ``max_duration``.

    ``config=`` takes an :class:`~emakit.EMAConfig`, a :class:`~emakit.BEMAConfig` or a
    :class:`~emakit.PostHocEMAConfig` (then the algorithm drives a
    :class:`~emakit.PostHocEMA`, which evaluates and checkpoints its first profile and writes
    its snapshots as it goes) instead of the arguments.

    The average it drives is ``.ema`` (built at ``INIT``, or at ``FIT_START`` when a
    ``dur`` time needs ``max_duration`` given only to ``fit``).
    """

    def __init__(
        self,
        half_life: str | None = None,
        smoothing: float | None = None,
        ema_start: str = "0.0dur",
        update_interval: str | None = None,
        **kwargs: Any,
    ) -> None:
        for name in ("start", "total"):
            if name in kwargs:
                raise TypeError(
                    f"EMA (Composer): {name!r} is not an argument here: "
                    + ("the start is ema_start" if name == "start" else
                       "total comes from the Trainer's max_duration")
                )
        config = kwargs.pop("config", None)
        if config is not None:
            if (half_life, smoothing, ema_start, update_interval) != (None, None, "0.0dur", None):
                raise TypeError("EMA (Composer): pass either config or the EMA arguments, "
                                "not both")
            self.config = adapter_config("Composer", config, kwargs,
                                         counts=("ba", "ep", "sp", "tok"))
            # a BEMAConfig or PostHocEMAConfig has no half-life or smoothing
            half_life = getattr(config, "half_life", None)
            smoothing = getattr(config, "smoothing", None)
            ema_start, update_interval = config.start, config.update_interval
        else:
            self.config = adapter_config(
                "Composer", None,
                dict(half_life=half_life, smoothing=smoothing, start=ema_start,
                     update_interval=update_interval, **kwargs),
                counts=("ba", "ep", "sp", "tok"),
            )
        self.half_life = half_life
        self.smoothing = smoothing
        self.ema_start = ema_start
        self.update_interval = update_interval
        self.ema: Average | None = None
        self._pending: dict[str, Any] | None = None
        self._swap = Swap()
        self._training_weights: dict[str, torch.Tensor] | None = None  # during a checkpoint

    def __repr__(self) -> str:
        return (
            f"EMA(half_life={self.half_life!r}, smoothing={self.smoothing!r}, "
            f"ema_start={self.ema_start!r}, update_interval={self.update_interval!r})"
        )

    # building ----------------------------------------------------------------------------

    def _build(self, state: State) -> None:
        if self.ema is None:
            config = self.config
            if state.max_duration is not None:
                config = dataclasses.replace(config, total=_time_string(state.max_duration))
            elif config.uses_dur():
                return  # max_duration comes with fit(): build at FIT_START
            self.ema = build_average(state.model, config)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    # events ------------------------------------------------------------------------------

    def match(self, event: Event, state: State) -> bool:
        if event in _CHECKPOINT_EVENTS:
            if self.ema is None or not self.ema.started:
                return False
            return any(
                cb.save_interval(state, event)
                for cb in state.callbacks
                if isinstance(cb, CheckpointSaver) and callable(cb.save_interval)
            )
        return event in _HANDLED

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event in (Event.INIT, Event.FIT_START):
            self._build(state)
            if event == Event.FIT_START and self.ema is None:
                raise ValueError(
                    "EMA: a 'dur' time needs max_duration; give it to the Trainer or to fit()"
                )
            return
        if self.ema is None:
            return
        if event == Event.BATCH_START:
            self._release()
        elif event == Event.BATCH_END:
            now, before = state.timestamp, state.previous_timestamp
            samples = tokens = None
            if before is not None:
                samples = int(now.sample.value - before.sample.value)
                tokens = int(now.token.value - before.token.value)
            self.ema.step(samples=samples, tokens=tokens)
        elif event == Event.EPOCH_END:
            self.ema.epoch_end()
        elif event in (Event.EVAL_START, Event.PREDICT_START):
            self._release()
            self._swap.enter(self.ema)
        elif event in (Event.EVAL_END, Event.PREDICT_END, Event.FIT_END):
            self._release()
        elif event in _CHECKPOINT_EVENTS:
            self._release()
            model = self.ema.model
            self._training_weights = {
                k: v.detach().clone() for k, v in model.state_dict().items()
            }
            self._swap.enter(self.ema)

    def _release(self) -> None:
        """Training weights back in the model (bitwise), if a swap is active."""
        self._swap.close()
        self._training_weights = None

    # checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        elif self._pending is not None:
            state.update(self._pending)
        if self._training_weights is not None:
            # The checkpoint's model weights are the average: keep the training weights here.
            state["training_weights"] = self._training_weights
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        if "ema" not in state:
            return
        if self.ema is None:
            self._pending = dict(state)
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        assert self.ema is not None
        self._release()
        self.ema.load_state_dict(state["ema"])
        if state.get("training_weights") is not None:
            # Composer has loaded the checkpoint's model weights (the average) already.
            self.ema.model.load_state_dict(state["training_weights"])


EMA.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
