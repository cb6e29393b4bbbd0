"""The configurations of every average, validated without a model.

- :class:`StoreConfig`: what the averaged tensors need (storage dtype and device, which
  tensors, how updates run); the engine's store takes it as it is.
- :class:`EMAConfig`, :class:`BEMAConfig`, :class:`PostHocEMAConfig`: the timing every average
  shares (start, interval, training length, skip guards, switch-back) plus each one's law.

:class:`~emakit.EMA`, :class:`~emakit.BEMA`, :class:`~emakit.PostHocEMA` and every trainer
callback take their keyword arguments through these classes (``config=`` or the fields as
keywords), so an argument is written, checked and documented once.

Each field holds the type it declares. Times are given as strings (``"1000ba"``), ints
(batches) or :class:`~emakit.Time` and are held as ``Time``; a device string is held as a
``torch.device``; patterns as a tuple. That parsing happens once, when the configuration is
built (each such field is a small descriptor, :class:`Parsed`), and ``__post_init__`` only
checks the fields against one another.

>>> from emakit.config import EMAConfig
>>> c = EMAConfig(half_life="100ba")
>>> c.half_life, c.max_smoothing()  # 2 ** (-1 / 100), per batch
(Time(value=100, unit='ba'), 0.9930924954370359)
>>> EMAConfig(half_life="100ba", smoothing=0.9)
Traceback (most recent call last):
...
ValueError: half_life and smoothing: give one of them, not both
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, Literal, TypedDict, TypeVar, get_args, overload

import torch
from torch import Tensor

from ._args import flag
from .cadence import UPDATE_PHASES, Cadence
from .schedules import (
    PowerWarmup,
    check_sigma_rel,
    check_smoothing,
    smoothing_from_half_life,
)
from .time import Time, convert

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10
    from typing_extensions import Unpack

__all__ = [
    "StoreConfig",
    "EMAConfig",
    "BEMAConfig",
    "PostHocEMAConfig",
    "StoreOptions",
    "EMAOptions",
    "BEMAOptions",
    "PostHocEMAOptions",
    "ExecutorName",
    "EXECUTORS",
    "UpdatePhase",
    "BUFFER_MODES",
    "STORAGE_DTYPES",
    "Selector",
    "Unpack",  # re-exported: the faces annotate **kwargs with it (typing_extensions on 3.10)
]

ExecutorName = Literal["auto", "eager", "fused", "graph"]
#: How updates may run; the engine's registry has one executor per name.
EXECUTORS: tuple[str, ...] = get_args(ExecutorName)
BufferMode = Literal["average", "copy"]
BUFFER_MODES: tuple[str, ...] = get_args(BufferMode)
#: Where the updates' grid is anchored (see :mod:`emakit.cadence`).
UpdatePhase = Literal["zero", "start"]
#: Storage dtypes the kernels are proven for (float8 and other formats are refused).
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTERVAL_UNITS = ("ba", "ep")

#: ``exclude``/``include``: glob patterns over state-dict names (a string or a sequence of
#: them), or ``callable(name, tensor) -> bool``.
Selector = str | Sequence[str] | Callable[[str, Tensor], bool] | None
#: A selector as held: a tuple of patterns, a callable, or None.
Selection = tuple[str, ...] | Callable[[str, Tensor], bool] | None
TimeLike = str | int | Time

In = TypeVar("In")
Out = TypeVar("Out")


class Parsed(Generic[In, Out]):
    """A dataclass field that parses what it is given (``In``) into what it holds (``Out``)
    once, when the configuration is built, raising an error that names the field. Set once
    (by the generated ``__init__``): a configuration never changes after it is built
    (``dataclasses.replace`` builds another). Every field of the configurations is one, so
    that type checkers see ``In`` as the argument's type and ``Out`` as the attribute's (also
    on subclasses, which ``frozen=True`` dataclasses get wrong in mypy)."""

    def __init__(self, parse: Callable[[Any, str], Out], default: In) -> None:
        self.parse = parse
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: Any) -> In: ...
    @overload
    def __get__(self, obj: object, owner: Any) -> Out: ...
    def __get__(self, obj: object | None, owner: Any = None) -> In | Out:
        if obj is None:
            return self.default  # what dataclasses reads as the field's default
        value: Out = obj.__dict__[self.name]
        return value

    def __set__(self, obj: object, value: In) -> None:
        if self.name in obj.__dict__:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {self.name!r}")
        obj.__dict__[self.name] = self.parse(value, self.name)


# parsers: what a field is given -> what it holds -------------------------------------------


def _time(value: TimeLike, name: str) -> Time:
    return Time.parse(value, name)


def _optional_time(value: TimeLike | None, name: str) -> Time | None:
    return None if value is None else Time.parse(value, name)


def _interval(value: TimeLike | None, name: str) -> Time | None:
    """A time between events: a whole number >= 1 of batches or epochs."""
    if value is None:
        return None
    t = Time.parse(value, name)
    number = t.value
    if isinstance(number, float) and number.is_integer():
        number = int(number)  # "1e20ba" is a whole number, however it was written
    if t.unit not in INTERVAL_UNITS:
        raise ValueError(f"{name}: expected a time in ba or ep, got {str(t)!r}")
    if not isinstance(number, int) or number < 1:
        raise ValueError(f"{name}: expected a whole number >= 1 of {t.unit}, got {str(t)!r}")
    return Time(number, t.unit)


def _total(value: TimeLike | None, name: str) -> Time | None:
    total = _optional_time(value, name)
    if total is not None and total.unit == "dur":
        raise ValueError(f"{name}: expected a length in ba, ep, sp or tok, got {total}")
    if total is not None and total.value == 0:
        raise ValueError(f"{name}: expected a training length > 0, got {str(total)!r}")
    return total


def _device(value: str | int | torch.device | None, name: str) -> torch.device | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        raise TypeError(f"{name}: expected a device string such as 'cpu' or 'cuda:0', a "
                        f"torch.device or None, got {value!r}")
    if isinstance(value, int):  # an index means an accelerator, as torch.device(0) does
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {value!r} (an accelerator index) is not available in "
                             "this process: torch sees no CUDA device")
        value = f"cuda:{value}"
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"{name}: {value!r} is not a device ({err})") from None
    if device.type == "meta":
        raise ValueError(f"{name}: 'meta' tensors hold no values to average")
    _check_available(device, value, name)
    return device


def _check_available(device: torch.device, value: object, name: str) -> None:
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{name}: {value!r} is not available in this process "
                         f"(torch {torch.__version__} sees no {device.type} device)")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"{name}: {value!r} does not exist; this process sees "
                         f"{count()} {device.type} device(s)")


def _selection(value: Selector, name: str) -> Selection:
    if value is None or callable(value):
        return value
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"{name}: expected glob patterns (a string or a sequence of strings) or a "
            f"callable (name, tensor) -> bool, got {value!r}"
        )
    return tuple(patterns)


def _smoothing(
    value: float | Callable[[int], float] | None, name: str
) -> float | Callable[[int], float] | None:
    if value is None or callable(value):
        return value
    return check_smoothing(value, name)


def _nonneg(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _positive(value: float, name: str) -> float:
    number = _nonneg(value, name)
    if number == 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return number


def _unit_interval(value: float, name: str) -> float:
    number = _nonneg(value, name)
    if number > 1:
        raise ValueError(f"{name}: expected a value in [0, 1], got {value!r}")
    return number


def _batches_per_epoch(value: int | None, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return value


def _sigma_rels(value: Sequence[float], name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float, str)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence of floats, got {value!r}")
    out = [check_sigma_rel(s, name) for s in value]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{name}: expected distinct values, got {value!r}")
    return tuple(out)


def _path(value: str | os.PathLike[str], name: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path, got {type(value).__name__}")
    return Path(value)


def _buffers(value: BufferMode, name: str) -> BufferMode:
    if value not in BUFFER_MODES:
        raise ValueError(f"{name}: expected one of {BUFFER_MODES}, got {value!r}")
    return value


def _update_phase(value: UpdatePhase, name: str) -> UpdatePhase:
    if value not in UPDATE_PHASES:
        raise ValueError(f"{name}: expected one of {UPDATE_PHASES}, got {value!r}")
    return value


def _executor(value: ExecutorName, name: str) -> ExecutorName:
    if value not in EXECUTORS:
        raise ValueError(f"{name}: expected one of {EXECUTORS}, got {value!r}")
    return value


def _warmup(value: PowerWarmup | None, name: str) -> PowerWarmup | None:
    if value is not None and not isinstance(value, PowerWarmup):
        raise TypeError(f"{name}: expected None or emakit.PowerWarmup, got {value!r}")
    return value


def _grad_scaler(value: Any, name: str) -> Any:
    needed = ("is_enabled", "get_scale", "_found_inf_per_device")
    if value is not None and not all(hasattr(value, a) for a in needed):
        raise TypeError(f"{name}: expected a torch.amp.GradScaler or None, got "
                        f"{type(value).__name__}")
    return value


def _storage_dtype(value: torch.dtype | None, name: str) -> torch.dtype | None:
    if value is not None and value not in STORAGE_DTYPES:
        raise TypeError(f"{name}: expected one of float16, bfloat16, float32, float64 or None, "
                        f"got {value!r}")
    return value


# the configurations ------------------------------------------------------------------------

_OneOf = TypeVar("_OneOf", bound="StoreConfig")


@dataclasses.dataclass(kw_only=True, unsafe_hash=True)
class StoreConfig:
    """What the averaged tensors need: the storage and which tensors.

    Args:
        buffers: ``"average"`` or ``"copy"`` for floating buffers (BatchNorm statistics);
            integer buffers are always taken from the model.
        dtype: storage dtype of the average (float16, bfloat16, float32 or float64);
            ``None`` keeps each tensor's own. fp32 by default, also for bf16/fp16 models (a
            16-bit average stops moving); fp32 is a floor, so fp64 tensors keep fp64.
        device: where the average lives, e.g. ``"cpu"`` to keep it off the accelerator
            (``None``: beside each tensor).
        compensated: keep a compensation term beside the average (compensated summation), so
            the average follows a float64 EMA of the same weights for half-lives up to 1e7
            updates and more. ``False`` halves the state and the bytes an update moves, but an
            fp32 average then freezes once its increments fall under half an ulp (a weight
            near 1 moving by 1e-3 freezes at a half-life of about 2.3e4 updates).
        side_stream: deprecated: ``True`` warns (``FutureWarning``) and runs the plain path.
        shard: for a DDP (replicated) model, keep 1/world of the average on each rank.
        exclude: tensors not to average, exported from the model like frozen ones: glob
            patterns over state-dict names, or ``callable(name, tensor) -> bool``.
        include: floating buffers to average although ``buffers="copy"`` (same forms).
        executor: how updates run: ``"auto"`` (CUDA: the plan captured in a CUDA graph of
            fused compiled kernels; CPU: fused for a compensated average, else eager),
            ``"eager"``, ``"fused"`` or ``"graph"``.
    """

    buffers: Parsed[BufferMode, BufferMode] = Parsed(_buffers, "average")
    dtype: Parsed[torch.dtype | None, torch.dtype | None] = Parsed(
        _storage_dtype, torch.float32
    )
    device: Parsed[str | int | torch.device | None, torch.device | None] = Parsed(_device, None)
    compensated: Parsed[bool, bool] = Parsed(flag, True)
    side_stream: Parsed[bool, bool] = Parsed(flag, False)
    shard: Parsed[bool, bool] = Parsed(flag, False)
    exclude: Parsed[Selector, Selection] = Parsed(_selection, None)
    include: Parsed[Selector, Selection] = Parsed(_selection, None)
    executor: Parsed[ExecutorName, ExecutorName] = Parsed(_executor, "auto")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.__dataclass_fields__:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        object.__setattr__(self, name, value)  # a Parsed field: set once

    def __post_init__(self) -> None:
        """Checks across fields (each field checks itself when it is set)."""

    @classmethod
    def resolve(
        cls: type[_OneOf], config: StoreConfig | None, kwargs: dict[str, Any], who: str
    ) -> _OneOf:
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

    def storage(self, **changes: Any) -> StoreConfig:
        """The storage fields alone, as a :class:`StoreConfig` (with ``changes``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(StoreConfig)}
        return StoreConfig(**{**fields, **changes})


@dataclasses.dataclass(kw_only=True, unsafe_hash=True)
class _Timing(StoreConfig):
    """The timing every average shares (see :class:`EMAConfig` for the fields)."""

    start: Parsed[TimeLike, Time] = Parsed(_time, "0ba")
    update_interval: Parsed[TimeLike | None, Time | None] = Parsed(_interval, None)
    total: Parsed[TimeLike | None, Time | None] = Parsed(_total, None)
    batches_per_epoch: Parsed[int | None, int | None] = Parsed(_batches_per_epoch, None)
    skip_nonfinite: Parsed[bool, bool] = Parsed(flag, False)
    switch_every: Parsed[TimeLike | None, Time | None] = Parsed(_interval, None)
    grad_scaler: Parsed[Any, Any] = Parsed(_grad_scaler, None)
    # the two below: see EMAConfig's docstring, and emakit.cadence for the semantics
    copy_at_construction: Parsed[bool, bool] = Parsed(flag, False)
    update_phase: Parsed[UpdatePhase, UpdatePhase] = Parsed(_update_phase, "zero")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.copy_at_construction and self.start.value != 0:
            raise ValueError(
                f"copy_at_construction=True takes the start copy when the average is built; "
                f"start={str(self.start)!r} would take it later: give one of them"
            )

    @property
    def interval(self) -> Time:
        """The time between updates: ``update_interval``, else one batch."""
        return self.update_interval if self.update_interval is not None else Time(1, "ba")

    def cadence(self, **changes: Any) -> Cadence:
        """When the average starts, updates and switches back, as a
        :class:`~emakit.cadence.Cadence` (with ``changes``, e.g. ``snapshot_every``)."""
        fields: dict[str, Any] = dict(
            start=self.start, interval=self.interval, total=self.total,
            batches_per_epoch=self.batches_per_epoch, switch_every=self.switch_every,
            update_phase=self.update_phase, copy_at_construction=self.copy_at_construction,
        )
        return Cadence(**{**fields, **changes})

    def times(self) -> dict[str, Time | None]:
        """The times that may be a fraction of training (``dur``), by argument name."""
        return {"start": self.start}

    def uses_dur(self) -> bool:
        """Whether a time is a fraction of training (then ``total`` is needed)."""
        return any(t is not None and t.unit == "dur" for t in self.times().values())

    def require_total(self) -> None:
        """Raise the ValueError of a ``dur`` time without ``total`` (trainer callbacks call
        this only once they have filled ``total`` from the trainer's planned length)."""
        for name, t in self.times().items():
            if t is not None and t.unit == "dur" and self.total is None:
                raise ValueError(f"{name}={str(t)!r} is a fraction of training: pass total")


@dataclasses.dataclass(kw_only=True, unsafe_hash=True)
class EMAConfig(_Timing):
    """The arguments of an :class:`~emakit.EMA`: its law and timing, plus
    :class:`StoreConfig`'s storage.

    Args:
        half_life: a time (``"1000ba"``, ``"2ep"``, ``"0.01dur"``, or an int of batches);
            ``"1000ba"`` when neither ``half_life`` nor ``smoothing`` is given.
        smoothing: a float in [0, 1] per update, or a schedule ``k -> factor`` called with
            the number of the update it is for (the start copy is update 1, so the first
            averaging update asks for k = 2). Giving both is a ValueError.
        start: time before which the average follows the model exactly: the first
            ``step()`` (or ``epoch_end()``, for an interval in epochs) on or after it copies
            the model (the start copy, update 1, k = 1).
        copy_at_construction: take the start copy when the average is built instead (as
            Ultralytics, YOLOX, torch_ema, d2go, timm and TF1 do): the first ``step()`` is
            then the first averaging update, update 2 (a schedule is asked for k = 2).
            ``start`` must be 0. A trainer callback builds its average when training begins
            (after a resume: at the resumed step, from the loaded weights).
        update_interval: time between updates, in ``ba`` or ``ep``; default 1 unit of
            ``half_life``'s unit, else ``"1ba"``.
        update_phase: where the updates' grid begins: ``"zero"`` (default): at the counts
            that are multiples of ``update_interval`` (steps n, 2n, ...); ``"start"``: every
            ``update_interval`` after the start copy (a copy at step s, updates at s + n,
            s + 2n, ...), as MMEngine's ``interval`` and Lightning's
            ``update_every_n_steps`` do.
        total: whole training length, needed for ``dur`` times.
        batches_per_epoch: lets ``ba`` and ``ep`` times be mixed.
        warmup: ``None`` or :class:`~emakit.PowerWarmup`, in training time.
        skip_nonfinite: skip (count, warn) an update whose source holds NaN or Inf; also
            delays the start copy until the model is finite. One host-device sync per update.
        switch_every: at those times, after the update, the model's averaged tensors take
            the average (Switch EMA); the optimizer state is untouched.
        grad_scaler: a ``torch.amp.GradScaler``: a step it skipped (Inf/NaN gradients)
            leaves the average unchanged, decided on the device (no host sync).
    """

    half_life: Parsed[TimeLike | None, Time | None] = Parsed(_optional_time, None)
    smoothing: Parsed[
        float | Callable[[int], float] | None, float | Callable[[int], float] | None
    ] = Parsed(_smoothing, None)
    warmup: Parsed[PowerWarmup | None, PowerWarmup | None] = Parsed(_warmup, None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.half_life is not None and self.smoothing is not None:
            raise ValueError("half_life and smoothing: give one of them, not both")
        if self.half_life is not None and self.half_life.unit != "dur":
            self.max_smoothing()  # unit mismatches and h <= 0 fail here, not at the first step

    @property
    def effective_half_life(self) -> Time | None:
        """``half_life``, or the default ``"1000ba"`` when no smoothing is given either."""
        if self.half_life is None and self.smoothing is None:
            return Time(1000, "ba")
        return self.half_life

    @property
    def interval(self) -> Time:
        """``update_interval``, else one unit of the half-life's unit (of ``total``'s for a
        ``dur`` half-life), else one batch."""
        if self.update_interval is not None:
            return self.update_interval
        h = self.effective_half_life
        unit = "ba"
        if h is not None and h.unit in INTERVAL_UNITS:
            unit = h.unit
        elif h is not None and self.total is not None and self.total.unit in INTERVAL_UNITS:
            unit = self.total.unit
        return Time(1, unit)

    def times(self) -> dict[str, Time | None]:
        return {"half_life": self.effective_half_life, "start": self.start}

    def require_total(self) -> None:
        super().require_total()
        if self.effective_half_life is not None:
            self.max_smoothing()

    def half_life_updates(self) -> float | None:
        """The half-life in units of the interval's unit (None with ``smoothing``)."""
        h = self.effective_half_life
        if h is None:
            return None
        updates = convert(h, self.interval.unit, "half_life", self.batches_per_epoch, self.total)
        if not updates > 0 or not math.isfinite(updates):
            raise ValueError(f"half_life: expected a time > 0, got {str(h)!r}"
                             + (f" (with total={self.total})" if self.total else ""))
        return updates

    def max_smoothing(self) -> float:
        """Smoothing per unit of the interval (per batch for ``ba``), before warmup: from the
        half-life ``h``, ``2 ** (-1 / h)``; from a float ``s`` per update of ``u`` units,
        ``s ** (1 / u)``; 1.0 for a schedule (it sets each update's value itself)."""
        h = self.half_life_updates()
        if h is not None:
            return smoothing_from_half_life(h, 1.0)
        if callable(self.smoothing) or self.smoothing is None:
            return 1.0
        return float(self.smoothing) ** (1.0 / self.interval.value)


@dataclasses.dataclass(kw_only=True, unsafe_hash=True)
class BEMAConfig(_Timing):
    """The arguments of a :class:`~emakit.BEMA`: its schedule (TRL's names and defaults),
    plus the timing and storage every average shares (see :class:`EMAConfig`).

    Args:
        ema_power: ``p_e`` in ``beta_t = max((lag + multiplier t) ** -p_e, min_ema_multiplier)``.
        bias_power: ``p_b`` in ``alpha_t = (lag + multiplier t) ** -p_b``.
        lag: the offset ``lag > 0`` (a virtual age at the start), in batches.
        multiplier: how fast the age grows per batch (>= 0).
        min_ema_multiplier: a floor in [0, 1] on ``beta_t``.
    """

    ema_power: Parsed[float, float] = Parsed(_nonneg, 0.5)
    bias_power: Parsed[float, float] = Parsed(_nonneg, 0.2)
    lag: Parsed[float, float] = Parsed(_positive, 10.0)
    multiplier: Parsed[float, float] = Parsed(_nonneg, 1.0)
    min_ema_multiplier: Parsed[float, float] = Parsed(_unit_interval, 0.0)


@dataclasses.dataclass(kw_only=True, unsafe_hash=True)
class PostHocEMAConfig(_Timing):
    """The arguments of a :class:`~emakit.PostHocEMA`: the tracked profiles and their
    snapshots, plus the timing and storage every average shares (see :class:`EMAConfig`).

    Args:
        sigma_rels: relative widths of the tracked power-function profiles, each in
            (0, sqrt(1/12)). EDM2 tracks 0.05 and 0.10 and synthesizes 0.01 to 0.25.
        snapshot_every: a time in ``ba`` or ``ep`` (``"1000ba"``), or None (snapshots only
            on request).
        snapshot_dir: folder for the snapshots, created when the first one is written.
        snapshot_dtype: dtype of the stored profiles (None: the storage ``dtype``).
    """

    sigma_rels: Parsed[Sequence[float], tuple[float, ...]] = Parsed(_sigma_rels, (0.05, 0.10))
    snapshot_every: Parsed[TimeLike | None, Time | None] = Parsed(_interval, "1000ba")
    snapshot_dir: Parsed[str | os.PathLike[str], Path] = Parsed(_path, "ema-snapshots")
    snapshot_dtype: Parsed[torch.dtype | None, torch.dtype | None] = Parsed(
        _storage_dtype, torch.float16
    )


# the keyword forms, for static checkers: EMA(model, **EMAOptions) ----------------------------


class StoreOptions(TypedDict, total=False):
    """:class:`StoreConfig`'s fields as keyword arguments (what each accepts)."""

    buffers: BufferMode
    dtype: torch.dtype | None
    device: str | int | torch.device | None
    compensated: bool
    side_stream: bool
    shard: bool
    exclude: Selector
    include: Selector
    executor: ExecutorName


class _TimingOptions(StoreOptions, total=False):
    start: TimeLike
    update_interval: TimeLike | None
    total: TimeLike | None
    batches_per_epoch: int | None
    skip_nonfinite: bool
    switch_every: TimeLike | None
    grad_scaler: Any
    copy_at_construction: bool
    update_phase: UpdatePhase


class EMAOptions(_TimingOptions, total=False):
    """:class:`EMAConfig`'s fields as keyword arguments (what each accepts)."""

    half_life: TimeLike | None
    smoothing: float | Callable[[int], float] | None
    warmup: PowerWarmup | None


class BEMAOptions(_TimingOptions, total=False):
    """:class:`BEMAConfig`'s fields as keyword arguments (what each accepts)."""

    ema_power: float
    bias_power: float
    lag: float
    multiplier: float
    min_ema_multiplier: float


class PostHocEMAOptions(_TimingOptions, total=False):
    """:class:`PostHocEMAConfig`'s fields as keyword arguments (what each accepts)."""

    sigma_rels: Sequence[float]
    snapshot_every: TimeLike | None
    snapshot_dir: str | os.PathLike[str]
    snapshot_dtype: torch.dtype | None
