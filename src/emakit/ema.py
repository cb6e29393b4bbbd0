"""EMA: the training clock, the smoothing schedule and the shadow, driven by the loop."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import all_ranks, check_same_model, process_group
from .functional import unwrap_model
from .schedules import PowerWarmup, check_smoothing, smoothing_from_half_life
from .store import Store
from .time import Clock, Time, convert

__all__ = ["EMA", "EMAModule"]

_STATE_VERSION = 1
_INTERVAL_UNITS = ("ba", "ep")


def _optional_time(value: str | Time | None, name: str) -> Time | None:
    return None if value is None else Time.parse(value, name)


class EMA:
    r"""An exponential moving average of a model's weights, driven by the training loop.

    Each update computes, for every trainable parameter and floating buffer,

    .. math:: \bar\theta \leftarrow s\,\bar\theta + (1 - s)\,\theta

    in the storage ``dtype`` (fp32 by default, also for bf16 models). With a half-life
    ``h`` and an update interval ``u`` (same unit, or converted with ``batches_per_epoch``)
    the smoothing is ``s = 2 ** (-u / h)``. At the first ``step()`` (or ``epoch_end()``, for
    an interval in epochs) on or after ``start`` the average is set to the model's weights;
    from then on it is updated whenever the batch (epoch) count is a multiple of the interval.
    Before that, every export gives the model's own weights.

    Args:
        model: the model being trained (DDP and ``torch.compile`` wrappers are seen through).
            Build the EMA after moving the model to its device.
        half_life: time string (``"1000ba"``, ``"2ep"``, ``"0.01dur"``); ``"1000ba"`` when
            neither ``half_life`` nor ``smoothing`` is given.
        smoothing: a float in [0, 1], or a schedule ``k -> factor`` for the k-th update
            (k = 1, 2, ...) such as :class:`~emakit.CosineSmoothing`. Not adjusted by the
            interval. Giving both ``half_life`` and ``smoothing`` is a ValueError.
        start: time before which the average follows the model exactly.
        update_interval: time between updates, in ``ba`` or ``ep``; default 1 unit of
            ``half_life``'s unit, else ``"1ba"``.
        total: whole training length, needed for ``dur`` times.
        batches_per_epoch: lets ``ba`` and ``ep`` times be mixed.
        buffers: ``"average"`` or ``"copy"`` for floating buffers; integer buffers are always
            taken from the model.
        dtype: storage dtype of the average (``None``: each tensor's own).
        device: where the average lives, e.g. ``"cpu"`` (``None``: beside each tensor).
        warmup: ``None`` or :class:`~emakit.PowerWarmup`, which caps the smoothing of early
            updates.
        skip_nonfinite: skip (count, warn) an update whose source holds NaN or Inf. Costs one
            host-device sync per update (and one all-reduce of one element when distributed,
            so that every rank skips the same updates).
        side_stream: on CUDA, run updates on a side stream that overlaps the next forward and
            backward pass; joined before every optimizer step and before the average is read
            (:mod:`emakit.streams`). Results are bitwise those of the plain path.
        shard: for a DDP (replicated) model, keep only 1/world of the average on each rank
            (see :mod:`emakit.distributed`); needs an initialized process group. FSDP2
            models need no flag: their average is always kept shard by shard.

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
        >>> ema.num_updates
        19
        >>> with ema.swapped():
        ...     averaged_out = model(torch.ones(1, 4))
    """

    def __init__(
        self,
        model: nn.Module,
        half_life: str | Time | None = None,
        smoothing: float | Callable[[int], float] | None = None,
        start: str | Time = "0ba",
        update_interval: str | Time | None = None,
        total: str | Time | None = None,
        batches_per_epoch: int | None = None,
        buffers: str = "average",
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        warmup: PowerWarmup | None = None,
        skip_nonfinite: bool = False,
        side_stream: bool = False,
        shard: bool = False,
    ) -> None:
        if half_life is not None and smoothing is not None:
            raise ValueError("half_life and smoothing: give one of them, not both")
        if half_life is None and smoothing is None:
            half_life = "1000ba"
        if batches_per_epoch is not None and (
            isinstance(batches_per_epoch, bool)
            or not isinstance(batches_per_epoch, int)
            or batches_per_epoch < 1
        ):
            raise ValueError(
                f"batches_per_epoch: expected an integer >= 1, got {batches_per_epoch!r}"
            )
        if warmup is not None and not isinstance(warmup, PowerWarmup):
            raise TypeError(f"warmup: expected None or emakit.PowerWarmup, got {warmup!r}")
        self.total = _optional_time(total, "total")
        if self.total is not None and self.total.unit == "dur":
            raise ValueError(f"total: expected a length in ba, ep, sp or tok, got {self.total}")
        self.batches_per_epoch = batches_per_epoch
        self.half_life = _optional_time(half_life, "half_life")
        self.start = Time.parse(start, "start")
        for name, t in (("half_life", self.half_life), ("start", self.start)):
            if t is not None and t.unit == "dur" and self.total is None:
                raise ValueError(f"{name}={str(t)!r} is a fraction of training: pass total")

        if update_interval is None:
            unit = "ba"
            if self.half_life is not None and self.half_life.unit in _INTERVAL_UNITS:
                unit = self.half_life.unit
            elif self.half_life is not None and self.total is not None:
                unit = self.total.unit if self.total.unit in _INTERVAL_UNITS else "ba"
            update_interval = Time(1, unit)
        self.update_interval = Time.parse(update_interval, "update_interval")
        interval = self.update_interval
        if interval.unit not in _INTERVAL_UNITS:
            raise ValueError(
                f"update_interval: expected a time in ba or ep, got {str(interval)!r}"
            )
        if not isinstance(interval.value, int) or interval.value < 1:
            raise ValueError(
                f"update_interval: expected a whole number >= 1 of {interval.unit}, "
                f"got {str(interval)!r}"
            )

        self._schedule: Callable[[int], float] | None = None
        if self.half_life is not None:
            h = convert(self.half_life, interval.unit, "half_life", batches_per_epoch, self.total)
            if h <= 0:
                raise ValueError(f"half_life: expected a time > 0, got {str(self.half_life)!r}")
            self._max_smoothing = smoothing_from_half_life(h, interval.value)
        elif callable(smoothing):
            self._schedule = smoothing
            self._max_smoothing = 1.0
        else:
            self._max_smoothing = check_smoothing(smoothing)
        self.warmup = warmup
        self.skip_nonfinite = bool(skip_nonfinite)

        if not isinstance(shard, bool):
            raise TypeError(f"shard: expected a bool, got {shard!r}")
        self._group = process_group(model, shard)  # ValueError naming shard without one
        self.model = unwrap_model(model)
        if self._group is not None:
            check_same_model(self.model, self._group)
        self.shadow = Store(
            self.model, dtype=dtype, device=device, buffers=buffers, side_stream=side_stream,
            shard=shard, group=self._group,
        )
        self.clock = Clock(batches_per_epoch, self.total)
        self.num_updates = 0
        self.skipped_updates = 0
        self.started = False
        self._swapped = False
        self.module = EMAModule(self)

    # the loop's side ---------------------------------------------------------------------

    def step(self, samples: int | None = None, tokens: int | None = None) -> None:
        """Call once per optimizer step. Advances the clock and updates when due.

        ``samples`` and ``tokens`` are the counts in this step's batch, needed only for
        times in ``sp`` or ``tok``.
        """
        for unit, value in (("sp", samples), ("tok", tokens)):
            uses = self.start.unit == unit or (
                self.start.unit == "dur" and self.total is not None and self.total.unit == unit
            )
            if uses and value is None:
                raise ValueError(
                    f"{'samples' if unit == 'sp' else 'tokens'}: start={str(self.start)!r} "
                    f"counts {unit}, so step() needs that count"
                )
        self.clock.advance_batch(samples, tokens)
        if self.update_interval.unit == "ba":
            self._on_event()

    def epoch_end(self) -> None:
        """Call once at the end of each epoch."""
        self.clock.advance_epoch()
        if self.update_interval.unit == "ep":
            self._on_event()

    def _on_event(self) -> None:
        if not self.started:
            if self.clock.reached(self.start):
                self._begin()
            return
        if self.clock.counts[self.update_interval.unit] % self.update_interval.value == 0:
            self.update()

    def _begin(self) -> None:
        self._check_not_swapped("start the average")
        self.shadow.synchronize()
        self.shadow.reset()
        self.started = True

    def _check_not_swapped(self, action: str) -> None:
        if self._swapped:
            raise RuntimeError(f"cannot {action} inside ema.swapped(): leave the block first")

    @property
    def smoothing(self) -> float:
        """The smoothing the next update will use (schedule and warmup applied)."""
        k = self.num_updates + 1
        if self._schedule is not None:
            value = check_smoothing(self._schedule(k), f"smoothing schedule at update {k}")
        else:
            value = self._max_smoothing
        if self.warmup is not None:
            value = self.warmup(k, value)
        return value

    def update(self) -> None:
        """One update now, with the current smoothing. Before the start, sets the average to
        the model's weights instead."""
        if not self.started:
            self._begin()
            return
        self._check_not_swapped("update the average")
        if self.skip_nonfinite and not self._sources_finite():
            self.skipped_updates += 1
            warnings.warn(
                f"emakit: skipped an EMA update at batch {self.clock.counts['ba']}: "
                "the model holds NaN or Inf",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.shadow.update(1.0 - self.smoothing)
        self.num_updates += 1

    def _sources_finite(self) -> bool:
        finite = self.shadow.sources_finite()
        return finite if self._group is None else all_ranks(finite, self._group)

    # the averaged weights ----------------------------------------------------------------

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Inside the block the model computes with the averaged weights; after it the
        training weights are back bitwise, also when the block raises. Parameters keep their
        identity, so the optimizer and its state are untouched. Yields the model."""
        if self._swapped:
            raise RuntimeError("ema.swapped() is already active: swaps cannot be nested")
        self._swapped = True
        self.shadow.synchronize()
        try:
            if not self.started:
                yield self.model
            else:
                with self.shadow.swapped():
                    yield self.model
        finally:
            self._swapped = False

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the trained model) for good."""
        self._check_not_swapped("copy the average")
        target = self.model if model is None else unwrap_model(model)
        if target is self.model:
            # Shard to shard under FSDP2 (the mapping holds DTensors); no full gather.
            if self.started:
                target.load_state_dict(self.shadow.mapping(started=True), strict=False)
            return
        target.load_state_dict(self.ema_state_dict(), strict=True)

    def ema_state_dict(self, rank0_only: bool = False) -> dict[str, Tensor]:
        """A plain state dict of the averaged weights (names and dtypes as the model's, no
        wrapper prefixes): ``model.load_state_dict(ema.ema_state_dict())`` just works.
        Frozen parameters and integer buffers come from the live model.

        Under FSDP2 or ``shard=True`` the shards are gathered into full tensors, so the dict
        loads into an unsharded model; this is a collective (every rank calls it).
        ``rank0_only=True``: only rank 0 keeps the tensors, on the CPU; other ranks get {}.
        """
        self.shadow.synchronize()
        return self.shadow.export(
            started=self.started and not self._swapped, rank0_only=rank0_only
        )

    # checkpoints -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "half_life": None if self.half_life is None else str(self.half_life),
            "update_interval": str(self.update_interval),
            "start": str(self.start),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loads with ``torch.load(weights_only=True)``."""
        self.shadow.synchronize()
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "clock": self.clock.state_dict(),
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "started": self.started,
            "average": {n: t.detach().clone() for n, t in self.shadow.tensors().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` saved. Names and shapes are checked first: a state
        from another architecture raises a ValueError listing what differs."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping from EMA.state_dict(), got {type(state)}")
        missing = [k for k in ("version", "clock", "num_updates", "started", "average")
                   if k not in state]
        if missing:
            raise ValueError(f"state: not an EMA.state_dict(); missing keys {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state: version {state['version']!r} is not {_STATE_VERSION}")
        self._check_not_swapped("load a state")
        self.shadow.synchronize()
        self.shadow.load(state["average"], what="EMA state_dict['average']")
        self.clock.load_state_dict(state["clock"])
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.started = bool(state["started"])
        saved = state.get("config", {})
        if saved and saved != self._config():
            warnings.warn(
                f"emakit: loading an EMA state saved with {saved} into one built with "
                f"{self._config()}",
                UserWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        how = str(self.half_life) if self.half_life else f"smoothing={self._max_smoothing}"
        return (
            f"EMA({how}, start={self.start}, update_interval={self.update_interval}, "
            f"num_updates={self.num_updates}, started={self.started})"
        )


class EMAModule(nn.Module):
    """Computes with the averaged weights through ``torch.func.functional_call``: no swap and
    no copy of the weights beyond the average itself (a transient cast only where the
    storage dtype or device differs from the model's). For teacher networks (BYOL, DINO,
    mean teacher) while training goes on. Runs without autograd; in eval mode unless
    ``.train()`` is called, whatever mode the trained model is in.
    """

    def __init__(self, ema: EMA) -> None:
        super().__init__()
        # Not a submodule: the trained model's parameters must not show up here.
        object.__setattr__(self, "_ema", ema)
        self.train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        ema: EMA = self._ema
        model = ema.model
        ema.shadow.synchronize()
        if ema.shadow.model_forward:
            return self._forward_fsdp(args, kwargs)
        mapping = ema.shadow.mapping(started=ema.started and not ema._swapped)
        if self.training:
            # Train-mode BatchNorm writes running statistics in place: keep the average safe.
            buffers = {n for n, _ in model.named_buffers()}
            mapping = {n: t.clone() if n in buffers else t for n, t in mapping.items()}
        modes = [(m, m.training) for m in model.modules()]
        model.train(self.training)
        try:
            with torch.no_grad():
                return torch.func.functional_call(model, mapping, args, kwargs)
        finally:
            for m, mode in modes:
                m.training = mode

    def _forward_fsdp(self, args: tuple, kwargs: dict) -> Any:
        # FSDP2's pre-forward hook installs the gathered training parameters, overriding
        # functional_call's: swap the averaged shards in instead (a backup of this rank's
        # shards, 1/world of the model), restored bitwise after. A collective, like any
        # FSDP2 forward: every rank calls it.
        ema: EMA = self._ema
        model = ema.model
        buffers = list(model.buffers()) if self.training else []
        saved = [b.detach().clone() for b in buffers]
        modes = [(m, m.training) for m in model.modules()]
        model.train(self.training)
        swap = ema.shadow.swapped() if ema.started and not ema._swapped else None
        try:
            with torch.no_grad(), swap or contextlib.nullcontext():
                return model(*args, **kwargs)
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved, strict=True):
                    b.copy_(v)
            for m, mode in modes:
                m.training = mode

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        """The averaged weights, as ``EMA.ema_state_dict()``."""
        return self._ema.ema_state_dict()

    def extra_repr(self) -> str:
        return repr(self._ema)
