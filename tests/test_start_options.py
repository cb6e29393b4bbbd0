"""The start copy at construction (``copy_at_construction``) and the update phase
(``update_phase="start"``): the cadence against the rules written out directly, every face
against a float64 closed form, states, resumes and argument errors. The peers these options
reproduce (Ultralytics, YOLOX, torch_ema, d2go, TF1, timm, NeMo, MMEngine's ``interval``,
Lightning's ``update_every_n_steps``) are compared in tests/test_peers.py and
tests/test_migrating.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import closed_form, flat_params, set_random_weights
from torch import nn

import emakit
from emakit import cadence as cad
from emakit.averager import Averager
from emakit.cadence import Cadence, CadenceState, Span
from emakit.schedules import RatioRamp
from emakit.time import Time

events = st.lists(st.sampled_from(["ba", "ba", "ba", "ep"]), min_size=1, max_size=80)


def _drive(c: Cadence, seq: list[str], s: CadenceState | None = None):
    """Drive the cadence as an averager does; record (what, count, span) per action."""
    s = CadenceState() if s is None else s
    out = []
    if cad.constructed(c, s).start:
        s = cad.begin(c, s)
        out.append(("start", 0, None))
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
    return out, s


def _tiles(actions) -> None:
    """The spans tile the training time since the start copy: no gap, no overlap."""
    origin = next(n for a, n, _ in actions if a == "start")
    k = 1
    for a, n, span in actions:
        if a == "update":
            assert span.first == k + 1 and span.last == n - origin + 1
            assert span.time == n and span.origin == origin
            k = span.last


# the cadence, pure -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(seq=events, interval=st.integers(1, 5), unit=st.sampled_from(["ba", "ep"]),
       start=st.integers(0, 12), on_interval=st.booleans())
def test_phase_start_updates_every_interval_after_the_start_copy(seq, interval, unit, start,
                                                                 on_interval):
    c = Cadence(start=Time(start, unit), interval=Time(interval, unit), update_phase="start",
                start_on_interval=on_interval)
    actions, _ = _drive(c, seq)
    count, copied, expected = 0, None, []  # the rule, written out directly
    for u in seq:
        if u != unit:
            continue
        count += 1
        if copied is None and count >= start:  # any count: the grid begins here
            copied = count
            expected.append(("start", count))
        elif copied is not None and (count - copied) % interval == 0:
            expected.append(("update", count))
    assert [(a, n) for a, n, _ in actions] == expected
    if copied is not None:
        _tiles(actions)


@settings(max_examples=200, deadline=None)
@given(seq=events, interval=st.integers(1, 5), unit=st.sampled_from(["ba", "ep"]),
       phase=st.sampled_from(["zero", "start"]))
def test_a_copy_at_construction_is_update_1_at_count_0(seq, interval, unit, phase):
    c = Cadence(start=Time(0, unit), interval=Time(interval, unit), update_phase=phase,
                copy_at_construction=True)
    actions, state = _drive(c, seq)
    # a grid anchored at the copy (count 0) is the grid of multiples
    count, expected = 0, [("start", 0)]
    for u in seq:
        if u == unit:
            count += 1
            if count % interval == 0:
                expected.append(("update", count))
    assert [(a, n) for a, n, _ in actions] == expected
    _tiles(actions)
    assert state.num_updates == len(expected)
    first = next((span for a, _, span in actions if a == "update"), None)
    if first is not None:  # the first averaging update is k = 2 (a schedule's update 2)
        assert first.first == 2 and first.last == interval + 1


@settings(max_examples=200, deadline=None)
@given(start=st.integers(0, 20), interval=st.integers(1, 6), steps=st.integers(0, 30),
       phase=st.sampled_from(["zero", "start"]), construct=st.booleans())
def test_next_span_is_the_span_the_next_update_covers(start, interval, steps, phase,
                                                      construct):
    c = Cadence(start=Time(0 if construct else start, "ba"), interval=Time(interval, "ba"),
                update_phase=phase, copy_at_construction=construct)
    _, s = _drive(c, ["ba"] * steps)
    predicted = cad.next_span(c, s)
    while True:  # run the clock until the next averaging update and compare its span
        s = cad.tick(s, "ba")
        due = cad.due(c, s, "ba")
        if due.start:
            s = cad.begin(c, s)
        elif due.update:
            assert cad.span(c, s) == predicted
            return


@given(resume=st.integers(0, 500), interval=st.integers(1, 5),
       phase=st.sampled_from(["zero", "start"]))
def test_an_average_copied_at_construction_and_resumed_at_n_is_k_1_at_n(resume, interval,
                                                                        phase):
    c = Cadence(start=Time(0, "ba"), interval=Time(interval, "ba"), update_phase=phase,
                copy_at_construction=True)
    s = cad.begin(c, CadenceState())
    s = cad.resumed(c, s, cad.Counts(ba=resume))
    assert (s.origin, s.k, s.num_updates) == (resume, 1, 1)
    actions, _ = _drive(c, ["ba"] * (3 * interval), s)
    updates = [(n, span) for a, n, span in actions if a == "update"]
    anchor = resume if phase == "start" else 0
    assert [n for n, _ in updates] == [n for n in range(resume + 1, resume + 3 * interval + 1)
                                       if (n - anchor) % interval == 0]
    first = updates[0][1]  # covers the steps after the resume only
    assert first == Span(2, updates[0][0] - resume + 1, resume)


def test_resuming_an_average_not_started_moves_the_clock_only():
    c = Cadence(start=Time(10, "ba"), interval=Time(1, "ba"))
    s = cad.resumed(c, CadenceState(), cad.Counts(ba=7, ep=1))
    assert s == CadenceState(counts=cad.Counts(ba=7, ep=1))


def test_an_unknown_phase_is_refused_naming_it():
    with pytest.raises(ValueError, match="update_phase"):
        Cadence(start=Time(0, "ba"), interval=Time(1, "ba"), update_phase="first")


# the faces -------------------------------------------------------------------------------


def _faces() -> list[type]:
    out, todo = [], list(Averager.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


def test_every_face_is_checked_below():
    assert {f.__name__ for f in _faces()} == {"EMA", "BEMA", "PostHocEMA"}


@pytest.mark.parametrize("face", _faces(), ids=lambda f: f.__name__)
def test_every_face_takes_the_copy_when_built(face, tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    built = {n: t.detach().clone() for n, t in model.state_dict().items()}
    extra = {"snapshot_dir": tmp_path} if face.__name__ == "PostHocEMA" else {}
    avg = face(model, copy_at_construction=True, **extra)
    assert avg.started and avg.num_updates == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    got = avg.ema_state_dict()
    for n, t in built.items():
        torch.testing.assert_close(got[n], t, rtol=0, atol=0)
    without = face(nn.Linear(4, 3), **extra)
    assert not without.started and without.num_updates == 0


def test_ema_copied_at_construction_is_the_closed_form_from_update_2():
    """A schedule asked for k = 2 at the first step, the copy at construction weighing
    ``prod s_k``: the float64 closed form of tests/reference.py."""
    g = torch.Generator().manual_seed(3)
    model = nn.Linear(5, 3).double()
    schedule = RatioRamp(decay=0.9)
    ema = emakit.EMA(model, smoothing=schedule, dtype=torch.float64,
                     copy_at_construction=True)
    assert ema.smoothing == schedule(2)
    theta0, updates = flat_params(model), []
    for k in range(2, 14):
        set_random_weights(model, g)
        updates.append((schedule(k), flat_params(model)))
        ema.step()
        with ema.swapped():
            got = flat_params(model)
        torch.testing.assert_close(got, closed_form(theta0, updates), rtol=1e-13, atol=1e-14)
    assert ema.num_updates == 13


@pytest.mark.parametrize("interval,phase,updated_at", [
    (3, "start", {6: 3, 9: 3, 12: 3}),  # the copy at step 3, then every 3 steps after it
    (3, "zero", {6: 3, 9: 3, 12: 3}),   # on the multiples: the same here
    (4, "start", {7: 4, 11: 4}),        # the copy at step 3, updates at 7, 11
    (4, "zero", {4: 1, 8: 4, 12: 4}),   # step 4 covers the one step since the copy
])
def test_ema_update_phase_against_the_closed_form(interval, phase, updated_at):
    """``updated_at``: step -> the steps that update covers; a float smoothing is per
    interval, so an update covering u steps weighs the average ``0.7 ** (u / interval)``."""
    g = torch.Generator().manual_seed(4)
    model = nn.Linear(5, 3).double()
    ema = emakit.EMA(model, smoothing=0.7, dtype=torch.float64, start="3ba",
                     update_interval=f"{interval}ba", update_phase=phase)
    theta0, updates = None, []
    for step in range(1, 13):
        set_random_weights(model, g)
        ema.step()
        if step == 3:
            theta0 = flat_params(model)
        if step in updated_at:
            updates.append((0.7 ** (updated_at[step] / interval), flat_params(model)))
        with ema.swapped():
            got = flat_params(model)
        want = closed_form(theta0, updates) if theta0 is not None else flat_params(model)
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)
    assert ema.num_updates == 1 + len(updated_at)


def test_the_phase_is_saved_and_a_resumed_run_stays_on_its_grid():
    g = torch.Generator().manual_seed(5)
    kwargs = dict(smoothing=0.6, dtype=torch.float64, update_interval="3ba",
                  update_phase="start", start="2ba")
    model = nn.Linear(3, 2).double()
    twin = nn.Linear(3, 2).double()
    twin.load_state_dict(model.state_dict())
    ema = emakit.EMA(model, **kwargs)
    weights = []
    for _ in range(7):
        set_random_weights(model, g)
        weights.append({n: p.clone() for n, p in model.state_dict().items()})
        ema.step()
    state = ema.state_dict()
    assert state["config"]["update_phase"] == "start"
    resumed = emakit.EMA(twin, **kwargs)
    resumed.load_state_dict(state)
    for _ in range(8):
        set_random_weights(model, g)
        twin.load_state_dict(model.state_dict())
        ema.step()
        resumed.step()
        for n, t in ema.ema_state_dict().items():
            torch.testing.assert_close(resumed.ema_state_dict()[n], t, rtol=0, atol=0)
    assert ema.num_updates == 1 + 4  # a copy at 2, updates at 5, 8, 11, 14
    other = emakit.EMA(nn.Linear(3, 2).double(), **{**kwargs, "update_phase": "zero"})
    with pytest.warns(UserWarning, match="update_phase"):
        other.load_state_dict(state)


def test_an_ema_copied_at_construction_and_resumed_covers_the_steps_after_the_resume():
    """A trainer callback builds its average from the loaded weights of a resumed run and
    puts the clock at the resumed step: the first update is update 2, one step of time."""
    g = torch.Generator().manual_seed(6)
    model = nn.Linear(3, 2).double()
    ema = emakit.EMA(model, half_life="2ba", dtype=torch.float64, copy_at_construction=True)
    theta0 = flat_params(model)
    ema.resume_at(step=100, epoch=3)
    set_random_weights(model, g)
    ema.step()
    s = 2 ** (-1 / 2)  # one batch of a half-life of 2 batches
    with ema.swapped():
        got = flat_params(model)
    torch.testing.assert_close(got, closed_form(theta0, [(s, flat_params(model))]),
                               rtol=1e-13, atol=1e-14)
    assert ema.counts["ba"] == 101 and ema.num_updates == 2


def test_a_non_finite_model_at_construction_delays_the_copy_to_the_first_finite_step():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="does not start"):
        ema = emakit.EMA(model, smoothing=0.5, copy_at_construction=True,
                         skip_nonfinite=True)
    assert not ema.started
    with torch.no_grad():
        model.weight[0, 0] = 1.0
    copied = {n: t.clone() for n, t in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema.step()
    assert ema.started and ema.num_updates == 1
    for n, t in ema.ema_state_dict().items():
        torch.testing.assert_close(t, copied[n], rtol=0, atol=0)


# arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(copy_at_construction=True, start="5ba"), ValueError, "copy_at_construction.*start"),
    (dict(copy_at_construction=True, start="0.1dur", total="100ba"), ValueError,
     "copy_at_construction.*start"),
    (dict(copy_at_construction="yes"), TypeError, "copy_at_construction"),
    (dict(update_phase="first"), ValueError, "update_phase"),
    (dict(update_phase=1), ValueError, "update_phase"),
])
def test_bad_arguments_name_themselves(kwargs, error, match):
    for config in (emakit.EMAConfig, emakit.BEMAConfig, emakit.PostHocEMAConfig):
        with pytest.raises(error, match=match):
            config(**kwargs)


@pytest.mark.parametrize("start", ["0ba", "0ep", 0, "0dur"])
def test_a_start_of_zero_in_any_unit_goes_with_a_copy_at_construction(start):
    ema = emakit.EMA(nn.Linear(2, 2), copy_at_construction=True, start=start, total="10ba")
    assert ema.started
