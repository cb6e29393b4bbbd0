r"""EMA for Lightning: ``Trainer(callbacks=[EMACallback(half_life="1000ba")])``.

After every optimizer step (so ``accumulate_grad_batches`` counts one step per
accumulated batch group) the callback calls :meth:`emakit.EMA.step`, which applies

.. math:: \bar\theta \leftarrow s\,\bar\theta + (1 - s)\,\theta,
          \qquad s = 2^{-\text{update\_interval} / \text{half\_life}}

and counts epochs with :meth:`emakit.EMA.epoch_end` (before the epoch-end validation).
Validation and test run on the averaged weights by default; the Lightning checkpoint holds the
EMA state, so ``trainer.fit(ckpt_path=...)`` resumes it exactly.

Example:
    >>> import lightning.pytorch as pl
    >>> from emakit.integrations.lightning import EMACallback
    >>> ema_cb = EMACallback(half_life="100ba", start="10ba")
    >>> trainer = pl.Trainer(max_steps=10, callbacks=[ema_cb], logger=False,
    ...                      enable_checkpointing=False, enable_progress_bar=False)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size

from .. import BEMA, EMA
from ..config import EMAConfig, EMAOptions, Unpack
from . import EVALUATE_WITH, AdapterConfig, adapter_config, build_average, with_total

__all__ = ["EMACallback", "TRAINING_WEIGHTS_KEY"]

#: Checkpoint key holding the training weights when ``save_ema_weights=True`` put the
#: averaged ones under ``"state_dict"``.
TRAINING_WEIGHTS_KEY = "emakit_training_state_dict"


class EMACallback(pl.Callback):
    """Keeps an :class:`emakit.EMA` of the LightningModule's weights during ``fit``.

    Args:
        config: an :class:`~emakit.EMAConfig`, or its fields as keyword arguments: every
            argument of :class:`emakit.EMA`. Times in ``ba`` count optimizer steps, ``ep``
            epochs, ``sp`` the samples of all ranks (Lightning's ``extract_batch_size`` of
            each micro-batch, summed), ``tok`` what ``count_tokens`` returns. A ``dur`` time
            without ``total`` takes ``total`` from ``trainer.estimated_stepping_batches``.
        evaluate_with: ``"ema"`` (validation, test and predict on the averaged weights) or
            ``"model"`` (on the training weights). Before the EMA has started, ``"ema"``
            evaluates the model itself. To log both in one pass, keep ``"model"`` and compute
            the averaged model's metrics in your ``validation_step`` with
            ``ema_cb.ema.module(x)`` (no swap; see docs/integrations.md).
        save_ema_weights: write the averaged weights as the checkpoint's ``"state_dict"``
            (what ``Module.load_from_checkpoint`` and ``trainer.test(ckpt_path=...)`` load),
            keeping the training weights under ``checkpoint["emakit_training_state_dict"]``;
            ``trainer.fit(ckpt_path=...)`` puts the training weights back and trains on.
        copy_on_fit_end: at the end of ``fit``, copy the averaged weights into the model.
        count_tokens: ``callable(batch) -> int``, the tokens in a micro-batch (e.g.
            ``lambda b: int(b["attention_mask"].sum())``); needed for times in ``tok``.

    The :class:`emakit.EMA` is built at ``on_fit_start`` (after the strategy has moved the
    model to its device) and exposed as ``.ema``.

    Checkpoints: the EMA state is the callback's state in the Lightning checkpoint, restored
    by ``fit``, ``validate``, ``test`` and ``predict`` with ``ckpt_path=...``. A ``fit``
    resumed from a checkpoint without it warns once and restarts the average from the loaded
    weights, its clock at the trainer's step and epoch (so ``start`` and ``dur`` times keep
    their meaning); a ``validate``/``test`` of such a checkpoint warns that it evaluates the
    checkpoint's own weights.
    """

    def __init__(
        self,
        config: AdapterConfig | None = None,
        *,
        evaluate_with: str = "ema",
        save_ema_weights: bool = False,
        copy_on_fit_end: bool = False,
        count_tokens: Callable[[Any], int] | None = None,
        **kwargs: Unpack[EMAOptions],
    ) -> None:
        super().__init__()
        if evaluate_with not in EVALUATE_WITH:
            raise ValueError(
                f"evaluate_with: expected one of {EVALUATE_WITH}, got {evaluate_with!r}"
                + (" (to log both, see the class docstring)" if evaluate_with == "both" else "")
            )
        if count_tokens is not None and not callable(count_tokens):
            raise TypeError(f"count_tokens: expected callable(batch) -> int, got {count_tokens!r}")
        counts = ("ba", "ep", "sp") + (("tok",) if count_tokens is not None else ())
        self.config = adapter_config("Lightning", config, dict(kwargs), counts=counts)
        self.count_tokens = count_tokens
        # sp/tok times need the counts each step: summed over micro-batches and ranks
        units = {self.config.start.unit}
        if self.config.total is not None and self.config.uses_dur():
            units.add(self.config.total.unit)
        self._counting = bool(units & {"sp", "tok"})
        self._samples = self._tokens = 0
        self.evaluate_with = evaluate_with
        self.save_ema_weights = bool(save_ema_weights)
        self.copy_on_fit_end = bool(copy_on_fit_end)
        self.ema: EMA | BEMA | None = None
        self._pending: dict[str, Any] | None = None
        self._restored = False  # an EMA state came from this run's ckpt_path
        self._warned = False
        self._last_global_step = 0
        self._epoch_counted = False
        self._swap = contextlib.ExitStack()

    @property
    def state_key(self) -> str:
        """Distinct per configuration, so that two EMA callbacks can share a checkpoint (the
        same key as emakit 0.1 wrote for the same arguments)."""
        c = self.config
        smoothing: float | str | None = 0.0  # a BEMA: 0.1 recorded its schedule as 0.0
        half_life = None
        if isinstance(c, EMAConfig):
            h = c.effective_half_life
            half_life = None if h is None else str(h)
            s = c.smoothing
            smoothing = s if s is None or isinstance(s, (int, float)) else type(s).__name__
        return self._generate_state_key(
            half_life=half_life, smoothing=smoothing, start=str(c.start),
            update_interval=str(c.interval),
        )

    # building the EMA --------------------------------------------------------------------

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EMA | BEMA:
        config = self.config
        if config.total is None and config.uses_dur():
            steps = trainer.estimated_stepping_batches
            if not isinstance(steps, int) and not float(steps).is_integer():
                raise ValueError(
                    "total: a 'dur' time needs the training length; the trainer cannot "
                    "estimate it (set max_steps or pass total)"
                )
            config = with_total(config, f"{int(steps)}ba")
        return build_average(pl_module, config)

    def _ensure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> EMA | BEMA:
        # Validate/test hooks run under torch.inference_mode: an average allocated there
        # would be inference tensors, which a later load or update may not write.
        with torch.inference_mode(False):
            if self.ema is None or self.ema.model is not pl_module:
                self.ema = self._build(trainer, pl_module)
            if self._pending is not None:
                self.ema.load_state_dict(self._pending)
                self._pending = None
        return self.ema

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restored = False  # checkpoints are restored after setup, whatever the stage
        self._warned = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        if trainer.ckpt_path is not None and not self._restored:
            ema = self._ensure(trainer, pl_module)
            ema.resume_at(step=trainer.global_step, epoch=trainer.current_epoch)
            warnings.warn(
                f"emakit: {trainer.ckpt_path} holds no state of this EMACallback "
                f"(state_key {self.state_key!r}): the average restarts from the loaded weights, "
                f"its clock at step {trainer.global_step}, epoch {trainer.current_epoch} "
                "(start and dur times keep their meaning)",
                RuntimeWarning,
                stacklevel=2,
            )

    # the loop ----------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_counted = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        assert self.ema is not None
        if self._counting:
            self._samples += extract_batch_size(batch)
            if self.count_tokens is not None:
                self._tokens += int(self.count_tokens(batch))
        # global_step counts optimizer steps: with gradient accumulation it moves once per
        # accumulated group, and the EMA with it.
        if trainer.global_step > self._last_global_step:
            self._last_global_step = trainer.global_step
            samples = tokens = None
            if self._counting:
                counts = torch.tensor([self._samples, self._tokens], device=pl_module.device)
                counts = trainer.strategy.reduce(counts, reduce_op="sum")  # all ranks' batches
                samples, tokens = (int(v) for v in counts.tolist())
                self._samples = self._tokens = 0
            self.ema.step(samples=samples, tokens=None if self.count_tokens is None else tokens)
        # Count the epoch here, on its last batch, so that the epoch-end validation (which
        # Lightning runs before on_train_epoch_end) already sees the epoch's update.
        if trainer.is_last_batch and not self._epoch_counted:
            self._epoch_counted = True
            self.ema.epoch_end()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is not None and not self._epoch_counted:  # e.g. data of unknown length
            self._epoch_counted = True
            self.ema.epoch_end()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.copy_on_fit_end and self.ema is not None and self.ema.started:
            self.ema.copy_to()

    # evaluation --------------------------------------------------------------------------

    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ema = self._ensure(trainer, pl_module)
        if (
            trainer.state.fn != TrainerFn.FITTING
            and trainer.ckpt_path is not None
            and not self._restored
            and not self._warned
            and self.evaluate_with == "ema"
        ):
            warnings.warn(
                f"emakit: {trainer.ckpt_path} holds no state of this EMACallback "
                f"(state_key {self.state_key!r}): {getattr(trainer.state.fn, 'value', '')} "
                "runs on the "
                "checkpoint's own weights",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned = True  # once per run
        if self.evaluate_with == "ema":
            self._swap.enter_context(ema.swapped())

    def _eval_end(self) -> None:
        self._swap.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._swap.close()  # training weights back whatever happened

    # checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {} if self._pending is None else {"ema": self._pending}
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "ema" not in state_dict:
            return
        self._restored = True
        if self.ema is not None:
            self.ema.load_state_dict(state_dict["ema"])
        else:  # restored before on_fit_start: load once the EMA exists
            self._pending = state_dict["ema"]

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not self.save_ema_weights or self.ema is None or not self.ema.started:
            return
        training = checkpoint["state_dict"]
        averaged = self.ema.ema_state_dict()
        if set(averaged) != set(training):
            raise RuntimeError(
                "save_ema_weights: the checkpoint's state_dict does not have the module's names "
                "(a sharded strategy?); use save_ema_weights=False"
            )
        checkpoint[TRAINING_WEIGHTS_KEY] = training
        checkpoint["state_dict"] = averaged

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has just loaded checkpoint["state_dict"] into the module: when that holds
        # the averaged weights, put the training weights back before training resumes.
        if TRAINING_WEIGHTS_KEY in checkpoint and trainer.state.fn == TrainerFn.FITTING:
            pl_module.load_state_dict(checkpoint[TRAINING_WEIGHTS_KEY])
