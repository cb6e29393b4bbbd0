r"""Averaging laws: what one update weighs. Pure Python, no torch here.

Every update of an average is ``avg <- s * avg + (1 - s) * model``; a law gives the smoothing
``s`` of an update from the training time it covers (a :class:`~emakit.cadence.Span`: k =
``first..last``, the start copy being k = 1) and ``n``, the number of updates done before it
(the start copy counted). A new law is one small class with that one method: the averager,
the stores, the guards and the state format do not change.

- :class:`Exponential`: ``s = prod_k s_k`` over the span, ``s_k`` the per-unit smoothing of a
  half-life (``2 ** (-1 / half_life)``) capped by a warmup at each k, or a schedule's value
  for update number ``n + 1``.
- :class:`PowerFunction`: the power-function EMA of Karras et al. (2024),
  ``s = (1 - dt / t) ** (gamma + 1)``, ``t`` counted from the start of training.
- :class:`BiasCorrected`: BEMA's EMA part (Block & Zhang 2025), ``1 - s = beta_t =
  max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)`` with ``t = last - 1``.

>>> from emakit.cadence import Span
>>> law = Exponential(per_unit=0.5)
>>> law.smoothing(Span(first=2, last=4, origin=1), n=1)  # three units: 0.5 ** 3
0.125
>>> PowerFunction(gamma=1.0).smoothing(Span(first=3, last=4, origin=1), n=2)  # t=4, dt=2
0.25
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .cadence import Span
from .schedules import PowerWarmup, check_smoothing, power_smoothing

__all__ = ["Law", "Exponential", "PowerFunction", "BiasCorrected", "warmup_product"]


@runtime_checkable
class Law(Protocol):
    """What an update weighs. Implementations are small frozen dataclasses, validated once
    when built, so that ``smoothing`` is cheap and pure (the averager calls it at every
    update, and to report ``ema.smoothing`` at any time)."""

    def smoothing(self, span: Span, n: int) -> float:
        """The smoothing ``s`` in [0, 1] of an update covering ``span``, ``n`` updates (the
        start copy counted) having been done before it; the weight of the model's current
        values is ``1 - s``."""
        ...

    def describe(self) -> dict[str, object]:
        """The law's parameters, as plain values: saved with the state, so that loading it
        into an averager with another law can warn."""
        ...


def warmup_product(warmup: PowerWarmup, first: int, last: int, cap: float) -> float:
    """The product of ``warmup(k, cap)`` for k = first..last; once a factor reaches the cap
    every later one does too (the warmup grows with k), so that tail is one power.

    >>> round(warmup_product(PowerWarmup(inv_gamma=1.0, power=1.0), 2, 3, 1.0), 12)  # 1/2 * 2/3
    0.333333333333
    """
    value = 1.0
    for k in range(first, last + 1):
        f = warmup(k, cap)
        if f >= cap:
            return value * cap ** (last - k + 1)
        value *= f
    return value


@dataclass(frozen=True, slots=True)
class Exponential:
    r"""The exponential law of :class:`~emakit.EMA`.

    Args:
        per_unit: smoothing per unit of the interval's unit (per batch for ``ba``): from a
            half-life ``h``, ``2 ** (-1 / h)``; from a float ``s`` per update of ``u`` units,
            ``s ** (1 / u)``. 1.0 with a ``schedule``.
        warmup: caps each unit's factor: ``s_k = min(warmup(k), per_unit)``.
        schedule: ``callable(update_number) -> smoothing``, called with ``n + 1`` (the start
            copy is update 1, the first averaging update asks for 2); the warmup's product
            over the span caps it.

    An update covering k = ``first..last`` uses ``prod_k s_k``, so the averaging horizon
    does not depend on the interval.
    """

    per_unit: float
    warmup: PowerWarmup | None = None
    schedule: Callable[[int], float] | None = None

    def smoothing(self, span: Span, n: int) -> float:
        if self.schedule is not None:
            k = n + 1
            value = check_smoothing(self.schedule(k), f"smoothing schedule at update {k}")
            if self.warmup is not None:
                value = min(value, warmup_product(self.warmup, span.first, span.last, 1.0))
            return value
        if self.warmup is None:
            return self.per_unit ** span.units
        return warmup_product(self.warmup, span.first, span.last, self.per_unit)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"law": "exponential", "per_unit": self.per_unit}
        if self.warmup is not None:
            w = self.warmup
            out["warmup"] = [w.inv_gamma, w.power, w.min_smoothing]
        if self.schedule is not None:
            out["schedule"] = _schedule_name(self.schedule)
        return out


def _schedule_name(schedule: Callable[[int], float]) -> str:
    """A schedule's name for the saved state: its repr when it is a dataclass instance (a
    named schedule records its parameters), else its qualified name."""
    if hasattr(schedule, "__dataclass_fields__"):
        return repr(schedule)
    return str(getattr(schedule, "__qualname__", type(schedule).__qualname__))


@dataclass(frozen=True, slots=True)
class PowerFunction:
    r"""The power-function EMA of Karras et al. (2024, EDM2, eq. 127 of their appendix):
    ``s = (1 - dt / t) ** (gamma + 1)`` at time ``t`` (counts of the interval's unit since
    the start of training), ``dt`` since the previous update. The start copy (``s = 0``)
    stands for all of ``(0, t_start]``."""

    gamma: float

    def smoothing(self, span: Span, n: int) -> float:
        return power_smoothing(span.time, span.units, self.gamma)

    def describe(self) -> dict[str, object]:
        return {"law": "power", "gamma": self.gamma}


@dataclass(frozen=True, slots=True)
class BiasCorrected:
    r"""The EMA part of BEMA (Block & Zhang 2025): with ``t = last - 1`` the interval's units
    since the start copy, ``1 - s = beta_t = max((lag + multiplier t) ** -ema_power,
    min_ema_multiplier)``, capped at 1 (a copy). :meth:`alpha` is the weight of the bias
    correction ``alpha_t (theta_t - theta_0)`` of the weights handed out."""

    ema_power: float
    bias_power: float
    lag: float
    multiplier: float
    min_ema_multiplier: float

    def _base(self, k: int) -> float:
        return self.lag + self.multiplier * float(k - 1)

    def smoothing(self, span: Span, n: int) -> float:
        beta = max(self._base(span.last) ** -self.ema_power, self.min_ema_multiplier)
        return 1.0 - min(beta, 1.0)

    def alpha(self, k: int) -> float:
        """``alpha_t = (lag + multiplier t) ** -bias_power`` at training time k (t = k - 1)."""
        return self._base(k) ** -self.bias_power

    def describe(self) -> dict[str, object]:
        return {"law": "bias-corrected", "ema_power": self.ema_power,
                "bias_power": self.bias_power, "lag": self.lag,
                "multiplier": self.multiplier, "min_ema_multiplier": self.min_ema_multiplier}
