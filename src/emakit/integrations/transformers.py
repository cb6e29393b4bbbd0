r"""EMA for Hugging Face Transformers: ``Trainer(..., callbacks=[EMACallback(half_life="500ba")])``.

After every optimizer step (``on_step_end``: once per ``gradient_accumulation_steps``
micro-batches) the callback calls :meth:`emakit.EMA.step`, which applies

.. math:: \bar\theta \leftarrow s\,\bar\theta + (1 - s)\,\theta,
          \qquad s = 2^{-\text{update\_interval} / \text{half\_life}}

and counts epochs with :meth:`emakit.EMA.epoch_end`. ``trainer.evaluate()``,
``trainer.predict()`` and the evaluations during training run on the averaged weights. Each
checkpoint folder ``checkpoint-N`` gets

- ``emakit_ema.pt``: the EMA state (``torch.load(..., weights_only=True)``), which
  ``trainer.train(resume_from_checkpoint=...)`` restores exactly;
- ``ema/``: the averaged model, saved with ``save_pretrained``, so that
  ``AutoModel...from_pretrained("checkpoint-N/ema")`` loads it.

Example:
    >>> from emakit.integrations.transformers import EMACallback
    >>> ema_cb = EMACallback(half_life="500ba")
    >>> # trainer = transformers.Trainer(model, args, train_dataset=..., callbacks=[ema_cb])
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..ema import EMA
from ..io import save_torch
from ..time import Time
from . import callback_arguments

__all__ = ["EMACallback", "EMA_STATE_NAME", "EMA_MODEL_DIR"]

EMA_STATE_NAME = "emakit_ema.pt"
EMA_MODEL_DIR = "ema"
EVALUATE_WITH = ("ema", "model")


def _find_trainer() -> Trainer | None:
    """The Trainer whose method is calling this callback. Callbacks are not handed the
    trainer, but ``on_init_end`` and ``on_train_begin`` are called from its methods."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer):
            return owner
        frame = frame.f_back
    return None


class EMACallback(TrainerCallback):
    """Keeps an :class:`emakit.EMA` of the model's weights while a ``transformers.Trainer``
    trains, and evaluates and checkpoints with it.

    Args:
        half_life, smoothing, start, update_interval, total, batches_per_epoch, buffers,
            dtype, device, warmup, skip_nonfinite: as :class:`emakit.EMA` (``ba`` counts
            optimizer steps, ``ep`` epochs). A ``dur`` time without ``total`` takes ``total``
            from the trainer's ``max_steps``.
        evaluate_with: ``"ema"`` (default): ``evaluate()`` and ``predict()`` run on the
            averaged weights (the model's own before the EMA starts); ``"model"``: on the
            training weights.
        save_ema_model: also write ``checkpoint-N/ema/`` with ``save_pretrained``.

    The EMA is built at ``on_train_begin`` on the (unwrapped) model and exposed as ``.ema``.
    """

    def __init__(
        self,
        half_life: str | Time | None = None,
        smoothing: float | Callable[[int], float] | None = None,
        start: str | Time = "0ba",
        update_interval: str | Time | None = None,
        total: str | Time | None = None,
        batches_per_epoch: int | None = None,
        buffers: str = "average",
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        warmup: Any = None,
        skip_nonfinite: bool = False,
        *,
        evaluate_with: str = "ema",
        save_ema_model: bool = True,
    ) -> None:
        self.ema_kwargs: dict[str, Any] = callback_arguments(
            "Transformers", evaluate_with, allowed=EVALUATE_WITH,
            half_life=half_life, smoothing=smoothing, start=start,
            update_interval=update_interval, total=total, batches_per_epoch=batches_per_epoch,
            buffers=buffers, dtype=dtype, device=device, warmup=warmup,
            skip_nonfinite=skip_nonfinite,
        )
        self.evaluate_with = evaluate_with
        self.save_ema_model = bool(save_ema_model)
        self.ema: EMA | None = None
        self._trainer: Trainer | None = None
        self._resume_dir: str | None = None
        self._evaluating = False

    # attaching to the trainer ------------------------------------------------------------

    def _attach(self) -> None:
        if self._trainer is not None:
            return
        trainer = _find_trainer()
        if trainer is None:
            warnings.warn(
                "emakit: EMACallback could not find its Trainer; evaluation will use the "
                "training weights and resuming will restart the EMA",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self._trainer = trainer
        # Instance attributes shadow the methods: evaluate() (also called by the training
        # loop), predict() and train() go through these wrappers.
        for name in ("evaluate", "predict"):
            setattr(trainer, name, self._evaluating_with_ema(getattr(trainer, name)))
        trainer.train = self._recording_resume(trainer.train)

    def _evaluating_with_ema(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.ema is None or self.evaluate_with != "ema" or self._evaluating:
                return method(*args, **kwargs)  # nested: evaluate() recurses over datasets
            self._evaluating = True
            try:
                with self.ema.swapped():
                    return method(*args, **kwargs)
            finally:
                self._evaluating = False

        return wrapper

    def _recording_resume(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def train(resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
            path = resume_from_checkpoint
            if path is True:
                assert self._trainer is not None
                path = get_last_checkpoint(self._trainer.args.output_dir)
            self._resume_dir = path if isinstance(path, (str, os.PathLike)) else None
            return method(resume_from_checkpoint, *args, **kwargs)

        return train

    def on_init_end(self, args, state, control, **kwargs):
        self._attach()

    # training ----------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._attach()
        if model is None:
            raise RuntimeError("EMACallback: the Trainer passed no model to on_train_begin")
        ema_kwargs = dict(self.ema_kwargs)
        if ema_kwargs["total"] is None and state.max_steps and state.max_steps > 0:
            ema_kwargs["total"] = f"{state.max_steps}ba"
        self.ema = EMA(model, **ema_kwargs)
        if state.global_step > 0:
            self._resume(state)

    def _resume(self, state) -> None:
        assert self.ema is not None
        path = None if self._resume_dir is None else os.path.join(self._resume_dir, EMA_STATE_NAME)
        if path is None or not os.path.isfile(path):
            warnings.warn(
                f"emakit: training resumes at step {state.global_step} but no {EMA_STATE_NAME} "
                f"was found in {self._resume_dir!r}: the EMA restarts from the current weights",
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
        self.ema.load_state_dict(saved["ema"])

    def _count_epochs(self, done: int) -> None:
        assert self.ema is not None
        while self.ema.clock.counts["ep"] < done:
            self.ema.epoch_end()

    def on_step_end(self, args, state, control, **kwargs):
        if self.ema is None:
            return
        self.ema.step()
        # On an epoch's last step state.epoch is a whole number. Count the epoch now: the
        # checkpoint and evaluation of that step come before on_epoch_end.
        if state.epoch is not None and float(state.epoch).is_integer():
            self._count_epochs(int(state.epoch))

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.ema is not None and state.epoch is not None:
            self._count_epochs(math.ceil(state.epoch - 1e-9))  # a cut-short epoch counts

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
            {"ema": self.ema.state_dict(), "global_step": state.global_step},
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
            self.ema.model.save_pretrained(tmp, state_dict=self.ema.ema_state_dict(), **kwargs)
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
