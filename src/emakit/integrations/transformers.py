r"""EMA for Hugging Face Transformers, on the Trainer's public hooks only.

After every optimizer step (``on_step_end``: once per ``gradient_accumulation_steps``
micro-batches) the callback calls :meth:`emakit.EMA.step`, which applies

.. math:: \bar\theta \leftarrow s\,\bar\theta + (1 - s)\,\theta,
          \qquad s = 2^{-\text{update\_interval} / \text{half\_life}}

and counts epochs with :meth:`emakit.EMA.epoch_end`. Two ways to use it:

- ``Trainer(..., callbacks=[EMACallback(...)])`` (or ``trainer.add_callback``): the average
  is kept, checkpointed and resumed, and the evaluations the Trainer runs *during training*
  use it: the callback puts the averaged weights in at ``on_step_end``/``on_epoch_end`` when
  the Trainer's control says an evaluation follows, and the training weights back at
  ``on_evaluate``, before any checkpoint is written. A callback is not told when a
  ``trainer.evaluate()`` or ``trainer.predict()`` of yours begins: wrap those calls in
  ``with ema_cb.swapped():``.
- ``EMATrainer`` (or :class:`EMATrainerMixin` before any Trainer subclass, e.g. TRL's
  ``SFTTrainer``): its ``evaluate()`` and ``predict()`` run on the averaged weights wherever
  they are called from, several eval datasets included, ``evaluate_with="both"`` evaluates
  the training weights too, and its ``train()`` tells the callback which checkpoint it
  resumes from.

Each checkpoint folder ``checkpoint-N`` gets ``emakit_ema.safetensors`` (the EMA state, in
emakit's safe state file: :func:`emakit.checkpoint.read_state` reads it without unpickling;
the ``emakit_ema.pt`` of emakit 0.1 still loads, with ``weights_only=True``) and ``ema/``,
the averaged model written with ``save_pretrained`` beside the Trainer's tokenizer or
processor, so ``AutoModel...from_pretrained("checkpoint-N/ema")`` loads it.

Example:
    >>> from emakit.integrations.transformers import EMACallback, EMATrainer
    >>> ema_cb = EMACallback(half_life="500ba")
    >>> # trainer = EMATrainer(model, args, train_dataset=..., callbacks=[ema_cb])
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .._args import flag
from ..config import EMAOptions, Unpack
from ._adapter import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    AdapterConfig,
    Average,
    Swap,
    adapter_config,
    build_average,
    check_evaluate_with,
    counted_units,
    find_state_file,
    is_sharded,
    process_rank,
    read_average,
    stats,
    tensors_fingerprint,
    with_total,
    write_average,
)

__all__ = ["EMACallback", "EMATrainerMixin", "EMATrainer", "EMA_STATE_NAME", "EMA_MODEL_DIR",
           "LEGACY_EMA_STATE_NAME", "RAW_PREFIX"]

EMA_STATE_NAME = STATE_FILE
#: What emakit 0.1 wrote (``torch.save``); still read, with ``weights_only=True``.
LEGACY_EMA_STATE_NAME = LEGACY_STATE_FILE
EMA_MODEL_DIR = "ema"
#: What ``evaluate_with="both"`` adds after the metric prefix for the training weights:
#: ``eval_raw_loss`` beside the average's ``eval_loss``.
RAW_PREFIX = "raw"
_STAT_KEYS = tuple(f"ema_{k}" for k in ("smoothing", "num_updates", "skipped_updates"))


def _fingerprint(model: nn.Module) -> torch.Tensor | None:
    """Per trainable parameter, the float64 sum and sum of magnitudes: enough to tell the
    weights a checkpoint saved from any other weights, at one host sync. ``None`` for a
    sharded model (FSDP, ZeRO-3): each rank holds other shards, so there is no one
    fingerprint to compare."""
    if is_sharded(model):
        return None
    return tensors_fingerprint(p for p in model.parameters() if p.requires_grad)


def _all_agree(ok: bool) -> bool:
    """``ok`` of rank 0, on every rank (one broadcast under ``torch.distributed``)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    box = [ok]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


class EMACallback(TrainerCallback):
    """Keeps an :class:`emakit.EMA` of the model's weights while a ``transformers.Trainer``
    trains, evaluates with it during training, logs it and checkpoints it.

    Args:
        config: an :class:`~emakit.EMAConfig` (or :class:`~emakit.BEMAConfig`, or
            :class:`~emakit.PostHocEMAConfig`: the callback then drives a
            :class:`~emakit.PostHocEMA` and evaluates on its first profile), or the
            ``EMAConfig`` fields as keyword arguments: every argument of :class:`emakit.EMA`
            (``ba`` counts optimizer steps, ``ep`` epochs, ``tok`` the Trainer's
            ``state.num_input_tokens_seen``, which needs
            ``TrainingArguments(include_num_input_tokens_seen=True)``). A ``dur`` time
            without ``total`` takes ``total`` from the trainer's ``max_steps``.
        evaluate_with: ``"ema"`` (default): evaluations run on the averaged weights (the
            model's own before the EMA starts), and ``load_best_model_at_end`` loads the
            averaged weights of the best checkpoint; ``"model"``: on the training weights;
            ``"both"`` (with :class:`EMATrainer` or :class:`EMATrainerMixin`): every
            evaluation runs twice, the average's metrics under the usual keys
            (``eval_loss``, what picks the best checkpoint) and the training weights' under
            ``eval_raw`` (``eval_raw_loss``).
        save_ema_model: also write ``checkpoint-N/ema/`` with ``save_pretrained`` (and the
            Trainer's tokenizer or processor beside it).
        log_stats: add ``ema_smoothing`` (the next update's), ``ema_num_updates`` and
            ``ema_skipped_updates`` to the Trainer's training logs. With
            :class:`EMATrainer` (or the mixin) they are in the logs before any callback or
            reporter sees them; with a plain ``Trainer`` they are added in ``on_log``, so
            they reach ``state.log_history`` and the callbacks after this one, not the
            reporting integrations registered before it.

    The average is built at ``on_train_begin`` on the model the Trainer trains (the
    ``FullyShardedDataParallel`` root under FSDP1, the DTensor-sharded model under FSDP2,
    ``engine.module`` under DeepSpeed) and exposed as ``.ema``.

    Resuming: at ``on_train_begin`` of a resumed run (the Trainer's step ``N > 0``) the EMA
    state is read from the checkpoint the run resumes from: the folder given to
    :meth:`resume_from` (``EMATrainer.train`` gives it), else ``output_dir/checkpoint-N``. The
    file records a fingerprint of the training weights it was saved with (not under FSDP or
    ZeRO-3, whose ranks hold shards); a file that does not belong to the loaded weights is a
    ``ValueError``. No file: a warning, and the average restarts from the loaded weights with
    its clock at step ``N``.
    """

    def __init__(
        self,
        config: AdapterConfig | None = None,
        *,
        evaluate_with: str = "ema",
        save_ema_model: bool = True,
        log_stats: bool = True,
        **kwargs: Unpack[EMAOptions],
    ) -> None:
        self.evaluate_with = check_evaluate_with(evaluate_with, ("ema", "model", "both"))
        self.config = adapter_config("Transformers", config, dict(kwargs),
                                     counts=("ba", "ep", "tok"))
        self._counting_tokens = "tok" in counted_units(self.config)
        self._tokens_seen = 0
        self.save_ema_model = flag(save_ema_model, "save_ema_model")
        self.log_stats = flag(log_stats, "log_stats")
        self.ema: Average | None = None
        self._resume_dir: str | None = None
        self._training = False
        self._swap = Swap()
        self._holders = 0  # open evaluating() blocks: they, not on_evaluate, end the swap
        self._raw = 0  # open blocks of a deliberate evaluation of the training weights
        self._warned_outside = False
        self._holds_best = False  # load_best_model_at_end put the best average in the model
        self._processing_class: Any = None
        self._mixin = False  # driven by an EMATrainerMixin (set by its train())

    @property
    def _on_average(self) -> bool:
        return self.evaluate_with in ("ema", "both")

    # the averaged weights in the model ---------------------------------------------------

    def _swap_in(self) -> None:
        if self.ema is not None and self._on_average and not self._raw:
            self._swap.enter(self.ema)

    def _release(self) -> None:
        self._swap.close()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights when ``evaluate_with`` is
        ``"ema"`` or ``"both"`` (no-op otherwise, or before training has begun); training
        weights back after, bitwise. Blocks may nest. ``EMATrainer`` wraps
        ``evaluate``/``predict`` in it."""
        self._swap_in()
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            if self._holders == 0:
                self._release()

    def swapped(self) -> contextlib.AbstractContextManager[None]:
        """The averaged weights in the model for a ``trainer.evaluate()``/``predict()`` of
        yours: ``with ema_cb.swapped(): trainer.evaluate()``. Same as :meth:`evaluating`."""
        return self.evaluating()

    @contextlib.contextmanager
    def training_weights(self) -> Iterator[None]:
        """Within the block the model holds the training weights, deliberately (the raw
        half of ``evaluate_with="both"``): no swap, and no warning that an evaluation ran on
        them."""
        self._release()
        self._raw += 1
        try:
            yield
        finally:
            self._raw -= 1

    def _check_evaluated_on_average(self, what: str) -> None:
        """Called after an evaluation: if it ran on the training weights although the
        average should have been evaluated, say so."""
        if (self._swap.active or self._raw or self._holds_best or self.ema is None
                or not self._on_average or not self.ema.started):
            return  # before the start the average is the model itself
        if self._training:
            raise RuntimeError(
                f"emakit: an {what} during training ran on the training weights: the "
                "EMACallback puts the average in only for the evaluation its on_step_end/"
                "on_epoch_end sees announced, and a Trainer with several eval datasets (or a "
                "callback that requests the evaluation after this one) evaluates more. Use "
                "emakit.integrations.transformers.EMATrainer (or EMATrainerMixin)"
            )
        if not self._warned_outside:
            self._warned_outside = True
            warnings.warn(
                f"emakit: this {what} ran on the training weights: a callback is not told "
                "when trainer.evaluate()/predict() begins. Wrap the call in "
                "`with ema_cb.swapped():` or use EMATrainer",
                RuntimeWarning,
                stacklevel=3,
            )

    # training ----------------------------------------------------------------------------

    def resume_from(self, checkpoint: str | os.PathLike | None) -> None:
        """The checkpoint folder the next ``train()`` resumes from (``EMATrainer`` calls
        this); ``None``: look in ``output_dir/checkpoint-N``."""
        self._resume_dir = None if checkpoint is None else os.fspath(checkpoint)

    def _check_args(self, args: Any, model: nn.Module) -> None:
        if self.evaluate_with == "both" and not self._mixin:
            raise ValueError(
                "evaluate_with='both': a callback cannot run the second evaluation; use "
                "emakit.integrations.transformers.EMATrainer (or EMATrainerMixin before your "
                "Trainer class)")
        if self._counting_tokens and args.include_num_input_tokens_seen in ("no", False):
            raise ValueError(
                f"start={str(self.config.start)!r}: the callback counts tokens with the "
                "Trainer's state.num_input_tokens_seen; set "
                "TrainingArguments(include_num_input_tokens_seen=True) (or 'non_padding')"
            )
        if self.save_ema_model and not callable(getattr(model, "save_pretrained", None)):
            raise ValueError(
                f"save_ema_model=True: the model ({type(model).__name__}) has no "
                "save_pretrained; pass EMACallback(save_ema_model=False)")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("EMACallback: the Trainer passed no model to on_train_begin")
        self._release()
        self._check_args(args, model)
        self._processing_class = kwargs.get("processing_class")
        self._holds_best = False
        config = self.config
        if state.max_steps and state.max_steps > 0:
            config = with_total(config, f"{state.max_steps}ba")
        self.ema = build_average(model, config)
        self._tokens_seen = int(state.num_input_tokens_seen or 0)
        if state.global_step > 0:
            self._resume(args, state)
        self._training = True
        if args.eval_on_start:
            self._swap_in()

    def _resume(self, args, state) -> None:
        assert self.ema is not None
        folder = self._resume_dir or os.path.join(
            args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        )
        self._resume_dir = None  # good for one train() only
        path = find_state_file(folder)
        if path is None:
            self.ema.resume_at(step=state.global_step, epoch=int(state.epoch or 0),
                               tokens=int(state.num_input_tokens_seen or 0))
            warnings.warn(
                f"emakit: training resumes at step {state.global_step} but "
                f"{os.path.join(folder, EMA_STATE_NAME)} does not exist: the EMA restarts "
                "from the loaded weights, its clock at that step (start and dur times keep "
                "their meaning). If the checkpoint is elsewhere, pass it with "
                "ema_cb.resume_from(folder) or use EMATrainer",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        saved, extra = read_average(path)
        if extra.get("global_step") != state.global_step:
            raise ValueError(
                f"{path}: EMA state saved at step {extra.get('global_step')}, but the trainer "
                f"resumes at step {state.global_step}"
            )
        self._check_fingerprint(extra, str(path), "resumes from")
        self.ema.load_state_dict(saved)

    def _check_fingerprint(self, saved: Mapping[str, Any], path: str, action: str) -> None:
        assert self.ema is not None
        want = saved.get("fingerprint")
        if want is None:
            return  # written before fingerprints existed, or by a sharded run
        got = _fingerprint(self.ema.model)
        if got is None:
            return
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=0.0):
            raise ValueError(
                f"{path} holds the EMA of other training weights than those the Trainer "
                f"{action}: it belongs to another run. Pass the checkpoint folder with "
                "ema_cb.resume_from(folder), or use EMATrainer, which passes it"
            )

    def _count_epochs(self, done: int) -> None:
        assert self.ema is not None
        while self.ema.counts["ep"] < done:
            self.ema.epoch_end()

    def on_step_end(self, args, state, control, **kwargs):
        if self.ema is None:
            return
        tokens = None
        if self._counting_tokens:  # all ranks' tokens, as the Trainer gathers them
            seen = int(state.num_input_tokens_seen)
            tokens, self._tokens_seen = seen - self._tokens_seen, seen
        self.ema.step(tokens=tokens)
        # On an epoch's last step state.epoch is a whole number. Count the epoch now: the
        # checkpoint and evaluation of that step come before on_epoch_end.
        if state.epoch is not None and float(state.epoch).is_integer():
            self._count_epochs(int(state.epoch))
        if control.should_evaluate:  # set by DefaultFlowCallback, which runs first
            self._swap_in()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.ema is None:
            return
        if state.epoch is not None:
            self._count_epochs(math.ceil(state.epoch - 1e-9))  # a cut-short epoch counts
        if control.should_evaluate:
            self._swap_in()

    def on_evaluate(self, args, state, control, **kwargs):
        self._check_evaluated_on_average("evaluation")
        if self._holders == 0:
            self._release()  # before the Trainer picks the best metric and saves

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._check_evaluated_on_average("prediction")

    def statistics(self) -> dict[str, float]:
        """``{"ema_smoothing": ..., "ema_num_updates": ..., "ema_skipped_updates": ...}``,
        what :attr:`log_stats` adds to the training logs ({} before training begins)."""
        if self.ema is None:
            return {}
        return {f"ema_{k}": v for k, v in stats(self.ema).items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        # A plain Trainer: add the statistics now (EMATrainer added them before logging).
        if not self.log_stats or logs is None or "loss" not in logs or _STAT_KEYS[0] in logs:
            return
        values = self.statistics()
        history = state.log_history[-1] if state.log_history else None
        if history is not None and all(history.get(k) == v for k, v in logs.items()):
            history.update(values)  # the entry the Trainer made of these logs
        logs.update(values)

    def on_train_end(self, args, state, control, **kwargs):
        self._release()
        self._training = False
        if (
            self.ema is not None
            and self._on_average
            and args.load_best_model_at_end
            and state.best_model_checkpoint is not None
        ):
            self._load_best(state.best_model_checkpoint)

    def _load_best(self, folder: str) -> None:
        """The Trainer has loaded the best checkpoint's training weights; the metric that
        made it best was measured on its average, so that is what the model gets."""
        assert self.ema is not None
        path = find_state_file(folder)
        if path is None:
            raise FileNotFoundError(
                f"load_best_model_at_end: {os.path.join(folder, EMA_STATE_NAME)} not found; "
                "the best checkpoint's average cannot be loaded"
            )
        saved, extra = read_average(path)
        self._check_fingerprint(extra, str(path), "loaded as the best model")
        self.ema.load_state_dict(saved)
        self.ema.copy_to()
        self._holds_best = True  # an evaluate() now runs on the average: no warning

    # checkpoints -------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        if self.ema is None:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        # every rank takes part in the gathers below; rank 0 writes
        if not _all_agree(process_rank() != 0 or os.path.isdir(folder)):
            warnings.warn(
                f"emakit: checkpoint folder {folder} not found; EMA state not saved",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        extra = {"global_step": state.global_step, "fingerprint": _fingerprint(self.ema.model)}
        write_average(self.ema, os.path.join(folder, EMA_STATE_NAME), extra)
        if self.save_ema_model:
            self.save_pretrained(os.path.join(folder, EMA_MODEL_DIR))

    def save_pretrained(self, folder: str | os.PathLike, **kwargs: Any) -> None:
        """Save the averaged model with :meth:`emakit.EMA.save_pretrained` (the model's own
        ``save_pretrained``, written beside ``folder`` and renamed), and the Trainer's
        tokenizer or processor with it, so ``from_pretrained(folder)`` loads both. Under
        ``torch.distributed`` every rank calls it and rank 0 writes."""
        if self.ema is None:
            raise RuntimeError("EMACallback.save_pretrained: training has not begun")
        self.ema.save_pretrained(folder, **kwargs)
        saver = getattr(self._processing_class, "save_pretrained", None)
        if callable(saver) and process_rank() == 0:
            saver(os.fspath(folder))


class EMATrainerMixin:
    """Put before a Trainer class: ``class MyTrainer(EMATrainerMixin, SFTTrainer)``.

    ``evaluate()`` and ``predict()`` run on the averaged weights of the trainer's
    :class:`EMACallback` (when its ``evaluate_with`` is ``"ema"`` or ``"both"``), however they
    are called; with ``"both"``, ``evaluate()`` first evaluates the training weights under
    the prefix ``eval_raw`` (``metric_key_prefix + "_raw"``), then the average under the
    usual keys, and returns both. ``log()`` adds the callbacks' ``ema_*`` statistics to the
    training logs before any callback or reporter sees them. ``train(resume_from_checkpoint=
    ...)`` tells the callback which checkpoint it resumes from. The callback may be passed to
    the constructor or added later with ``add_callback``. Only public, documented override
    points of ``transformers.Trainer`` are used.
    """

    _emakit_evaluating = False

    def ema_callbacks(self) -> list[EMACallback]:
        """The trainer's EMA callbacks, in order."""
        handler = self.callback_handler  # type: ignore[attr-defined]
        return [cb for cb in handler.callbacks if isinstance(cb, EMACallback)]

    def _evaluated(self) -> list[EMACallback]:
        callbacks = [cb for cb in self.ema_callbacks() if cb.evaluate_with != "model"]
        if len(callbacks) > 1:
            raise RuntimeError(
                "EMATrainer: several EMACallbacks with evaluate_with='ema' or 'both'; give the "
                "others evaluate_with='model' so that one average is evaluated"
            )
        return callbacks

    @contextlib.contextmanager
    def _on_average(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for cb in self._evaluated():
                stack.enter_context(cb.evaluating())
            yield

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
        for cb in self.ema_callbacks():
            cb.resume_from(path if isinstance(path, (str, os.PathLike)) else None)
            cb._mixin = True
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval", **kwargs: Any) -> dict[str, float]:
        parent: Any = super()
        if self._emakit_evaluating:  # the Trainer's own call per eval dataset
            return parent.evaluate(eval_dataset, ignore_keys, metric_key_prefix, **kwargs)
        both = [cb for cb in self._evaluated() if cb.evaluate_with == "both"]
        self._emakit_evaluating = True
        try:
            metrics: dict[str, float] = {}
            if both:
                with both[0].training_weights():
                    metrics.update(parent.evaluate(eval_dataset, ignore_keys,
                                                   f"{metric_key_prefix}_{RAW_PREFIX}", **kwargs))
            with self._on_average():
                metrics.update(parent.evaluate(eval_dataset, ignore_keys, metric_key_prefix,
                                               **kwargs))
            return metrics
        finally:
            self._emakit_evaluating = False

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._on_average():
            return super().predict(*args, **kwargs)  # type: ignore[misc]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: the averages' statistics beside it
            for cb in self.ema_callbacks():
                if cb.log_stats:
                    logs.update(cb.statistics())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class EMATrainer(EMATrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``evaluate()``/``predict()`` run on the average of its
    :class:`EMACallback` (see :class:`EMATrainerMixin`)."""
