"""The pure layer, tested without tensors: the cadence against the rules docs/semantics.md
states, the laws against their closed forms, the migrations against the 0.1 semantics, and the
keyword forms against the configuration fields."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import emakit
from emakit import cadence as cad
from emakit import config as cfg
from emakit.cadence import Cadence, CadenceState, Span
from emakit.laws import BiasCorrected, Exponential, PowerFunction
from emakit.migrations import upgrade
from emakit.time import Time

events = st.lists(st.sampled_from(["ba", "ba", "ba", "ep"]), min_size=1, max_size=80)


def _run(c: Cadence, seq: list[str]) -> list[tuple[str, int, Span | None]]:
    """Drive the cadence as an averager does; record (what, count, span) per action."""
    s = CadenceState()
    out: list[tuple[str, int, Span | None]] = []
    for unit in seq:
        s = cad.tick(s, unit)
        due = cad.due(c, s, unit)
        count = s.counts[c.interval.unit]
        if due.start:
            s = cad.begin(c, s)
            out.append(("start", count, None))
        elif due.update:
            span = cad.span(c, s)
            s = cad.moved(s, span)
            out.append(("update", count, span))
    return out


@settings(max_examples=300, deadline=None)
@given(seq=events, interval=st.integers(1, 5), unit=st.sampled_from(["ba", "ep"]),
       start=st.integers(0, 12))
def test_cadence_starts_once_then_updates_at_multiples_and_spans_tile(seq, interval, unit,
                                                                       start):
    c = Cadence(start=Time(start, unit), interval=Time(interval, unit))
    actions = _run(c, seq)
    counts = {"ba": 0, "ep": 0}
    expected = []  # the rules of docs/semantics.md, written out directly
    started = False
    for u in seq:
        counts[u] += 1
        if u != unit:
            continue
        if not started and counts[u] >= start:
            started = True
            expected.append(("start", counts[u]))
        elif started and counts[u] % interval == 0:
            expected.append(("update", counts[u]))
    assert [(a, n) for a, n, _ in actions] == expected
    # the spans tile the training time since the start copy: no gap, no overlap
    origin = next((n for a, n, _ in actions if a == "start"), None)
    k = 1
    for a, n, span in actions:
        if a == "update":
            assert span.first == k + 1 and span.last == n - origin + 1
            assert span.time == n and span.units == n - (origin + k - 1)
            k = span.last


def test_a_bare_update_covers_one_interval_when_the_clock_has_not_moved():
    c = Cadence(start=Time(0, "ba"), interval=Time(3, "ba"))
    s = cad.begin(c, cad.tick(CadenceState(), "ba"))
    first = cad.span(c, s)
    s = cad.moved(s, first)
    assert (first.first, first.last) == (2, 4)  # no step since the copy: one interval
    again = cad.span(c, s)
    assert (again.first, again.last) == (5, 7)


def test_post_hoc_starts_on_an_interval_multiple():
    c = Cadence(start=Time(2, "ba"), interval=Time(5, "ba"), start_on_interval=True)
    assert [(a, n) for a, n, _ in _run(c, ["ba"] * 12)] == [("start", 5), ("update", 10)]


@given(start=st.integers(0, 20), interval=st.integers(1, 6), steps=st.integers(0, 30))
def test_next_span_is_the_span_the_next_update_covers(start, interval, steps):
    c = Cadence(start=Time(start, "ba"), interval=Time(interval, "ba"))
    s = CadenceState()
    for _ in range(steps):
        s = cad.tick(s, "ba")
        due = cad.due(c, s, "ba")
        if due.start:
            s = cad.begin(c, s)
        elif due.update:
            s = cad.moved(s, cad.span(c, s))
    predicted = cad.next_span(c, s)
    while True:  # run the clock until the next averaging update and compare its span
        s = cad.tick(s, "ba")
        due = cad.due(c, s, "ba")
        if due.start:
            s = cad.begin(c, s)
        elif due.update:
            assert cad.span(c, s) == predicted
            return


def test_a_refused_count_counts_nothing():
    s = CadenceState()
    with pytest.raises(ValueError, match="samples"):
        cad.tick(s, "ba", samples=-1)
    assert s.counts.ba == 0


# laws ------------------------------------------------------------------------------------


@given(per_unit=st.floats(0.0, 1.0), first=st.integers(2, 50), units=st.integers(1, 20))
def test_exponential_is_the_product_of_per_unit_factors(per_unit, first, units):
    span = Span(first, first + units - 1, origin=1)
    assert Exponential(per_unit).smoothing(span, n=3) == pytest.approx(per_unit ** units,
                                                                       abs=1e-15)


@given(first=st.integers(2, 200), units=st.integers(1, 30), cap=st.floats(0.5, 1.0),
       power=st.floats(0.3, 1.0), inv_gamma=st.floats(0.5, 20.0))
def test_exponential_warmup_is_timms_formula_per_batch(first, units, cap, power, inv_gamma):
    warmup = emakit.PowerWarmup(inv_gamma=inv_gamma, power=power)
    span = Span(first, first + units - 1, origin=1)
    product = 1.0
    for k in range(span.first, span.last + 1):  # timm ModelEmaV3.get_decay, k - 1 steps in
        product *= min(1.0 - (1.0 + (k - 1) / inv_gamma) ** -power, cap)
    got = Exponential(cap, warmup=warmup).smoothing(span, n=1)
    assert got == pytest.approx(product, rel=1e-12, abs=1e-300)


def test_exponential_schedule_is_called_with_the_update_number():
    calls = []
    law = Exponential(1.0, schedule=lambda k: calls.append(k) or 0.5)
    assert law.smoothing(Span(2, 2, 1), n=1) == 0.5 and calls == [2]


@given(t=st.integers(2, 10**6), dt=st.integers(1, 1000), gamma=st.floats(0.1, 50.0))
def test_power_function_is_karras_closed_form(t, dt, gamma):
    dt = min(dt, t)
    origin = t - dt  # the previous update at t - dt
    span = Span(first=2, last=dt + 1, origin=max(origin, 1))
    if origin < 1:
        return
    assert PowerFunction(gamma).smoothing(span, n=1) == pytest.approx(
        (1.0 - dt / t) ** (gamma + 1.0), rel=1e-12, abs=1e-300)


@given(k=st.integers(1, 10**5))
def test_bias_corrected_is_trls_bema_schedule(k):
    law = BiasCorrected(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0,
                        min_ema_multiplier=0.0)
    t = k - 1  # TRL: step counted from the start of the average
    beta = (10.0 + t) ** -0.5
    assert 1.0 - law.smoothing(Span(k, k, 1), n=1) == pytest.approx(min(beta, 1.0))
    assert law.alpha(k) == pytest.approx((10.0 + t) ** -0.2)


# migrations ------------------------------------------------------------------------------


@given(updates=st.integers(0, 50), interval=st.integers(1, 5))
def test_version_1_states_land_where_0_1_left_the_average(updates, interval):
    """0.1 took the start copy without counting it and updated every ``interval`` batches,
    and recorded no more than that: the migration takes the last update to be at the saved
    clock (a checkpoint right after a step); the next update then covers the batches since."""
    started = updates > 0
    count = updates * interval  # 0.1's clock at the save, right after its last update
    old = {"version": 1, "clock": {"ba": count, "ep": 0, "sp": 0, "tok": 0},
           "num_updates": max(updates - 1, 0), "started": started, "average": {}}
    new = upgrade("ema", old, interval_units=interval, interval_unit="ba")
    assert new["version"] == 2 and new["num_updates"] == (updates if started else 0)
    if started:
        c = Cadence(start=Time(0, "ba"), interval=Time(interval, "ba"))
        state = CadenceState(cad.Counts(ba=count), True, new["origin"], new["k"], updates)
        assert new["origin"] + new["k"] - 1 == count
        assert cad.next_span(c, state).first == new["k"] + 1


def test_an_unknown_version_is_refused_naming_it():
    with pytest.raises(ValueError, match="version 7"):
        upgrade("ema", {"version": 7}, 1, "ba")


# the keyword forms --------------------------------------------------------------------------


@pytest.mark.parametrize("config, options", [
    (cfg.StoreConfig, cfg.StoreOptions), (cfg.EMAConfig, cfg.EMAOptions),
    (cfg.BEMAConfig, cfg.BEMAOptions), (cfg.PostHocEMAConfig, cfg.PostHocEMAOptions),
])
def test_keyword_forms_list_every_field(config, options):
    assert set(typing.get_type_hints(options)) == {f.name for f in dataclasses.fields(config)}


def test_configs_hold_what_they_declare_and_never_change():
    c = emakit.EMAConfig(half_life=100, start="5ba", exclude="head.*", device="cpu")
    assert c.half_life == Time(100, "ba") and c.start == Time(5, "ba")
    assert c.exclude == ("head.*",) and str(c.device) == "cpu"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.half_life = Time(5, "ba")  # type: ignore[misc]
    with pytest.raises(AttributeError, match="no field"):
        c.halflife = 5  # type: ignore[attr-defined]
    assert dataclasses.replace(c, start=7).start == Time(7, "ba")
    assert math.isclose(c.max_smoothing(), 2 ** (-1 / 100))
