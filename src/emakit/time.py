"""Time values in training units. Pure Python: no torch here.

Units:

- ``ba``: batches, i.e. optimizer steps (``EMA.step()`` calls)
- ``ep``: epochs (``EMA.epoch_end()`` calls)
- ``sp``: samples (the ``samples=`` passed to ``step()``)
- ``tok``: tokens (the ``tokens=`` passed to ``step()``)
- ``dur``: a fraction of the whole training length ``total``

>>> Time.parse("1000ba")
Time(value=1000, unit='ba')
>>> str(Time.parse(" 0.25 dur "))
'0.25dur'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Time", "UNITS", "COUNTED_UNITS", "as_batches", "convert", "check_count"]

UNITS = ("ba", "ep", "sp", "tok", "dur")
COUNTED_UNITS = ("ba", "ep", "sp", "tok")

_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+\.(?:[eE][+-]?[0-9]+)?"
_TIME_RE = re.compile(rf"^\s*(?P<value>{_NUMBER})\s*(?P<unit>[A-Za-z]+)\s*$")


@dataclass(frozen=True)
class Time:
    """A non-negative amount of training time: ``value`` in ``unit``.

    Integral values are kept as ``int`` so that ``str(Time.parse(s))`` prints them
    without a decimal point; ``Time.parse(str(t)) == t`` for every valid ``t``.
    """

    value: int | float
    unit: str

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"Time unit: expected one of {', '.join(UNITS)}, got {self.unit!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise TypeError(f"Time value: expected a number, got {type(self.value).__name__}")
        if not math.isfinite(self.value) or self.value < 0:
            raise ValueError(f"Time value: expected a finite number >= 0, got {self.value!r}")
        if isinstance(self.value, float) and self.value.is_integer() and self.value < 2**53:
            object.__setattr__(self, "value", int(self.value))

    @classmethod
    def parse(cls, text: str | int | Time, name: str = "time") -> Time:
        """Parse ``"<number><unit>"``, e.g. ``"1000ba"``, ``"2ep"``, ``"0.1dur"``; an int is
        that many batches (``100`` is ``"100ba"``), as trainers count steps.

        ``name`` is the argument the string came from, used in error messages.

        >>> Time.parse(100)
        Time(value=100, unit='ba')
        """
        if isinstance(text, Time):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            if text < 0:
                raise ValueError(f"{name}: expected a number of batches >= 0, got {text!r}")
            return cls(text, "ba")
        if not isinstance(text, str):
            raise TypeError(
                f"{name}: expected a time string such as '1000ba' or an int (batches), got "
                f"{type(text).__name__}"
            )
        match = _TIME_RE.match(text)
        if match is None:
            raise ValueError(
                f"{name}: expected a time string '<number><unit>' such as '1000ba' or '2ep' "
                f"(units: {', '.join(UNITS)}), got {text!r}"
            )
        unit = match["unit"].lower()
        if unit not in UNITS:
            raise ValueError(
                f"{name}: unknown time unit {match['unit']!r} in {text!r}; "
                f"expected one of {', '.join(UNITS)}"
            )
        number = match["value"]
        value: int | float = int(number) if number.isdigit() else float(number)
        try:
            return cls(value, unit)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {err} (from {text!r})") from None

    def __str__(self) -> str:
        return f"{self.value!r}{self.unit}"


def as_batches(time: Time, name: str, batches_per_epoch: int | None, total: Time | None) -> float:
    """``time`` expressed in batches, or a ValueError naming ``name`` if it cannot be."""
    if time.unit == "ba":
        return float(time.value)
    if time.unit == "ep":
        if batches_per_epoch is None:
            raise ValueError(
                f"{name}={str(time)!r} is in epochs; pass batches_per_epoch to convert it "
                "to batches"
            )
        return float(time.value) * batches_per_epoch
    if time.unit == "dur":
        if total is None:
            raise ValueError(f"{name}={str(time)!r} is a fraction of training; pass total")
        return float(time.value) * as_batches(total, "total", batches_per_epoch, None)
    raise ValueError(f"{name}={str(time)!r}: samples and tokens cannot be converted to batches")


def convert(
    time: Time, unit: str, name: str, batches_per_epoch: int | None, total: Time | None
) -> float:
    """``time`` expressed in ``unit`` (``ba`` or ``ep``), converting through batches."""
    if time.unit == unit:
        return float(time.value)
    if time.unit == "dur" and total is not None and total.unit == unit:
        return float(time.value) * float(total.value)
    batches = as_batches(time, name, batches_per_epoch, total)
    if unit == "ba":
        return batches
    if batches_per_epoch is None:
        raise ValueError(
            f"{name}={str(time)!r} and a time in {unit!r} use different units; "
            "pass batches_per_epoch to convert between them"
        )
    return batches / batches_per_epoch


def check_count(value: Any, name: str) -> int:
    """``value`` as a whole number >= 0 (an int, or an integral 0-d integer tensor); a bool,
    a string, a fraction, NaN or a negative number is an error naming ``name``.

    >>> check_count(3, "samples")
    3
    >>> check_count(-1, "samples")
    Traceback (most recent call last):
    ...
    ValueError: samples: expected a whole number >= 0, got -1
    """
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # a tensor or numpy scalar
        dtype = str(getattr(value, "dtype", ""))
        if "int" not in dtype or "bool" in dtype:
            raise TypeError(f"{name}: expected a whole number >= 0, got a {dtype} scalar")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a whole number >= 0 (int), got "
                        f"{type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected a whole number >= 0, got {value!r}")
    return value
