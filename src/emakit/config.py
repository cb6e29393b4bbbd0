"""One configuration of the EMA arguments, validated without a model.

:class:`StoreConfig` holds what the averaged tensors need (storage dtype and device, which
tensors, how they are updated); :class:`EMAConfig` adds the timing (half-life or smoothing,
start, interval, warmup) and the features built on the clock. :class:`~emakit.EMA`,
:class:`~emakit.BEMA`, :class:`~emakit.PostHocEMA` and every trainer callback take their
keyword arguments through these classes, so an argument is written, checked and documented
once, and a new one reaches every trainer without being restated. :func:`takes_config`
gives a function the signature of the fields, so ``help()`` and ``inspect.signature`` show
every argument.

>>> from emakit.config import EMAConfig
>>> EMAConfig(half_life="100ba").max_smoothing()  # 2 ** (-1 / 100), per batch
0.9930924954370359
>>> EMAConfig(half_life="100ba", smoothing=0.9)
Traceback (most recent call last):
...
ValueError: half_life and smoothing: give one of them, not both
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

from .executors import EXECUTORS
from .layout import Matcher, Selector, check_storage
from .schedules import PowerWarmup, check_smoothing, smoothing_from_half_life
from .time import Time, convert

__all__ = ["StoreConfig", "EMAConfig", "BEMAConfig", "takes_config"]

INTERVAL_UNITS = ("ba", "ep")



def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def _device(value: Any) -> torch.device | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise TypeError(f"device: expected a device string such as 'cpu' or 'cuda:0', a "
                        f"torch.device or None, got {value!r}")
    if isinstance(value, int):  # an index means an accelerator, as torch.device(0) does
        if not torch.cuda.is_available():
            raise ValueError(f"device: {value!r} (an accelerator index) is not available in this "
                             "process: torch sees no CUDA device")
        value = f"cuda:{value}"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"device: {value!r} is not a device ({err})") from None
    if device.type == "meta":
        raise ValueError("device: 'meta' tensors hold no values to average")
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"device: {value!r} is not available in this process "
                             f"(torch {torch.__version__} sees no {device.type} device)")
        count = getattr(backend, "device_count", None)
        if device.index is not None and count is not None and device.index >= count():
            raise ValueError(f"device: {value!r} does not exist; this process sees "
                             f"{count()} {device.type} device(s)")
    return device


def _optional_time(value: Any, name: str) -> Time | None:
    return None if value is None else Time.parse(value, name)


def _interval(value: Any, name: str) -> Time:
    t = Time.parse(value, name)
    if t.unit not in INTERVAL_UNITS:
        raise ValueError(f"{name}: expected a time in ba or ep, got {str(t)!r}")
    number = t.value
    if isinstance(number, float) and number.is_integer():
        number = int(number)  # "1e20ba" is a whole number, however it was written
    if not isinstance(number, int) or number < 1:
        raise ValueError(f"{name}: expected a whole number >= 1 of {t.unit}, got {str(t)!r}")
    return Time(number, t.unit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """What the averaged tensors need: the storage and which tensors.

    Args:
        buffers: ``"average"`` or ``"copy"`` for floating buffers (BatchNorm statistics);
            integer buffers are always taken from the model.
        dtype: storage dtype of the average; ``None`` keeps each tensor's own. fp32 by
            default, also for bf16/fp16 models (a 16-bit average stops moving); fp32 is a
            floor, so fp64 tensors keep fp64.
        device: where the average lives, e.g. ``"cpu"`` to keep it off the accelerator
            (``None``: beside each tensor).
        compensated: keep a compensation term beside the average (compensated summation,
            same dtype: 8 bytes per element for fp32), so the average follows a float64 EMA
            of the same weights for half-lives up to 1e7 updates and more. ``False`` halves
            the state and the bytes an update moves, but an fp32 average then freezes once
            its increments fall under half an ulp (a weight near 1 moving by 1e-3 freezes at
            a half-life of about 2.3e4 updates); safe for half-lives under about 1e4.
        side_stream: deprecated: ``True`` warns (``FutureWarning``) and runs the plain path.
            Measured on an H200 it saved nothing in a real training step, and an in-place
            write of the weights outside ``torch.optim`` raced with it.
        shard: for a DDP (replicated) model, keep 1/world of the average on each rank.
        exclude: tensors not to average, exported from the model like frozen ones: glob
            patterns over state-dict names, or ``callable(name, tensor) -> bool``.
        include: floating buffers to average although ``buffers="copy"`` (same forms).
        executor: how updates run: ``"auto"`` (CUDA: the plan captured in a CUDA graph of
            fused compiled kernels; CPU: fused for a compensated average, else eager),
            ``"eager"``, ``"fused"`` or ``"graph"`` (see :mod:`emakit.executors`).
    """

    buffers: str = "average"
    dtype: torch.dtype | None = torch.float32
    device: torch.device | str | None = None
    compensated: bool = True
    side_stream: bool = False
    shard: bool = False
    exclude: Selector = None
    include: Selector = None
    executor: str = "auto"

    def __post_init__(self) -> None:
        check_storage(self.dtype, None, self.buffers)
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor: expected one of {EXECUTORS}, got {self.executor!r}")
        object.__setattr__(self, "device", _device(self.device))
        for name in ("compensated", "side_stream", "shard"):
            _flag(getattr(self, name), name)
        for name in ("exclude", "include"):
            value = getattr(self, name)
            Matcher(value, name)  # raises a TypeError naming a bad argument
            if value is not None and not callable(value):  # patterns, as a tuple
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    @classmethod
    def resolve(cls, config: StoreConfig | None, kwargs: dict[str, Any], who: str) -> Any:
        """``config``, or one built from ``kwargs`` (the keyword form); giving both, or a
        config of another class, is a TypeError naming ``who``."""
        if config is None:
            return cls(**kwargs)
        if kwargs:
            raise TypeError(f"{who}: pass either config or keyword arguments, not both (got "
                            f"config and {sorted(kwargs)})")
        if not isinstance(config, cls):
            raise TypeError(f"config: expected an emakit.{cls.__name__}, got "
                            f"{type(config).__name__}")
        return config

    def store_arguments(self) -> dict[str, Any]:
        """The fields of :class:`StoreConfig` alone, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(StoreConfig)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EMAConfig(StoreConfig):
    """The arguments of an EMA: timing and schedule, plus :class:`StoreConfig`'s storage.

    Args:
        half_life: time string (``"1000ba"``, ``"2ep"``, ``"0.01dur"``); ``"1000ba"`` when
            neither ``half_life`` nor ``smoothing`` is given.
        smoothing: a float in [0, 1] per update, or a schedule ``k -> factor`` called with
            the number of the update it is for (the start copy is update 1, so the first
            averaging update asks for k = 2). Giving both is a ValueError.
        start: time before which the average follows the model exactly.
        update_interval: time between updates, in ``ba`` or ``ep``; default 1 unit of
            ``half_life``'s unit, else ``"1ba"``.
        total: whole training length, needed for ``dur`` times.
        batches_per_epoch: lets ``ba`` and ``ep`` times be mixed.
        warmup: ``None`` or :class:`~emakit.PowerWarmup`, in training time.
        skip_nonfinite: skip (count, warn) an update whose source holds NaN or Inf; also
            delays the start copy until the model is finite. One host-device sync per update.
        switch_every: time string: at those times, after the update, the model's averaged
            tensors take the average (Switch EMA); the optimizer state is untouched.
        grad_scaler: a ``torch.amp.GradScaler``: a step it skipped (Inf/NaN gradients)
            leaves the average unchanged, decided on the device (no host sync).
    """

    half_life: str | Time | None = None
    smoothing: float | Callable[[int], float] | None = None
    start: str | Time = "0ba"
    update_interval: str | Time | None = None
    total: str | Time | None = None
    batches_per_epoch: int | None = None
    warmup: PowerWarmup | None = None
    skip_nonfinite: bool = False
    switch_every: str | Time | None = None
    grad_scaler: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.half_life is not None and self.smoothing is not None:
            raise ValueError("half_life and smoothing: give one of them, not both")
        bpe = self.batches_per_epoch
        if bpe is not None and (isinstance(bpe, bool) or not isinstance(bpe, int) or bpe < 1):
            raise ValueError(f"batches_per_epoch: expected an integer >= 1, got {bpe!r}")
        if self.warmup is not None and not isinstance(self.warmup, PowerWarmup):
            raise TypeError(f"warmup: expected None or emakit.PowerWarmup, got {self.warmup!r}")
        _flag(self.skip_nonfinite, "skip_nonfinite")
        total = _optional_time(self.total, "total")
        if total is not None and total.unit == "dur":
            raise ValueError(f"total: expected a length in ba, ep, sp or tok, got {total}")
        if total is not None and total.value == 0:
            raise ValueError(f"total: expected a training length > 0, got {str(total)!r}")
        set_ = object.__setattr__
        set_(self, "total", total)
        half_life = self.half_life
        if half_life is None and self.smoothing is None:
            half_life = "1000ba"
        set_(self, "half_life", _optional_time(half_life, "half_life"))
        set_(self, "start", Time.parse(self.start, "start"))
        if self.smoothing is not None and not callable(self.smoothing):
            set_(self, "smoothing", check_smoothing(self.smoothing))
        if self.update_interval is None:
            unit = "ba"
            if self.half_life is not None and self.half_life.unit in INTERVAL_UNITS:
                unit = self.half_life.unit
            elif self.half_life is not None and total is not None:
                unit = total.unit if total.unit in INTERVAL_UNITS else "ba"
            set_(self, "update_interval", Time(1, unit))
        set_(self, "update_interval", _interval(self.update_interval, "update_interval"))
        if self.switch_every is not None:
            set_(self, "switch_every", _interval(self.switch_every, "switch_every"))
        if self.half_life is not None and self.half_life.unit != "dur":
            self.max_smoothing()  # unit mismatches and h <= 0 fail here, not at the first step
        scaler = self.grad_scaler
        if scaler is not None and not all(
            hasattr(scaler, a) for a in ("is_enabled", "get_scale", "_found_inf_per_device")
        ):
            raise TypeError(f"grad_scaler: expected a torch.amp.GradScaler or None, got "
                            f"{type(scaler).__name__}")

    def uses_dur(self) -> bool:
        """Whether a time is a fraction of training (then ``total`` is needed)."""
        return any(t is not None and t.unit == "dur" for t in (self.half_life, self.start))

    def require_total(self) -> None:
        """Raise the ValueError of a ``dur`` time without ``total`` (trainer callbacks call
        this only once they have filled ``total`` from the trainer's planned length)."""
        for name in ("half_life", "start"):
            t = getattr(self, name)
            if t is not None and t.unit == "dur" and self.total is None:
                raise ValueError(f"{name}={str(t)!r} is a fraction of training: pass total")
        if self.half_life is not None:
            self.max_smoothing()

    def half_life_updates(self) -> float | None:
        """The half-life in units of ``update_interval``'s unit (None with ``smoothing``)."""
        if self.half_life is None:
            return None
        unit = self.update_interval.unit
        h = convert(self.half_life, unit, "half_life", self.batches_per_epoch, self.total)
        if not h > 0 or not math.isfinite(h):
            raise ValueError(f"half_life: expected a time > 0, got {str(self.half_life)!r}"
                             + (f" (with total={self.total})" if self.total else ""))
        return h

    def max_smoothing(self) -> float:
        """Smoothing per unit of the interval (per batch for ``ba``), before warmup: from the
        half-life ``h``, ``2 ** (-1 / h)``; from a float ``s`` per update of ``u`` units,
        ``s ** (1 / u)``; 1.0 for a schedule (it sets each update's value itself)."""
        h = self.half_life_updates()
        if h is not None:
            return smoothing_from_half_life(h, 1.0)
        if callable(self.smoothing):
            return 1.0
        return float(self.smoothing) ** (1.0 / self.update_interval.value)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _nonneg(value: Any, name: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: expected a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class BEMAConfig(EMAConfig):
    """The arguments of a :class:`~emakit.BEMA`: its schedule, plus :class:`EMAConfig`'s
    timing and storage (``half_life``, ``smoothing`` and ``warmup`` are refused: the
    schedule replaces them). TRL's names and defaults.

    Args:
        ema_power: ``p_e`` in ``beta_t = max((lag + multiplier t) ** -p_e, min_ema_multiplier)``.
        bias_power: ``p_b`` in ``alpha_t = (lag + multiplier t) ** -p_b``.
        lag: the offset ``lag > 0`` (a virtual age at the start), in batches.
        multiplier: how fast the age grows per batch (>= 0).
        min_ema_multiplier: a floor in [0, 1] on ``beta_t``.
    """

    ema_power: float = 0.5
    bias_power: float = 0.2
    lag: float = 10.0
    multiplier: float = 1.0
    min_ema_multiplier: float = 0.0

    def __post_init__(self) -> None:
        for name in ("half_life", "smoothing", "warmup"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: BEMA sets its own smoothing (ema_power, lag, "
                                 "multiplier); leave it out")
        object.__setattr__(self, "smoothing", 0.0)  # unused: the schedule gives each factor
        super().__post_init__()
        set_ = object.__setattr__
        for name in ("ema_power", "bias_power", "multiplier", "min_ema_multiplier"):
            set_(self, name, _nonneg(getattr(self, name), name))
        set_(self, "lag", _nonneg(self.lag, "lag", positive=True))
        if self.min_ema_multiplier > 1:
            raise ValueError(f"min_ema_multiplier: expected a value in [0, 1], got "
                             f"{self.min_ema_multiplier!r}")


def takes_config(config: type[StoreConfig]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Show ``config``'s fields as keyword arguments in the signature (``help()``,
    ``inspect.signature``) of a function written as ``func(self, ..., **kwargs)`` that
    passes ``kwargs`` to ``config``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(func)
        params = [p for p in own.parameters.values() if p.kind != p.VAR_KEYWORD]
        fields = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                              annotation=f.type)
            for f in dataclasses.fields(config)
        ]
        func.__signature__ = own.replace(parameters=[*params, *fields])
        return func

    return decorate
