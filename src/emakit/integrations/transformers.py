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
  they are called from, several eval datasets included, and its ``train()`` tells the
  callback which checkpoint it resumes from.

Each checkpoint folder ``checkpoint-N`` gets ``emakit_ema.pt`` (the EMA state, loadable with
``torch.load(..., weights_only=True)``) and ``ema/``, the averaged model written with
``save_pretrained``, so ``AutoModel...from_pretrained("checkpoint-N/ema")`` loads it.

Example:
    >>> from emakit.integrations.transformers import EMACallback, EMATrainer
    >>> ema_cb = EMACallback(half_life="500ba")
    >>> # trainer = EMATrainer(model, args, train_dataset=..., callbacks=[ema_cb])
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .. import BEMA, EMA
from ..config import EMAOptions, Unpack
from ..io import save_torch
from . import EVALUATE_WITH, AdapterConfig, adapter_config, build_average, with_total

__all__ = ["EMACallback", "EMATrainerMixin", "EMATrainer", "EMA_STATE_NAME", "EMA_MODEL_DIR"]

EMA_STATE_NAME = "emakit_ema.pt"
EMA_MODEL_DIR = "ema"


def _fingerprint(model: nn.Module) -> torch.Tensor | None:
    """Per trainable parameter, the float64 sum and sum of magnitudes: enough to tell the
    weights a checkpoint saved from any other weights, at one host sync. ``None`` for a
    sharded model (DTensor parameters): each rank holds other shards, so there is no one
    fingerprint to compare."""
    params = [p for p in model.parameters() if p.requires_grad]
    if any(hasattr(p, "to_local") for p in params):
        return None
    rows = [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()])
            for p in params]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)


class EMACallback(TrainerCallback):
    """Keeps an :class:`emakit.EMA` of the model's weights while a ``transformers.Trainer``
    trains, evaluates with it during training, and checkpoints it.

    Args:
        config: an :class:`~emakit.EMAConfig`, or its fields as keyword arguments: every
            argument of :class:`emakit.EMA` (``ba`` counts optimizer steps, ``ep`` epochs,
            ``tok`` the Trainer's ``state.num_input_tokens_seen``, which needs
            ``TrainingArguments(include_num_input_tokens_seen=True)``). A ``dur`` time
            without ``total`` takes ``total`` from the trainer's ``max_steps``.
        evaluate_with: ``"ema"`` (default): evaluations run on the averaged weights (the
            model's own before the EMA starts), and ``load_best_model_at_end`` loads the
            averaged weights of the best checkpoint; ``"model"``: on the training weights.
        save_ema_model: also write ``checkpoint-N/ema/`` with ``save_pretrained``.

    The EMA is built at ``on_train_begin`` on the (unwrapped) model and exposed as ``.ema``.

    Resuming: at ``on_train_begin`` of a resumed run (the Trainer's step ``N > 0``) the EMA
    state is read from the checkpoint the run resumes from: the folder given to
    :meth:`resume_from` (``EMATrainer.train`` gives it), else ``output_dir/checkpoint-N``. The
    file records a fingerprint of the training weights it was saved with; a file that does
    not belong to the loaded weights is a ``ValueError``. No file: a warning, and the average
    restarts from the loaded weights with its clock at step ``N``.
    """

    def __init__(
        self,
        config: AdapterConfig | None = None,
        *,
        evaluate_with: str = "ema",
        save_ema_model: bool = True,
        **kwargs: Unpack[EMAOptions],
    ) -> None:
        if evaluate_with not in EVALUATE_WITH:
            raise ValueError(
                f"evaluate_with: expected one of {EVALUATE_WITH}, got {evaluate_with!r}"
            )
        self.config = adapter_config("Transformers", config, dict(kwargs),
                                     counts=("ba", "ep", "tok"))
        units = {self.config.start.unit}
        if self.config.total is not None and self.config.uses_dur():
            units.add(self.config.total.unit)
        self._counting_tokens = "tok" in units
        self._tokens_seen = 0
        self.evaluate_with = evaluate_with
        self.save_ema_model = bool(save_ema_model)
        self.ema: EMA | BEMA | None = None
        self._resume_dir: str | None = None
        self._training = False
        self._swap = contextlib.ExitStack()
        self._swapped = False
        self._holders = 0  # open evaluating() blocks: they, not on_evaluate, end the swap
        self._warned_outside = False

    # the averaged weights in the model ---------------------------------------------------

    def _swap_in(self) -> None:
        if self._swapped or self.ema is None or self.evaluate_with != "ema":
            return
        self._swap.enter_context(self.ema.swapped())
        self._swapped = True

    def _release(self) -> None:
        self._swap.close()
        self._swapped = False

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights when ``evaluate_with`` is
        ``"ema"`` (no-op otherwise, or before training has begun); training weights back
        after, bitwise. Blocks may nest. ``EMATrainer`` wraps ``evaluate``/``predict`` in it."""
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

    def _check_evaluated_on_average(self, what: str) -> None:
        """Called after an evaluation: if it ran on the training weights although
        ``evaluate_with="ema"`` and the average exists, say so."""
        if self._swapped or self.ema is None or self.evaluate_with != "ema":
            return
        if not self.ema.started:
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

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("EMACallback: the Trainer passed no model to on_train_begin")
        self._release()
        if self._counting_tokens and args.include_num_input_tokens_seen in ("no", False):
            raise ValueError(
                f"start={str(self.config.start)!r}: the callback counts tokens with the "
                "Trainer's state.num_input_tokens_seen; set "
                "TrainingArguments(include_num_input_tokens_seen=True) (or 'non_padding')"
            )
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
        path = os.path.join(folder, EMA_STATE_NAME)
        if not os.path.isfile(path):
            self.ema.resume_at(step=state.global_step, epoch=int(state.epoch or 0),
                               tokens=int(state.num_input_tokens_seen or 0))
            warnings.warn(
                f"emakit: training resumes at step {state.global_step} but {path} does not "
                "exist: the EMA restarts from the loaded weights, its clock at that step "
                "(start and dur times keep their meaning). If the checkpoint is elsewhere, "
                "pass it with ema_cb.resume_from(folder) or use EMATrainer",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("global_step") != state.global_step:
            raise ValueError(
                f"{path}: EMA state saved at step {saved.get('global_step')}, but the trainer "
                f"resumes at step {state.global_step}"
            )
        self._check_fingerprint(saved, path, "resumes from")
        self.ema.load_state_dict(saved["ema"])

    def _check_fingerprint(self, saved: dict[str, Any], path: str, action: str) -> None:
        assert self.ema is not None
        want = saved.get("fingerprint")
        if want is None:
            return  # written before fingerprints existed
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

    def on_train_end(self, args, state, control, **kwargs):
        self._release()
        self._training = False
        if (
            self.ema is not None
            and self.evaluate_with == "ema"
            and args.load_best_model_at_end
            and state.best_model_checkpoint is not None
        ):
            self._load_best(state.best_model_checkpoint)

    def _load_best(self, folder: str) -> None:
        """The Trainer has loaded the best checkpoint's training weights; the metric that
        made it best was measured on its average, so that is what the model gets."""
        assert self.ema is not None
        path = os.path.join(folder, EMA_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"load_best_model_at_end: {path} not found; the best checkpoint's average "
                "cannot be loaded"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self._check_fingerprint(saved, path, "loaded as the best model")
        self.ema.load_state_dict(saved["ema"])
        self.ema.copy_to()

    # checkpoints -------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        if self.ema is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(
                f"emakit: checkpoint folder {folder} not found; EMA state not saved",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        save_torch(
            {
                "ema": self.ema.state_dict(),
                "global_step": state.global_step,
                "fingerprint": _fingerprint(self.ema.model),
            },
            os.path.join(folder, EMA_STATE_NAME),
        )
        if self.save_ema_model:
            self.save_pretrained(os.path.join(folder, EMA_MODEL_DIR))

    def save_pretrained(self, folder: str | os.PathLike, **kwargs: Any) -> None:
        """Save the averaged model with the model's ``save_pretrained`` (written to a temporary
        folder beside ``folder``, then renamed), so ``from_pretrained(folder)`` loads it."""
        if self.ema is None:
            raise RuntimeError("EMACallback.save_pretrained: training has not begun")
        folder = os.fspath(folder)
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ema-tmp-", dir=parent)
        try:
            model: Any = self.ema.model  # a PreTrainedModel (checked by the caller)
            model.save_pretrained(tmp, state_dict=self.ema.ema_state_dict(), **kwargs)
            old = None
            if os.path.exists(folder):
                old = tempfile.mkdtemp(prefix=".ema-old-", dir=parent)
                os.replace(folder, os.path.join(old, "x"))
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


class EMATrainerMixin:
    """Put before a Trainer class: ``class MyTrainer(EMATrainerMixin, SFTTrainer)``.

    ``evaluate()`` and ``predict()`` run on the averaged weights of the trainer's
    :class:`EMACallback` (when its ``evaluate_with`` is ``"ema"``), however they are called;
    ``train(resume_from_checkpoint=...)`` tells the callback which checkpoint it resumes from.
    The callback may be passed to the constructor or added later with ``add_callback``. Only
    public, documented override points of ``transformers.Trainer`` are used.
    """

    def ema_callbacks(self) -> list[EMACallback]:
        """The trainer's EMA callbacks, in order."""
        handler = self.callback_handler  # type: ignore[attr-defined]
        return [cb for cb in handler.callbacks if isinstance(cb, EMACallback)]

    @contextlib.contextmanager
    def _on_average(self) -> Iterator[None]:
        callbacks = [cb for cb in self.ema_callbacks() if cb.evaluate_with == "ema"]
        if len(callbacks) > 1:
            raise RuntimeError(
                "EMATrainer: several EMACallbacks with evaluate_with='ema'; give the others "
                "evaluate_with='model' so that one average is evaluated"
            )
        with contextlib.ExitStack() as stack:
            for cb in callbacks:
                stack.enter_context(cb.evaluating())
            yield

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)  # type: ignore[attr-defined]
        for cb in self.ema_callbacks():
            cb.resume_from(path if isinstance(path, (str, os.PathLike)) else None)
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with self._on_average():
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with self._on_average():
            return super().predict(*args, **kwargs)  # type: ignore[misc]


class EMATrainer(EMATrainerMixin, Trainer):
    """``transformers.Trainer`` whose ``evaluate()``/``predict()`` run on the average of its
    :class:`EMACallback` (see :class:`EMATrainerMixin`)."""
