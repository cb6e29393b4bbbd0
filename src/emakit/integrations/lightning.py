r"""EMA for Lightning: ``Trainer(callbacks=[EMACallback(half_life="1000ba")])``.

After every optimizer step (so ``accumulate_grad_batches`` counts one step per
accumulated batch group) the callback calls :meth:`emakit.EMA.step`, which applies

.. math:: \bar\theta \leftarrow s\,\bar\theta + (1 - s)\,\theta,
          \qquad s = 2^{-\text{update\_interval} / \text{half\_life}}

and counts epochs with :meth:`emakit.EMA.epoch_end` (before the epoch-end validation).
Validation and test run on the averaged weights by default; the Lightning checkpoint holds the
EMA state, so ``trainer.fit(ckpt_path=...)`` resumes it exactly, and its ``"state_dict"`` holds
the averaged weights (``save_ema_weights=True``), so ``Model.load_from_checkpoint(best)``
returns the weights that were measured. After every step it logs ``ema/smoothing``,
``ema/num_updates`` and ``ema/skipped_updates`` with ``pl_module.log``. Under
``FSDPStrategy`` the average is of the ``FullyShardedDataParallel`` root the strategy wraps the
module in; under ``ModelParallelStrategy`` (FSDP2) of the module's DTensor shards.

Example:
    >>> import lightning.pytorch as pl
    >>> from emakit.integrations.lightning import EMACallback
    >>> ema_cb = EMACallback(half_life="100ba", start="10ba")
    >>> trainer = pl.Trainer(max_steps=10, callbacks=[ema_cb], logger=False,
    ...                      enable_checkpointing=False, enable_progress_bar=False)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from torch import nn

from .._args import flag
from ..config import EMAConfig, EMAOptions, PostHocEMAConfig, Unpack
from ._adapter import (
    AdapterConfig,
    Average,
    Swap,
    adapter_config,
    build_average,
    check_evaluate_with,
    counted_units,
    is_sharded,
    portable_state,
    stats,
    with_total,
)

__all__ = ["EMACallback", "TRAINING_WEIGHTS_KEY"]

#: Checkpoint key holding the training weights when ``save_ema_weights=True`` put the
#: averaged ones under ``"state_dict"``.
TRAINING_WEIGHTS_KEY = "emakit_training_state_dict"


def _averaged_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Module:
    """What the average is of: the ``FullyShardedDataParallel`` root ``FSDPStrategy`` wraps
    the LightningModule in (the module itself holds parameters flattened by that root), else
    the LightningModule (DDP's wrapper is seen through; FSDP2's shards are its parameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = trainer.strategy.model
    return wrapped if isinstance(wrapped, FullyShardedDataParallel) else pl_module


def _sharded_checkpoint(strategy: Any) -> str | None:
    """How ``strategy`` writes the weights when its checkpoints are sharded (then a
    checkpoint cannot hold the average beside the training weights), else None."""
    if isinstance(strategy, DeepSpeedStrategy):
        return "DeepSpeedStrategy"
    if isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type",
                                                      "full") != "full":
        return "FSDPStrategy(state_dict_type='sharded')"
    if isinstance(strategy, ModelParallelStrategy) and getattr(
            strategy, "_save_distributed_checkpoint", True):
        return "ModelParallelStrategy(save_distributed_checkpoint=True)"
    return None


class EMACallback(pl.Callback):
    """Keeps an :class:`emakit.EMA` of the LightningModule's weights during ``fit``.

    Args:
        config: an :class:`~emakit.EMAConfig` (or :class:`~emakit.BEMAConfig`, or
            :class:`~emakit.PostHocEMAConfig`: the callback then drives a
            :class:`~emakit.PostHocEMA` and evaluates on its first profile), or the
            ``EMAConfig`` fields as keyword arguments: every argument of :class:`emakit.EMA`.
            Times in ``ba`` count optimizer steps, ``ep`` epochs, ``sp`` the samples of all
            ranks (Lightning's ``extract_batch_size`` of each micro-batch, summed), ``tok``
            what ``count_tokens`` returns. A ``dur`` time without ``total`` takes ``total``
            from ``trainer.estimated_stepping_batches``.
        evaluate_with: ``"ema"`` (validation, test and predict on the averaged weights) or
            ``"model"`` (on the training weights). Before the EMA has started, ``"ema"``
            evaluates the model itself. To log both in one pass, keep ``"model"`` and compute
            the averaged model's metrics in your ``validation_step`` with
            ``ema_cb.ema.module(x)`` (no swap; see docs/integrations.md).
        save_ema_weights: ``True`` (default, as Lightning's own ``WeightAveraging``): the
            checkpoint's ``"state_dict"`` holds the averaged weights (what
            ``Module.load_from_checkpoint`` and ``trainer.test(ckpt_path=...)`` load) and
            ``checkpoint["emakit_training_state_dict"]`` the training weights, which
            ``trainer.fit(ckpt_path=...)`` puts back to train on. A strategy that writes the
            weights sharded (``FSDPStrategy(state_dict_type="sharded")``,
            ``ModelParallelStrategy`` by default, DeepSpeed) cannot hold both: there pass
            ``False`` (``fit`` raises at its start otherwise).
        copy_on_fit_end: at the end of ``fit``, copy the averaged weights into the model.
        count_tokens: ``callable(batch) -> int``, the tokens in a micro-batch (e.g.
            ``lambda b: int(b["attention_mask"].sum())``); needed for times in ``tok``.
        log_stats: after every optimizer step, log ``ema/smoothing`` (the next update's),
            ``ema/num_updates`` and ``ema/skipped_updates`` with ``pl_module.log``, so they
            reach ``trainer.callback_metrics`` and every logger.

    The average is built at ``on_fit_start`` (after the strategy has wrapped the model and
    moved it to its device) and exposed as ``.ema``.

    Checkpoints: the EMA state (full tensors, gathered under FSDP) is the callback's state in
    the Lightning checkpoint, restored by ``fit``, ``validate``, ``test`` and ``predict`` with
    ``ckpt_path=...``. A ``fit`` resumed from a checkpoint without it warns once and restarts
    the average from the loaded weights, its clock at the trainer's step and epoch (so
    ``start`` and ``dur`` times keep their meaning); a ``validate``/``test`` of such a
    checkpoint warns that it evaluates the checkpoint's own weights.
    """

    def __init__(
        self,
        config: AdapterConfig | None = None,
        *,
        evaluate_with: str = "ema",
        save_ema_weights: bool = True,
        copy_on_fit_end: bool = False,
        count_tokens: Callable[[Any], int] | None = None,
        log_stats: bool = True,
        **kwargs: Unpack[EMAOptions],
    ) -> None:
        super().__init__()
        hint = " (to log both, see the class docstring)" if evaluate_with == "both" else ""
        self.evaluate_with = check_evaluate_with(evaluate_with, hint=hint)
        if count_tokens is not None and not callable(count_tokens):
            raise TypeError(f"count_tokens: expected callable(batch) -> int, got {count_tokens!r}")
        counts = ("ba", "ep", "sp") + (("tok",) if count_tokens is not None else ())
        self.config = adapter_config("Lightning", config, dict(kwargs), counts=counts)
        self.count_tokens = count_tokens
        self._counting = bool(counted_units(self.config))  # summed over micro-batches, ranks
        self._samples = self._tokens = 0
        self.save_ema_weights = flag(save_ema_weights, "save_ema_weights")
        self.copy_on_fit_end = flag(copy_on_fit_end, "copy_on_fit_end")
        # not "log": Lightning sets every callback's .log to the module's log method
        self.log_stats = flag(log_stats, "log_stats")
        self.ema: Average | None = None
        self._pending: dict[str, Any] | None = None
        self._restored = False  # an EMA state came from this run's ckpt_path
        self._warned = False
        self._last_global_step = 0
        self._epoch_counted = False
        self._swap = Swap()

    @property
    def state_key(self) -> str:
        """Distinct per configuration, so that two EMA callbacks can share a checkpoint (the
        same key as emakit 0.1 wrote for the same arguments)."""
        c = self.config
        if isinstance(c, PostHocEMAConfig):
            return self._generate_state_key(
                sigma_rels=list(c.sigma_rels), start=str(c.start), update_interval=str(c.interval),
                snapshot_every=None if c.snapshot_every is None else str(c.snapshot_every))
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

    def _build(self, trainer: pl.Trainer, model: nn.Module) -> Average:
        config = self.config
        if config.total is None and config.uses_dur():
            steps = trainer.estimated_stepping_batches
            if not isinstance(steps, int) and not float(steps).is_integer():
                raise ValueError(
                    "total: a 'dur' time needs the training length; the trainer cannot "
                    "estimate it (set max_steps or pass total)"
                )
            config = with_total(config, f"{int(steps)}ba")
        return build_average(model, config)

    def _ensure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Average:
        # Validate/test hooks run under torch.inference_mode: an average allocated there
        # would be inference tensors, which a later load or update may not write.
        with torch.inference_mode(False):
            model = _averaged_module(trainer, pl_module)
            if self.ema is None:
                self.ema = self._build(trainer, model)
            elif self.ema.model is not model:  # the strategy wrapped the module anew
                carried = portable_state(self.ema)
                self.ema = self._build(trainer, model)
                self.ema.load_state_dict(carried)
            if self._pending is not None:
                self.ema.load_state_dict(self._pending)
                self._pending = None
        return self.ema

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restored = False  # checkpoints are restored after setup, whatever the stage
        self._warned = False
        if stage != "fit" or not self.save_ema_weights:
            return
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        saving = [cb for cb in callbacks
                  if isinstance(cb, EMACallback) and cb.save_ema_weights]
        if len(saving) > 1:
            raise ValueError(
                f"save_ema_weights=True on {len(saving)} EMACallbacks: a checkpoint holds one "
                "set of weights; give the others save_ema_weights=False")
        how = _sharded_checkpoint(trainer.strategy)
        if how is not None:
            raise ValueError(
                f"save_ema_weights=True: {how} writes the weights sharded, so its checkpoints "
                "cannot hold the averaged weights beside the training weights; pass "
                "EMACallback(save_ema_weights=False) (the checkpoint holds the EMA state "
                "either way)")

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
            self._step(trainer, pl_module)
        # Count the epoch here, on its last batch, so that the epoch-end validation (which
        # Lightning runs before on_train_epoch_end) already sees the epoch's update.
        if trainer.is_last_batch and not self._epoch_counted:
            self._epoch_counted = True
            self.ema.epoch_end()

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.ema is not None
        samples = tokens = None
        if self._counting:
            counts = torch.tensor([self._samples, self._tokens], device=pl_module.device)
            counts = trainer.strategy.reduce(counts, reduce_op="sum")  # all ranks' batches
            samples, tokens = (int(v) for v in counts.tolist())
            self._samples = self._tokens = 0
        self.ema.step(samples=samples, tokens=None if self.count_tokens is None else tokens)
        if self.log_stats:  # the same on every rank: nothing to synchronize
            for key, value in stats(self.ema).items():
                pl_module.log(f"ema/{key}", value, on_step=True, on_epoch=False,
                              prog_bar=False, logger=bool(trainer.loggers), sync_dist=False)

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
                "runs on the checkpoint's own weights",
                RuntimeWarning,
                stacklevel=2,
            )
            self._warned = True  # once per run
        if self.evaluate_with == "ema":
            self._swap.enter(ema)

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
        # full tensors: Lightning writes the callback states from rank 0 alone, also when it
        # writes the weights sharded
        return {"ema": portable_state(self.ema)}

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
        averaged = self.ema.ema_state_dict(rank0_only=True)  # a gather where spread
        training = checkpoint.get("state_dict")
        if not averaged or not training:
            return  # a rank that does not write the checkpoint
        if set(averaged) != set(training):
            how = _sharded_checkpoint(trainer.strategy) or type(trainer.strategy).__name__
            raise RuntimeError(
                f"save_ema_weights: the checkpoint's state_dict ({how}) does not have the "
                "module's names; use save_ema_weights=False"
            )
        checkpoint[TRAINING_WEIGHTS_KEY] = training
        checkpoint["state_dict"] = {k: v.to(training[k].device) for k, v in averaged.items()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has just loaded checkpoint["state_dict"] into the module: when that holds
        # the averaged weights, put the training weights back before training resumes.
        if TRAINING_WEIGHTS_KEY not in checkpoint or trainer.state.fn != TrainerFn.FITTING:
            return
        training = checkpoint[TRAINING_WEIGHTS_KEY]
        model = _averaged_module(trainer, pl_module)
        if is_sharded(model):  # FSDP: every rank read the file; each takes its shards
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            set_model_state_dict(model, training, options=StateDictOptions(full_state_dict=True))
        else:
            pl_module.load_state_dict(training)
