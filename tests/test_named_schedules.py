"""The named schedules of emakit.schedules against the peers' own formulas and counters,
in pure Python (no torch): each peer's counting is written out as the peer does it, and the
emakit update number k it corresponds to is stated once per test.

emakit calls a schedule with the number of the update it is for; the start copy is update 1,
so the first averaging update asks for k = 2. Peers that copy the model when the EMA is built
(Ultralytics, YOLOX, torch_ema, d2go, TF1) take that copy as emakit's update 1.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from emakit.schedules import (
    ExponentialRamp,
    MomentumAnnealing,
    RatioRamp,
    RunningMean,
    ZeroDebiased,
    check_smoothing,
)

UPDATES = 3000


def test_exponential_ramp_is_ultralytics_and_yolox_counter():
    """ModelEMA: ``self.updates += 1; d = decay * (1 - math.exp(-self.updates / tau))``; the
    copy at construction is emakit's update 1, so the peer's update n is k = n + 1."""
    for decay, tau in ((0.9999, 2000), (0.99, 5), (0.5, 1)):
        schedule, updates = ExponentialRamp(decay=decay, tau=tau), 0
        for k in range(2, UPDATES):
            updates += 1
            assert schedule(k) == decay * (1 - math.exp(-updates / tau)), (decay, tau, k)


@pytest.mark.parametrize("factor", [10, 1, 3.5, 100])
def test_ratio_ramp_is_torch_ema_tf_and_d2go_counter(factor):
    """torch_ema / d2go EMAUpdater: ``num_updates += 1; decay = min(decay, (1 + n) /
    (factor + n))`` after a copy at construction: the peer's n is k - 1."""
    decay = 0.999
    schedule, num_updates = RatioRamp(decay=decay, factor=factor), 0
    for k in range(2, UPDATES):
        num_updates += 1
        want = min(decay, (1 + num_updates) / (factor + num_updates))
        assert schedule(k) == pytest.approx(want, rel=1e-15, abs=0), k


@pytest.mark.parametrize("update_after_step,min_decay", [(0, 0.0), (7, 0.3)])
def test_ratio_ramp_is_diffusers_default_decay(update_after_step, min_decay):
    """diffusers EMAModel.get_decay (no use_ema_warmup): ``step = max(0, optimization_step -
    update_after_step - 1)``; 0 at the step that copies; ``min(decay, (1 + step) / (10 +
    step))`` then ``max(min_decay, .)``. With emakit's start at update_after_step + 1, the
    optimization step update_after_step + k is emakit's update k."""
    decay = 0.9995
    schedule = RatioRamp(decay=decay, min_smoothing=min_decay)
    for optimization_step in range(update_after_step + 2, UPDATES):
        step = max(0, optimization_step - update_after_step - 1)
        want = max(min_decay, min(decay, (1 + step) / (10 + step)))
        k = optimization_step - update_after_step
        assert schedule(k) == pytest.approx(want, rel=1e-15, abs=0), k


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_momentum_annealing_is_mmengine_counter(interval):
    """MMEngine BaseAveragedModel.update_parameters: steps 0 copies; when ``steps % interval
    == 0`` the average moves by ``max(momentum, gamma / (gamma + steps))``; steps += 1 per
    call. Its j-th averaging update (after the copy) is emakit's update k = j + 1."""
    momentum, gamma = 0.0002, 100
    schedule = MomentumAnnealing(momentum=momentum, gamma=gamma, interval=interval)
    k = 1
    for steps in range(1, UPDATES):
        if steps % interval == 0:
            k += 1
            want = 1 - max(momentum, gamma / (gamma + steps))
            assert schedule(k) == pytest.approx(want, rel=1e-15, abs=1e-16), (steps, k)
    assert k == 1 + (UPDATES - 1) // interval


def _zero_start_debiased(decay: Fraction, xs: list[Fraction]) -> list[Fraction]:
    """optax.ema(decay, debias=True): ``ema = (1 - d) x + d ema`` from 0, handed out divided
    by ``1 - d ** count`` (count 1 at the first update). Exact rational arithmetic."""
    ema, out = Fraction(0), []
    for count, x in enumerate(xs, start=1):
        ema = (1 - decay) * x + decay * ema
        out.append(ema / (1 - decay**count))
    return out


def _ema_from_copy(schedule, xs: list[float]) -> list[float]:
    """emakit's recursion: update 1 copies, update k uses s = schedule(k)."""
    avg, out = 0.0, []
    for k, x in enumerate(xs, start=1):
        s = 0.0 if k == 1 else check_smoothing(schedule(k))
        avg = s * avg + (1 - s) * x
        out.append(avg)
    return out


@settings(max_examples=60, deadline=None)
@given(num=st.integers(1, 999), xs=st.lists(st.integers(-1000, 1000), min_size=1, max_size=60))
def test_zero_debiased_is_the_debiased_zero_start_average(num, xs):
    """The identity behind ZeroDebiased: the debiased zero-start EMA is an EMA from a copy
    with s_k = d (1 - d^(k-1)) / (1 - d^k). Reference in exact rationals."""
    decay = Fraction(num, 1000)
    values = [Fraction(x, 7) for x in xs]
    want = _zero_start_debiased(decay, values)
    got = _ema_from_copy(ZeroDebiased(decay=float(decay)), [float(v) for v in values])
    scale = max(abs(float(v)) for v in values) + 1e-300
    for t, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert abs(g - float(w)) <= 1e-12 * scale, (float(decay), t, g, float(w))


def test_zero_debiased_weights_are_geometric_and_sum_to_one():
    """y_t = sum_i d^(t-i) x_i / sum_i d^(t-i): the weight of x_1 after t updates is
    prod_{k=2..t} s_k, which must equal d^(t-1) (1 - d) / (1 - d^t)."""
    d = 0.999
    schedule = ZeroDebiased(decay=d)
    weight_first = 1.0
    for t in range(2, 5000):
        weight_first *= schedule(t)
        assert weight_first == pytest.approx(d ** (t - 1) * (1 - d) / (1 - d**t), rel=1e-10)


@pytest.mark.parametrize("decay", [0.9, 0.3, 0.01, 1e-300])
def test_zero_debiased_is_exact_to_rounding_and_never_above_the_decay(decay):
    """s_k against exact rationals, relative 1e-15, and never above d: also for a small decay,
    where 1 - (1 - d) / (1 - d**k) loses its digits to cancellation (relative 7e-15 at d =
    0.01, above d from k = 9 on; 0 instead of 1e-300 at d = 1e-300)."""
    schedule, d = ZeroDebiased(decay=decay), Fraction(decay)
    for k in [*range(2, 60), 1000, 10**6, 10**12]:
        s = schedule(k)
        assert s <= decay, (k, s)
        if k <= 1000:
            exact = d * (1 - d ** (k - 1)) / (1 - d**k)
            assert abs(Fraction(s) - exact) <= Fraction(1, 10**15) * exact, (k, s)


def test_zero_debiased_limits():
    assert [ZeroDebiased(decay=0.0)(k) for k in (1, 2, 9)] == [0.0, 0.0, 0.0]
    assert [ZeroDebiased(decay=1.0)(k) for k in (1, 2, 4)] == [0.0, 0.5, 0.75]
    # close to 1 the expm1 form keeps the digits that 1 - d**k would lose
    s = ZeroDebiased(decay=1 - 1e-12)
    assert s(2) == pytest.approx(0.5, rel=1e-9)
    assert s(10**15) == pytest.approx(1 - 1e-12, rel=1e-12)


def test_running_mean_is_the_mean():
    xs = [Fraction(x) for x in (3, -1, 4, 1, -5, 9, 2, 6)]
    got = _ema_from_copy(RunningMean(), [float(x) for x in xs])
    for t, g in enumerate(got, start=1):
        assert g == pytest.approx(float(sum(xs[:t]) / t), rel=1e-15, abs=1e-15)


SCHEDULES = [ExponentialRamp(), ExponentialRamp(decay=0.9, tau=3), RatioRamp(),
             RatioRamp(decay=0.99, factor=0.5, min_smoothing=0.2), ZeroDebiased(0.9),
             MomentumAnnealing(), MomentumAnnealing(momentum=0.1, gamma=2, interval=3),
             RunningMean()]


@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 10**12))
@example(k=332)  # ZeroDebiased(0.9) in the quotient form dipped by an ulp from 332 to 333
def test_every_schedule_gives_a_smoothing_and_never_decreases(k):
    for schedule in SCHEDULES:
        s = schedule(k)
        assert check_smoothing(s) == s, (schedule, k)
        assert schedule(k + 1) >= s, (schedule, k)


@pytest.mark.parametrize("build,name", [
    (lambda: ExponentialRamp(decay=1.5), "decay"),
    (lambda: ExponentialRamp(tau=0), "tau"),
    (lambda: RatioRamp(decay=-0.1), "decay"),
    (lambda: RatioRamp(factor=0), "factor"),
    (lambda: RatioRamp(min_smoothing=2), "min_smoothing"),
    (lambda: ZeroDebiased(decay=1.01), "decay"),
    (lambda: MomentumAnnealing(momentum=2), "momentum"),
    (lambda: MomentumAnnealing(gamma=-1), "gamma"),
    (lambda: MomentumAnnealing(interval=0), "interval"),
    (lambda: MomentumAnnealing(interval=1.5), "interval"),
])
def test_bad_arguments_name_themselves(build, name):
    with pytest.raises((ValueError, TypeError), match=name):
        build()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("k", [0, -3, 2.0, True])
def test_update_number_must_be_a_positive_int(schedule, k):
    with pytest.raises(ValueError, match="k: expected an update number"):
        schedule(k)
