"""EMA: the configuration, the training clock, the smoothing schedule and the store, driven by
the loop."""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import EMAConfig, takes_config
from .distributed import all_ranks, check_same_model, process_group
from .functional import unwrap_model
from .schedules import PowerWarmup, check_smoothing
from .store import Store
from .time import Clock

__all__ = ["EMA", "EMAModule", "swapped_by", "check_initialized"]

_STATE_VERSION = 2
# model -> the EMA whose average it holds now (inside that EMA's swapped() block)
_SWAPPED: weakref.WeakKeyDictionary[nn.Module, EMA] = weakref.WeakKeyDictionary()


def swapped_by(model: nn.Module) -> EMA | None:
    """The EMA whose average ``model`` holds now (inside its ``swapped()``), or None."""
    return _SWAPPED.get(unwrap_model(model))


def check_initialized(model: nn.Module) -> None:
    """Raise a ValueError naming the first parameter or buffer that is not materialized yet
    (``nn.LazyLinear`` before its first forward pass, or a tensor on the meta device)."""
    from torch.nn.parameter import UninitializedTensorMixin

    from .fsdp1 import named_state  # FSDP1's state_dict() would all-gather the model

    for name, t in named_state(unwrap_model(model)):
        if isinstance(t, UninitializedTensorMixin):
            raise ValueError(f"model: {name} is not initialized yet (a lazy module): run one "
                             "forward pass before building the EMA")
        if isinstance(t, Tensor) and t.is_meta:
            raise ValueError(f"model: {name} is on the meta device and holds no values: "
                             "materialize the model (to_empty + init) before building the EMA")


def _count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


class _ScalerWatch:
    """Tells, on the device, whether the optimizer step a GradScaler just ran was skipped.

    A step with Inf/NaN gradients is skipped and ``scaler.update()`` then multiplies the
    scale by ``backoff_factor < 1``; otherwise the scale stays or grows (``growth_factor >
    1``). So ``scale_now < scale_before`` marks a skipped step, decided on the device with
    no host sync. ``ema.step()`` must come after ``scaler.update()``, as usual.
    """

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler
        # one sync here, at construction: the scale before the first step
        self._before: Tensor | float = float(scaler.get_scale()) if scaler.is_enabled() else 0.0
        self._skipped: Tensor | None = None

    def masked(self, weight: float) -> float | Tensor:
        """``weight``, or 0 when the step was skipped, as a 0-d tensor on the scale's device."""
        if not self.scaler.is_enabled():
            return weight
        # torch keeps the scale tensor itself private; this reads it without a host sync
        scale = self.scaler._get_scale_async()
        if scale is None:  # the scaler has not scaled anything yet
            return weight
        before = self._before
        if not isinstance(before, Tensor):
            before = torch.full_like(scale, before)
        ran = (scale >= before).to(torch.float32)
        self._before = scale.detach().clone()
        self._skipped = (1.0 - ran) if self._skipped is None else self._skipped + (1.0 - ran)
        return ran * weight

    def observe(self) -> None:
        """Take the current scale as the one before the next step (at the start copy)."""
        scale = self.scaler._get_scale_async() if self.scaler.is_enabled() else None
        if scale is not None:
            self._before = scale.detach().clone()

    def skipped(self) -> int:
        return 0 if self._skipped is None else int(self._skipped.item())


def _warmup_product(warmup: PowerWarmup, first: int, last: int, cap: float) -> float:
    """The product of ``warmup(k, cap)`` for k = first..last; once a factor reaches the
    cap every later one does too (the warmup grows with k), so that tail is one power."""
    value = 1.0
    for k in range(first, last + 1):
        f = warmup(k, cap)
        if f >= cap:
            return value * cap ** (last - k + 1)
        value *= f
    return value


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
        config: an :class:`~emakit.EMAConfig`, or its fields as keyword arguments (see there
            for each: ``half_life``, ``smoothing``, ``start``, ``update_interval``, ``total``,
            ``batches_per_epoch``, ``warmup``, ``skip_nonfinite``, ``switch_every``,
            ``grad_scaler`` and the storage: ``buffers``, ``dtype``, ``device``,
            ``compensated``, ``side_stream``, ``shard``, ``exclude``, ``include``).

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

    @takes_config(EMAConfig)
    def __init__(self, model: nn.Module, config: EMAConfig | None = None, **kwargs: Any) -> None:
        config = EMAConfig.resolve(config, kwargs, type(self).__name__)
        config.require_total()
        self.config = config
        self._schedule = config.smoothing if callable(config.smoothing) else None
        self._max_smoothing = config.max_smoothing()  # per unit of the interval's unit
        check_initialized(model)

        shard = config.shard
        self._group = process_group(model, shard)  # ValueError naming shard without one
        self.model = unwrap_model(model)
        if self._group is not None:
            check_same_model(self.model, self._group)
        self.shadow = Store(self.model, **config.store_arguments(), group=self._group)
        self.clock = Clock(self.batches_per_epoch, self.total)
        self.num_updates = 0
        self._skipped = 0
        self.started = False
        # Training time of the average, in units of the interval's unit: the start is k = 1;
        # _k is the k the average was last brought up to.
        self._origin = 0  # the clock count (interval's unit) at which k = 1
        self._k = 0
        self._warned_start = False
        self._scaler = _ScalerWatch(config.grad_scaler) if config.grad_scaler is not None else None
        self.module = EMAModule(self)

    # the configuration, read through (one copy of each argument: the config's) ----------

    half_life = property(lambda self: self.config.half_life)
    start = property(lambda self: self.config.start)
    update_interval = property(lambda self: self.config.update_interval)
    total = property(lambda self: self.config.total)
    batches_per_epoch = property(lambda self: self.config.batches_per_epoch)
    warmup = property(lambda self: self.config.warmup)
    skip_nonfinite = property(lambda self: self.config.skip_nonfinite)

    # the loop's side ---------------------------------------------------------------------

    def step(self, samples: int | None = None, tokens: int | None = None) -> None:
        """Call once per optimizer step. Advances the clock and updates when due.

        ``samples`` and ``tokens`` are the counts in this step's batch, needed only for
        times in ``sp`` or ``tok``.
        """
        self._check_not_swapped("step the EMA")
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
        self._on_event("ba")

    def epoch_end(self) -> None:
        """Call once at the end of each epoch."""
        self._check_not_swapped("end an epoch of the EMA")
        self.clock.advance_epoch()
        self._on_event("ep")

    def _on_event(self, unit: str) -> None:
        if self.update_interval.unit == unit:
            if not self.started:
                if self.clock.reached(self.start):
                    self._begin()
            elif self.clock.counts[unit] % self.update_interval.value == 0:
                self.update()
        switch = self.config.switch_every
        if (self.started and switch is not None and switch.unit == unit
                and self.clock.counts[unit] % switch.value == 0):
            self.copy_to()

    def _count(self) -> int:
        return self.clock.counts[self.update_interval.unit]

    def _begin(self) -> None:
        """The start: the average takes the model's weights (update 1, k = 1)."""
        self._check_not_swapped("start the average")
        if self.skip_nonfinite and not self._sources_finite():
            if not self._warned_start:
                self._warned_start = True
                warnings.warn(
                    f"emakit: the EMA does not start at {self._where()}: the model holds NaN "
                    "or Inf; it starts at the first update time at which the model is finite",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return
        self.shadow.synchronize()
        self.shadow.reset()
        if self._scaler is not None:
            self._scaler.observe()
        self.started = True
        self.num_updates += 1
        self._origin = self._count()
        self._k = 1

    @property
    def _handout(self) -> Any:
        """The store whose weights export, swap, ``module`` and ``copy_to`` hand out."""
        return self.shadow

    @property
    def _in_swap(self) -> bool:
        return swapped_by(self.model) is self

    def _where(self) -> str:
        unit = self.update_interval.unit
        return f"{'batch' if unit == 'ba' else 'epoch'} {self.clock.counts[unit]}"

    def _check_not_swapped(self, action: str) -> None:
        owner = swapped_by(self.model)
        if owner is self:
            raise RuntimeError(f"cannot {action} inside ema.swapped(): leave the block first")
        if owner is not None:
            raise RuntimeError(
                f"cannot {action}: the model holds another EMA's average inside that EMA's "
                "swapped() block; leave that block first"
            )

    def _span(self) -> tuple[int, int]:
        """(first, last) k that the next update covers: the interval's units since the
        last update, or one interval when the clock has not moved (a bare ``update()``)."""
        end = self._count() - self._origin + 1
        if end <= self._k:
            end = self._k + self.update_interval.value
        return self._k + 1, end

    def _factor(self, first: int, last: int) -> float:
        """The smoothing of an update covering training time k = first..last: the product
        of the per-unit factors (warmup applied to each), or the schedule's value."""
        if self._schedule is not None:
            k = self.num_updates + 1
            value = check_smoothing(self._schedule(k), f"smoothing schedule at update {k}")
            if self.warmup is not None:
                value = min(value, _warmup_product(self.warmup, first, last, 1.0))
            return value
        if self.warmup is None:
            return self._max_smoothing ** (last - first + 1)
        return _warmup_product(self.warmup, first, last, self._max_smoothing)

    @property
    def smoothing(self) -> float:
        """The smoothing the next update will use (schedule and warmup applied); 0.0 before
        the start, whose copy ignores it."""
        if not self.started:
            return 0.0
        u = self.update_interval.value
        due = (self._count() // u + 1) * u  # the next multiple of the interval
        first = self._k + 1
        return self._factor(first, max(due - self._origin + 1, first))

    def update(self) -> None:
        """One update now. Before the start, sets the average to the model's weights
        instead. The update covers the training time since the last one (one interval when
        the clock has not moved), so its smoothing is the product of the per-batch factors."""
        self._check_not_swapped("update the average")
        if not self.started:
            self._begin()
            return
        first, last = self._span()
        self._k = last
        if self.skip_nonfinite and not self._sources_finite():
            self._skipped += 1
            warnings.warn(
                f"emakit: skipped an EMA update at {self._where()}: the model holds NaN or Inf",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        weight: float | Tensor = 1.0 - self._factor(first, last)
        if self._scaler is not None:
            weight = self._scaler.masked(weight)
        self._apply(weight, last)
        self.num_updates += 1

    def _apply(self, weight: float | Tensor, k: int) -> None:
        """Bring the average to training time ``k`` with the update weight ``1 - s``."""
        self.shadow.update(weight)

    @property
    def skipped_updates(self) -> int:
        """Updates skipped: non-finite sources (``skip_nonfinite``) and optimizer steps the
        ``grad_scaler`` skipped (counted on the device; reading this synchronizes)."""
        return self._skipped + (self._scaler.skipped() if self._scaler is not None else 0)

    @skipped_updates.setter
    def skipped_updates(self, value: int) -> None:
        self._skipped = value - (self._scaler.skipped() if self._scaler is not None else 0)

    def _sources_finite(self) -> bool:
        finite = self.shadow.sources_finite()
        return finite if self._group is None else all_ranks(finite, self._group)

    def reset(self) -> None:
        """The average takes the model's weights now; warmup restarts from here (this time
        is k = 1 again); the clock runs on. Before the start, starts the average now."""
        self._check_not_swapped("reset the average")
        if not self.started:
            self._begin()
            return
        self.shadow.synchronize()
        self.shadow.reset()
        self._origin = self._count()
        self._k = 1

    # the averaged weights ----------------------------------------------------------------

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Inside the block the model computes with the averaged weights; after it the
        training weights are back bitwise, also when the block raises. Parameters keep their
        identity, so the optimizer and its state are untouched. Yields the model.

        One swap per model at a time: nesting, or another EMA's swap of the same model,
        is a RuntimeError; so are ``step()``, ``update()`` and loads inside the block."""
        owner = swapped_by(self.model)
        if owner is self:
            raise RuntimeError("ema.swapped() is already active: swaps cannot be nested")
        if owner is not None:
            raise RuntimeError("ema.swapped(): the model already holds another EMA's average "
                               "(inside that EMA's swapped() block); leave that block first")
        _SWAPPED[self.model] = self
        self.shadow.synchronize()
        try:
            if not self.started:
                yield self.model
            else:
                with self._handout.swapped():
                    yield self.model
        finally:
            _SWAPPED.pop(self.model, None)

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the trained model) for good."""
        self._check_not_swapped("copy the average")
        target = self.model if model is None else unwrap_model(model)
        if target is self.model:
            if not self.started:
                return
            if self.shadow.model_forward:  # FSDP1/2, ZeRO-3: into this rank's shards, no gather
                self._handout.copy_to_model()
            else:
                target.load_state_dict(self._handout.mapping(started=True), strict=False)
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
        return self._handout.export(
            started=self.started and not self._in_swap, rank0_only=rank0_only
        )

    # checkpoints -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "half_life": None if self.half_life is None else str(self.half_life),
            "update_interval": str(self.update_interval),
            "start": str(self.start),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loads with ``torch.load(weights_only=True)``.

        Format (version 2): ``version``, ``config`` (for a warning on mismatch), ``clock``
        (batch, epoch, sample and token counts), ``num_updates`` (the start copy counted),
        ``skipped_updates``, ``started``, ``origin`` and ``k`` (the warmup's training time:
        the clock count at which k = 1, and the k the average was last brought to) and
        ``average``: name -> averaged tensor in the storage dtype, and with
        ``compensated=True`` ``compensation``: name -> the compensation term (the exact
        average is ``average + compensation``). A state without it loads with a zero
        compensation; a compensation is ignored by an EMA built with ``compensated=False``."""
        self.shadow.synchronize()
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "clock": self.clock.state_dict(),
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "started": self.started,
            "origin": self._origin,
            "k": self._k,
            "average": {n: t.detach().clone() for n, t in self.shadow.tensors().items()},
            **self._compensation_state(),
        }

    def _compensation_state(self) -> dict[str, Any]:
        if not self.shadow.compensated:
            return {}
        comp = self.shadow.compensation_tensors()
        return {"compensation": {n: t.detach().clone() for n, t in comp.items()}}

    def nbytes(self) -> int:
        """Bytes of averaged state this rank holds: the average, its compensation and the
        staging and pinned buffers the updates use."""
        return self.shadow.state_nbytes() + self.shadow.workspace_nbytes()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict()`` saved. All or nothing: everything is checked first
        (keys, counts, names and shapes of the average: a state from another architecture
        raises a ValueError listing what differs), and nothing changes when it raises.
        Version 1 states (emakit 0.1) load too."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping from EMA.state_dict(), got {type(state)}")
        missing = [k for k in ("version", "clock", "num_updates", "started", "average")
                   if k not in state]
        if missing:
            raise ValueError(f"state: not an EMA.state_dict(); missing keys {missing}")
        version = state["version"]
        if version not in (1, _STATE_VERSION):
            raise ValueError(f"state: version {version!r} is not one of 1, {_STATE_VERSION}")
        self._check_not_swapped("load a state")
        clock = state["clock"]
        if not isinstance(clock, Mapping) or sorted(clock) != sorted(self.clock.counts):
            raise ValueError(f"state['clock']: expected counts {sorted(self.clock.counts)}, "
                             f"got {clock!r}")
        counts = {u: _count(clock[u], f"state['clock'][{u!r}]") for u in self.clock.counts}
        num_updates = _count(state["num_updates"], "state['num_updates']")
        skipped = _count(state.get("skipped_updates", 0), "state['skipped_updates']")
        started = state["started"]
        if not isinstance(started, bool):
            raise ValueError(f"state['started']: expected a bool, got {started!r}")
        unit, u = self.update_interval.unit, self.update_interval.value
        if version == 1:  # 0.1 did not count the start copy, nor keep the warmup's time
            num_updates += int(started)
            k = 1 + (num_updates - 1) * u if started else 0
            origin = counts[unit] - k + 1 if started else 0
        else:
            origin = _count(state.get("origin"), "state['origin']", minimum=-(2**62))
            k = _count(state.get("k"), "state['k']")
        average = state["average"]
        if not isinstance(average, Mapping):
            raise ValueError(f"state['average']: expected a mapping of tensors, got "
                             f"{type(average).__name__}")
        compensation = state.get("compensation")
        if compensation is not None and not isinstance(compensation, Mapping):
            raise ValueError(f"state['compensation']: expected a mapping of tensors, got "
                             f"{type(compensation).__name__}")
        self.shadow.synchronize()
        self.shadow.check_load(average, what="EMA state_dict['average']")
        if compensation is not None and self.shadow.compensated:
            self.shadow.check_load(compensation, what="EMA state_dict['compensation']")
        # nothing below raises for a state that passed the checks above
        self.shadow.load(average, what="EMA state_dict['average']",
                         compensation=compensation if self.shadow.compensated else None)
        self.clock.counts = counts
        self.num_updates, self.skipped_updates, self.started = num_updates, skipped, started
        self._origin, self._k = origin, k
        saved = state.get("config", {})
        if saved and saved != self._config():
            warnings.warn(
                f"emakit: loading an EMA state saved with {saved} into one built with "
                f"{self._config()}",
                UserWarning,
                stacklevel=2,
            )

    def __repr__(self) -> str:
        how = str(self.half_life) if self.half_life else f"smoothing={self.config.smoothing}"
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

    Threads: a call puts the averaged tensors into the trained model's modules for its
    duration (``functional_call`` swaps them in and back), so it must not run while another
    thread runs the trained model (a forward or an optimizer step there would see, or write
    into, the averaged values). Call it from the training thread, as teacher networks do; to
    evaluate in another thread, give it its own copy (``model2.load_state_dict(
    ema.ema_state_dict())``).
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
        mapping = ema._handout.mapping(started=ema.started and not ema._in_swap)
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
        swap = ema._handout.swapped() if ema.started and not ema._in_swap else None
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
