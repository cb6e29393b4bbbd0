"""Smoothing math: half-life, warmup, cosine schedules, power-function EMA. Pure Python.

An EMA update is ``ema <- s * ema + (1 - s) * model`` with smoothing ``s`` in [0, 1].
After ``h`` units of time with ``u`` units between updates the old average has weight
``s ** (h / u)``; the half-life is the ``h`` at which that weight is 1/2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "smoothing_from_half_life",
    "half_life_from_smoothing",
    "check_smoothing",
    "PowerWarmup",
    "CosineSmoothing",
    "SmoothingSchedule",
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "power_smoothing",
    "check_sigma_rel",
    "MIN_SIGMA_REL",
    "MAX_SIGMA_REL",
    "ExponentialRamp",
    "RatioRamp",
    "ZeroDebiased",
    "MomentumAnnealing",
    "RunningMean",
]

#: A smoothing schedule: maps the 1-based count of the update about to run to its factor.
SmoothingSchedule = Callable[[int], float]

#: Relative widths of power-function profiles lie in [MIN_SIGMA_REL, MAX_SIGMA_REL): the
#: ceiling is the width of the flattest profile (gamma -> 0); the floor keeps every profile
#: computable in float64 (``gamma`` is about ``1 / sigma_rel`` and inner products multiply
#: two ``gamma``): 1e-6 is a width of 100 updates at 1e8.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)
MIN_SIGMA_REL = 1e-6


def _positive(value: float, name: str, allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return value


def check_smoothing(smoothing: float, name: str = "smoothing") -> float:
    """Return ``smoothing`` as a float, or raise naming ``name`` if it is not in [0, 1]."""
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1], got {type(smoothing).__name__}")
    smoothing = float(smoothing)
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"{name}: expected a float in [0, 1], got {smoothing!r}")
    return smoothing


def smoothing_from_half_life(half_life: float, update_interval: float = 1.0) -> float:
    """Per-update smoothing ``s = 2 ** (-update_interval / half_life)``.

    Both arguments are in the same unit of training time (batches, epochs, ...), so
    changing the interval keeps the averaging horizon. ``half_life=inf`` gives 1.

    Examples:
        >>> smoothing_from_half_life(1000.0)
        0.9993070929904525
        >>> round(smoothing_from_half_life(1000.0, update_interval=10), 6)
        0.993092
    """
    half_life = _positive(half_life, "half_life", allow_inf=True)
    update_interval = _positive(update_interval, "update_interval")
    return 2.0 ** (-update_interval / half_life)


def half_life_from_smoothing(smoothing: float, update_interval: float = 1.0) -> float:
    """Half-life ``h = -update_interval / log2(s)``, in the unit of ``update_interval``.

    ``s = 0`` gives 0 (no memory) and ``s = 1`` gives ``inf`` (never moves).

    Examples:
        >>> half_life_from_smoothing(0.5)
        1.0
    """
    smoothing = check_smoothing(smoothing)
    update_interval = _positive(update_interval, "update_interval")
    if smoothing == 0.0:
        return 0.0
    if smoothing == 1.0:
        return math.inf
    return -update_interval / math.log2(smoothing)


@dataclass(frozen=True)
class PowerWarmup:
    """Warmup in training time: at time k (k = 1 at the start of the average, whose factor
    0 is the copy; k counts the interval's units, batches for ``"ba"``) the per-batch factor is
    ``clamp(1 - (1 + (k - 1) / inv_gamma) ** -power, min_smoothing, max_smoothing)``.

    ``max_smoothing`` is the per-batch smoothing that the half-life or smoothing argument
    gives. An update covering several batches uses the product of their factors. At an
    interval of one batch this is timm's ModelEmaV3 (driven as its train.py does) and
    diffusers' EMAModel, step for step; ``inv_gamma=1, power=1`` is the running mean.
    ``power=2/3`` reaches 0.999 at about k = 31.6k (for runs of a million steps or more),
    ``power=3/4`` at about k = 10k (shorter runs).

    Examples:
        >>> PowerWarmup()(1, 0.999)
        0.0
        >>> round(PowerWarmup()(1000, 0.999), 4), PowerWarmup()(10**6, 0.999)
        (0.99, 0.999)
    """

    inv_gamma: float = 1.0
    power: float = 2.0 / 3.0
    min_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _positive(self.inv_gamma, "inv_gamma")
        _positive(self.power, "power")
        check_smoothing(self.min_smoothing, "min_smoothing")

    def __call__(self, k: int, max_smoothing: float = 1.0) -> float:
        if k < 1:
            raise ValueError(f"k: expected an update count >= 1, got {k}")
        value = 1.0 - (1.0 + (k - 1) / self.inv_gamma) ** -self.power
        return min(max(value, self.min_smoothing), max_smoothing)


@dataclass(frozen=True)
class CosineSmoothing:
    """DINO's momentum schedule, as a smoothing schedule ``k -> factor``.

    An EMA calls a schedule with the number of the update it is for: the start copy is
    update 1 (its factor is ignored) and the first averaging update is k = 2, DINO's
    iteration 0. So update k uses ``end - (end - start) * (1 + cos(pi * (k - 2) / total)) / 2``
    and ``end`` after ``total`` averaging updates.

    ``total`` is the number of averaging updates the schedule spans (DINO: epochs x
    iterations per epoch).

    Examples:
        >>> s = CosineSmoothing(start=0.996, end=1.0, total=100)
        >>> [round(s(k), 6) for k in (2, 52, 102, 500)]
        [0.996, 0.998, 1.0, 1.0]
    """

    start: float = 0.996
    end: float = 1.0
    total: int = 1

    def __post_init__(self) -> None:
        check_smoothing(self.start, "start")
        check_smoothing(self.end, "end")
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 1:
            raise ValueError(f"total: expected a number of updates >= 1, got {self.total!r}")

    def __call__(self, k: int) -> float:
        if k < 1:
            raise ValueError(f"k: expected an update number >= 1, got {k}")
        i = min(max(k - 2, 0), self.total)
        return self.end - (self.end - self.start) * (1.0 + math.cos(math.pi * i / self.total)) / 2


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma`` of the power-function EMA with relative width ``sigma_rel``.

    The largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0``
    (Karras et al. 2024, eq. 3). ``sigma_rel`` must lie in (0, sqrt(1/12)). Solved for
    ``u = s g`` (``u^3 + 7 s u^2 + (16 s^2 - 1) u + 12 s^3 - s = 0``, root in (0, 1]) so that
    no intermediate overflows however small ``s`` is; a ``gamma`` beyond the float range is a
    ValueError naming ``sigma_rel``.

    Examples:
        >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 3)
        (16.97, 6.937)
        >>> f"{sigma_rel_to_gamma(1e-200):.3g}"
        '1e+200'
    """
    sigma_rel = _positive(sigma_rel, "sigma_rel")
    if sigma_rel >= MAX_SIGMA_REL:
        raise ValueError(
            f"sigma_rel: expected a value in (0, sqrt(1/12) = {MAX_SIGMA_REL:.6f}), "
            f"got {sigma_rel!r}"
        )
    s = sigma_rel

    def cubic(u: float) -> float:
        return ((u + 7.0 * s) * u + (16.0 * s * s - 1.0)) * u + (12.0 * s * s - 1.0) * s

    # f(0) = s (12 s^2 - 1) < 0 and f(1) = 6 s + 16 s^2 + 12 s^3 > 0; f rises beyond its
    # largest root, which is the only one in (0, 1].
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if cubic(mid) > 0:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 4 * math.ulp(hi):
            break
    gamma = 0.5 * (lo + hi) / s
    if not math.isfinite(gamma):
        raise ValueError(f"sigma_rel: {sigma_rel!r} is so small that gamma (about "
                         "1 / sigma_rel) exceeds the float range")
    return gamma


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative width ``sqrt((g + 1) / ((g + 2)^2 (g + 3)))`` of the power-function EMA,
    computed as ``sqrt((g + 1) / (g + 3)) / (g + 2)`` so that any finite ``gamma`` works.

    Examples:
        >>> round(gamma_to_sigma_rel(6.94), 3)
        0.1
        >>> f"{gamma_to_sigma_rel(1e308):.3g}"
        '1e-308'
    """
    gamma = _positive(gamma, "gamma")
    g1, g3 = gamma + 1.0, gamma + 3.0
    return math.sqrt(g1 / g3) / (gamma + 2.0)


def power_smoothing(t: float, dt: float, gamma: float) -> float:
    """Exact per-update factor ``(1 - dt / t) ** (gamma + 1)`` of a power-function EMA.

    ``t`` is the time of the update, ``dt`` the time since the previous one (same unit).
    The result keeps the average equal to ``sum p(tau) theta(tau)`` with
    ``p(tau) proportional to tau ** gamma``.
    """
    if t <= 0 or dt <= 0 or dt > t:
        raise ValueError(f"power_smoothing: expected 0 < dt <= t, got t={t!r}, dt={dt!r}")
    return (1.0 - dt / t) ** (gamma + 1.0)


def check_sigma_rel(value: Any, name: str = "sigma_rel") -> float:
    """``value`` as a float in ``[MIN_SIGMA_REL, MAX_SIGMA_REL)``, or an error naming ``name``.

    >>> check_sigma_rel(0.05)
    0.05
    """
    expected = f"a float in [{MIN_SIGMA_REL:g}, sqrt(1/12) = {MAX_SIGMA_REL:.4f})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    value = float(value)
    if not MIN_SIGMA_REL <= value < MAX_SIGMA_REL:
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


# Named schedules of other EMA libraries ------------------------------------------------------
#
# Each is a smoothing schedule ``k -> s``: the EMA calls it with the number of the update it is
# for, the start copy being update 1 (its factor is ignored), so the first averaging update
# asks for k = 2. Each docstring says how the library counts (its ``n``) and how n maps to k.


def _update_number(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an update number >= 1, got {k!r}")
    return k


@dataclass(frozen=True)
class ExponentialRamp:
    """The exponential ramp of Ultralytics' and YOLOX's ``ModelEMA``:
    ``s = decay * (1 - exp(-n / tau))``, with ``n = k - 1``.

    Those libraries copy the model when the EMA is built and count their updates from 1
    (``self.updates += 1`` before ``d = self.decay(self.updates)``): their update ``n`` is
    emakit's update ``k = n + 1`` when the start copy is taken at construction
    (``copy_at_construction=True``). ``tau`` is in updates: the smoothing
    reaches ``(1 - 1/e) * decay`` after ``tau`` updates and ``0.99 * decay`` after
    ``4.6 tau``. Ultralytics: ``decay=0.9999, tau=2000``; YOLOX: ``tau=2000``.

    Examples:
        >>> s = ExponentialRamp(decay=0.9999, tau=2000)
        >>> s(1), round(s(2), 8), round(s(2001), 6)
        (0.0, 0.00049983, 0.632057)
    """

    decay: float = 0.9999
    tau: float = 2000.0

    def __post_init__(self) -> None:
        check_smoothing(self.decay, "decay")
        _positive(self.tau, "tau")

    def __call__(self, k: int) -> float:
        n = _update_number(k) - 1
        return self.decay * (1.0 - math.exp(-n / self.tau))  # the peers' own expression


@dataclass(frozen=True)
class RatioRamp:
    """The ``num_updates`` cap of ``tf.train.ExponentialMovingAverage``, torch_ema
    (``use_num_updates=True``), d2go (``decay_warm_up_factor``) and diffusers' default:
    ``s = clamp((1 + n) / (factor + n), min_smoothing, decay)``, with ``n = k - 1``.

    torch_ema and d2go copy the model when the EMA is built and count their updates from 1
    (``num_updates += 1`` before the decay is computed), TF1 passes the global step after the
    optimizer's increment: their ``n`` is emakit's ``k - 1`` when the start copy is taken at
    construction (``copy_at_construction=True``). diffusers copies at its first step and its
    ``step`` is 0 there, 1 at the next: also ``n = k - 1``, with the start copy at the first
    ``ema.step()``. ``factor`` is 10 in TF, torch_ema and diffusers (d2go:
    ``decay_warm_up_factor``); ``min_smoothing`` is diffusers' ``min_decay``. The ramp is 0.5
    at n = 8 and 0.99 at n = 890 (factor 10).

    Examples:
        >>> s = RatioRamp(decay=0.999)
        >>> s(2), s(9), round(s(891), 4), s(10**6)
        (0.18181818181818182, 0.5, 0.99, 0.999)
    """

    decay: float = 0.9999
    factor: float = 10.0
    min_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_smoothing(self.decay, "decay")
        _positive(self.factor, "factor")
        check_smoothing(self.min_smoothing, "min_smoothing")

    def __call__(self, k: int) -> float:
        n = _update_number(k) - 1
        return max(self.min_smoothing, min(self.decay, (1.0 + n) / (self.factor + n)))


@dataclass(frozen=True)
class ZeroDebiased:
    r"""The zero-debiased EMA of optax's ``ema(decay, debias=True)``, TF's ``zero_debias``
    and PaddleDetection's ``'normal'`` decay, as an EMA that starts with a copy:
    ``s_k = decay * (1 - decay ** (k - 1)) / (1 - decay ** k)``.

    Those libraries start an average ``z_0 = 0``, update it ``z_t = d z_{t-1} + (1 - d) x_t``
    with a constant ``d`` and hand out ``y_t = z_t / (1 - d ** t)``. Multiplying by
    ``1 - d ** t`` shows that ``y`` is itself an EMA:

    .. math::
        y_t = s_t\,y_{t-1} + (1 - s_t)\,x_t,\qquad
        s_t = \frac{d\,(1 - d^{t-1})}{1 - d^t},\qquad 1 - s_t = \frac{1 - d}{1 - d^t},

    and ``s_1 = 0``: the first update copies. So ``y_t`` is the average of ``x_1..x_t`` with
    weights proportional to ``d ** (t - i)``. Their count ``t`` (1 at the first update) is
    emakit's update number ``k``, the start copy being the first update: no copy at
    construction. ``decay=1`` gives the running mean ``1 - 1/k``.

    Examples:
        >>> s = ZeroDebiased(decay=0.9)
        >>> s(1), round(s(2), 6), round(s(1000), 6)
        (0.0, 0.473684, 0.9)
    """

    decay: float

    def __post_init__(self) -> None:
        check_smoothing(self.decay, "decay")

    def __call__(self, k: int) -> float:
        k = _update_number(k)
        d = self.decay
        if d == 0.0 or k == 1:
            return 0.0
        if d == 1.0:
            return (k - 1) / k
        # s = d - (1 - d) d**k / (1 - d**k) = d - (1 - d) / expm1(-k log d): each operation
        # is monotone in k, so the rounded factors never decrease and never pass d (the
        # quotient form d (1 - d**(k-1)) / (1 - d**k) can dip by an ulp)
        x = -k * math.log(d)
        if x > 709.0:  # expm1 overflows; the correction is below 1e-307
            return d
        return d - (1.0 - d) / math.expm1(x)


@dataclass(frozen=True)
class MomentumAnnealing:
    """MMEngine's ``MomentumAnnealingEMA``: momentum ``max(momentum, gamma / (gamma +
    steps))``, smoothing ``s = 1 - max(momentum, gamma / (gamma + (k - 1) * interval))``.

    MMEngine's momentum is the weight of the model (``averaged.lerp_(source, momentum)``), so
    emakit's smoothing is ``1 - momentum``. ``steps`` counts MMEngine's calls of
    ``update_parameters`` before this one: the first call (steps 0) copies the model, and
    the update at steps ``(k - 1) * interval`` is emakit's update k. With ``interval=1``
    that is every call, emakit's start copy at the first ``ema.step()``; for
    ``interval > 1``, updates every ``interval`` steps after the start copy:
    ``update_interval=f"{interval}ba", update_phase="start"``.

    Examples:
        >>> s = MomentumAnnealing(momentum=0.0002, gamma=100)
        >>> s(1), round(s(2), 6), round(s(101), 6), s(10**7)
        (0.0, 0.009901, 0.5, 0.9998)
    """

    momentum: float = 0.0002
    gamma: float = 100.0
    interval: int = 1

    def __post_init__(self) -> None:
        check_smoothing(self.momentum, "momentum")
        _positive(self.gamma, "gamma")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) \
                or self.interval < 1:
            raise ValueError(f"interval: expected an integer >= 1, got {self.interval!r}")

    def __call__(self, k: int) -> float:
        steps = (_update_number(k) - 1) * self.interval
        return 1.0 - max(self.momentum, self.gamma / (self.gamma + steps))


@dataclass(frozen=True)
class RunningMean:
    """The equal-weight average of every update so far: ``s = 1 - 1 / k``.

    Update k averages k models (the start copy being the first), as PyTorch's
    ``AveragedModel`` without an ``avg_fn`` (SWA) and MMEngine's ``StochasticWeightAverage``
    do.

    Examples:
        >>> s = RunningMean()
        >>> s(1), s(2), s(4)
        (0.0, 0.5, 0.75)
    """

    def __call__(self, k: int) -> float:
        return 1.0 - 1.0 / _update_number(k)
