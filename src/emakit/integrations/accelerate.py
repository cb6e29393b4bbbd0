r"""EMA for Hugging Face Accelerate in one call: ``register(accelerator, ema)``.

The returned :class:`AccelerateEMA` steps the average once per optimizer step (when
``accelerator.sync_gradients`` says the accumulated gradients were applied), carries it
through ``accelerator.save_state``/``load_state`` in emakit's safe state file (no pickle:
:func:`emakit.checkpoint.write_state`), logs it through ``accelerator.log`` when asked, and
says how many optimizer steps it has counted (:attr:`AccelerateEMA.steps`, restored by
``load_state``).

.. math:: \bar\theta \leftarrow s\,\bar\theta + (1 - s)\,\theta \quad
          \text{after every optimizer step}

Build the average on the model ``accelerator.prepare`` returns (DDP and ``torch.compile`` are
seen through; under FSDP it is the sharded model itself, kept shard by shard).

Example:
    >>> import torch, emakit
    >>> from accelerate import Accelerator
    >>> from emakit.integrations.accelerate import register
    >>> accelerator = Accelerator(cpu=True)
    >>> model = accelerator.prepare(torch.nn.Linear(3, 1))
    >>> ema = register(accelerator, emakit.EMA(model, half_life="100ba"))
    >>> ema.step()          # after optimizer.step(); counts only when gradients synced
    True
    >>> ema.steps
    1
    >>> ema.remove()
"""

from __future__ import annotations

import contextlib
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from ..bema import BEMA
from ..ema import EMA
from ..posthoc.tracker import PostHocEMA
from ._adapter import (
    STATE_FILE,
    AdapterConfig,
    Average,
    adapter_config,
    build_average,
    counted_units,
    read_average,
    stats,
    write_average,
)

__all__ = ["register", "AccelerateEMA"]

# accelerator -> the state file names registered on it (two averages may not share one)
_FILES: weakref.WeakKeyDictionary[Accelerator, set[str]] = weakref.WeakKeyDictionary()


class AccelerateEMA:
    """An average registered with an ``Accelerator`` (made by :func:`register`).

    Attributes:
        ema: the :class:`~emakit.EMA` (or :class:`~emakit.BEMA`, :class:`~emakit.PostHocEMA`)
            it drives: ``swapped()``, ``ema_state_dict()``, ``save_pretrained()`` as usual.
        filename: the file ``save_state`` writes in its folder (default
            ``emakit_ema.safetensors``).
    """

    def __init__(self, accelerator: Accelerator, ema: Average, filename: str,
                 log_every: int | None) -> None:
        self.accelerator = accelerator
        self.ema = ema
        self.filename = filename
        self.log_every = log_every
        self._counting = bool(counted_units(ema.config))
        self._samples = self._tokens = 0
        self._handles = [
            accelerator.register_save_state_pre_hook(self._save),
            accelerator.register_load_state_pre_hook(self._load),
        ]

    @property
    def steps(self) -> int:
        """Optimizer steps the average has counted: :meth:`step` calls made when gradients
        were synced, and what ``load_state`` restored (``ema.counts["ba"]``)."""
        return self.ema.counts["ba"]

    def step(self, samples: int | None = None, tokens: int | None = None) -> bool:
        """Call after every ``optimizer.step()`` (inside or after ``accelerator.accumulate``).
        The average steps only when ``accelerator.sync_gradients`` is true, i.e. once per
        optimizer step under gradient accumulation; returns whether it stepped.

        ``samples``/``tokens``: this micro-batch's counts on this process, needed only for
        times in ``sp``/``tok``; they are summed over the accumulated micro-batches and over
        the processes (one reduction per optimizer step, only when such a time is used)."""
        if self._counting:
            self._samples += _count(samples, "samples")
            self._tokens += _count(tokens, "tokens")
        if not self.accelerator.sync_gradients:
            return False
        total_samples = total_tokens = None
        if self._counting:
            counts = torch.tensor([self._samples, self._tokens], device=self.accelerator.device)
            counts = self.accelerator.reduce(counts, reduction="sum")
            total_samples, total_tokens = (int(v) for v in counts.tolist())
            self._samples = self._tokens = 0
        self.ema.step(samples=total_samples, tokens=total_tokens)
        if self.log_every is not None and self.steps % self.log_every == 0:
            self.log()
        return True

    def epoch_end(self) -> None:
        """Call once at the end of each epoch."""
        self.ema.epoch_end()

    def swapped(self) -> contextlib.AbstractContextManager[nn.Module]:
        """``ema.swapped()``: the averaged weights in the model for the block."""
        return self.ema.swapped()

    def log(self, step: int | None = None) -> dict[str, float]:
        """``accelerator.log({"ema/smoothing": ..., "ema/num_updates": ...,
        "ema/skipped_updates": ...}, step=step)`` (default step: :attr:`steps`); returns what
        it logged."""
        values = {f"ema/{k}": v for k, v in stats(self.ema).items()}
        self.accelerator.log(values, step=self.steps if step is None else step)
        return values

    def remove(self) -> None:
        """Unregister the save and load hooks (and the file name)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        _FILES.get(self.accelerator, set()).discard(self.filename)

    # the hooks ---------------------------------------------------------------------------

    def _save(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        # every process runs save_state's hooks: each takes part in the gather, rank 0 writes
        write_average(self.ema, os.path.join(output_dir, self.filename),
                      {"steps": self.steps})

    def _load(self, models: list[Any], input_dir: str) -> None:
        path = Path(input_dir) / self.filename
        if not path.is_file():
            raise FileNotFoundError(
                f"load_state: {path} not found: {input_dir} holds no state of the average "
                f"registered as {self.filename!r} (saved before register()?)")
        state, _ = read_average(path)
        self.ema.load_state_dict(state)
        self._samples = self._tokens = 0

    def __repr__(self) -> str:
        return f"AccelerateEMA({self.ema!r}, filename={self.filename!r})"


def _count(value: Any, name: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a whole number >= 0 or None, got {value!r}")
    return value


def register(
    accelerator: Accelerator,
    ema: Average | nn.Module,
    *,
    config: AdapterConfig | None = None,
    filename: str = STATE_FILE,
    log_every: int | None = None,
) -> AccelerateEMA:
    """Register an average with ``accelerator``: it is saved by ``accelerator.save_state``
    and restored by ``accelerator.load_state`` (bitwise), through emakit's safe state file
    ``filename`` in the checkpoint folder.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        ema: an :class:`~emakit.EMA`, :class:`~emakit.BEMA` or :class:`~emakit.PostHocEMA`
            built on the prepared model; or the prepared model itself, with ``config``.
        config: with a model: an :class:`~emakit.EMAConfig`, :class:`~emakit.BEMAConfig` or
            :class:`~emakit.PostHocEMAConfig` (a PostHocEMA then evaluates on its first
            profile through ``swapped()``).
        filename: the state file's name in the folder (one per registered average).
        log_every: log the statistics through ``accelerator.log`` every that many optimizer
            steps (None: only when :meth:`AccelerateEMA.log` is called).

    Returns:
        An :class:`AccelerateEMA`: call its :meth:`~AccelerateEMA.step` after every
        ``optimizer.step()``.
    """
    if not isinstance(accelerator, Accelerator):
        raise TypeError(f"accelerator: expected an accelerate.Accelerator, got "
                        f"{type(accelerator).__name__}")
    average: Average
    if isinstance(ema, (EMA, BEMA, PostHocEMA)):
        if config is not None:
            raise TypeError("config: pass it with a model, not with an average already built")
        average = ema
    elif isinstance(ema, nn.Module):
        if config is None:
            raise TypeError("config: a model needs an emakit.EMAConfig, BEMAConfig or "
                            "PostHocEMAConfig (or pass an average built on it)")
        average = build_average(ema, adapter_config("Accelerate", config, {},
                                                    counts=("ba", "ep", "sp", "tok")))
    else:
        raise TypeError(f"ema: expected an emakit average (EMA, BEMA, PostHocEMA) or the "
                        f"prepared model, got {type(ema).__name__}")
    if not isinstance(filename, str) or not filename or os.sep in filename:
        raise ValueError(f"filename: expected a file name (no folder), got {filename!r}")
    if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                  or log_every < 1):
        raise ValueError(f"log_every: expected an integer >= 1 or None, got {log_every!r}")
    taken = _FILES.setdefault(accelerator, set())
    if filename in taken:
        raise ValueError(f"filename: {filename!r} is registered on this accelerator already; "
                         "give each average its own file name")
    taken.add(filename)
    return AccelerateEMA(accelerator, average, filename, log_every)
