"""Bad input: a ValueError or TypeError whose message names the argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import emakit


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"half_life": "ten batches"}, ValueError, "half_life.*time string"),
        ({"half_life": "10"}, ValueError, "half_life"),
        ({"half_life": "10xy"}, ValueError, "half_life: unknown time unit 'xy'"),
        ({"half_life": 10.5}, TypeError, "half_life"),  # an int is batches; a float is not
        ({"start": "-5ba"}, ValueError, "start"),
        ({"update_interval": "2.5ba"}, ValueError, "update_interval"),
        ({"update_interval": "0ba"}, ValueError, "update_interval"),
        ({"update_interval": "100sp"}, ValueError, "update_interval"),
        ({"smoothing": 1.5}, ValueError, r"smoothing: expected a float in \[0, 1\]"),
        ({"smoothing": -0.1}, ValueError, "smoothing"),
        ({"smoothing": "0.9"}, TypeError, "smoothing"),
        ({"half_life": "0ba"}, ValueError, "half_life"),
        ({"half_life": "10ba", "smoothing": 0.9}, ValueError, "half_life and smoothing"),
        ({"half_life": "1ep", "update_interval": "1ba"}, ValueError, "batches_per_epoch"),
        ({"half_life": "10ba", "update_interval": "1ep"}, ValueError, "batches_per_epoch"),
        ({"half_life": "0.1dur"}, ValueError, "total"),
        ({"start": "0.5dur"}, ValueError, "total"),
        ({"buffers": "ignore"}, ValueError, "buffers"),
        ({"batches_per_epoch": 0}, ValueError, "batches_per_epoch"),
        ({"dtype": torch.int32}, TypeError, "dtype"),
        ({"warmup": 0.5}, TypeError, "warmup"),
        ({"total": "0.5dur", "start": "0.1dur"}, ValueError, "total"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        emakit.EMA(_model(), **kwargs)


def test_time_parse_errors():
    with pytest.raises(ValueError, match="time string"):
        emakit.Time.parse("abc")
    with pytest.raises(ValueError, match="unknown time unit 'min'"):
        emakit.Time.parse("5min")
    with pytest.raises(TypeError, match="time string"):
        emakit.Time.parse(5.0)
    assert emakit.Time.parse(5) == emakit.Time(5, "ba")  # an int is that many batches
    with pytest.raises(ValueError, match="half_life: expected a number of batches >= 0"):
        emakit.EMA(_model(), half_life=-5)


def test_conversion_errors():
    with pytest.raises(ValueError, match="half_life"):
        emakit.smoothing_from_half_life(0)
    with pytest.raises(ValueError, match="half_life"):
        emakit.smoothing_from_half_life(-3)
    with pytest.raises(ValueError, match="smoothing"):
        emakit.half_life_from_smoothing(1.01)
    with pytest.raises(ValueError, match="update_interval"):
        emakit.smoothing_from_half_life(10, update_interval=0)
    with pytest.raises(ValueError, match="sigma_rel"):
        emakit.sigma_rel_to_gamma(0.3)


def test_schedule_out_of_range_names_the_update():
    ema = emakit.EMA(_model(), smoothing=lambda k: 2.0)
    ema.step()
    with pytest.raises(ValueError, match="smoothing schedule at update 2"):
        ema.step()


def test_load_state_dict_from_another_architecture():
    source = emakit.EMA(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2), nn.Linear(2, 2)))
    target = emakit.EMA(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(ValueError) as info:
        target.load_state_dict(source.state_dict())
    message = str(info.value)
    assert "missing names" in message and "1.running_mean" in message
    assert "unexpected names ['2.weight', '2.bias']" in message
    assert "shape mismatches" in message and "0.weight: expected (4, 3), got (5, 3)" in message


def test_load_state_dict_rejects_a_non_ema_state():
    ema = emakit.EMA(_model())
    with pytest.raises(ValueError, match="missing keys"):
        ema.load_state_dict({"weight": torch.zeros(2)})
    with pytest.raises(TypeError, match="state"):
        ema.load_state_dict([1, 2])


def test_samples_needed_for_a_start_in_samples():
    ema = emakit.EMA(_model(), start="100sp")
    with pytest.raises(ValueError, match="samples"):
        ema.step()
    ema.step(samples=60)
    assert not ema.started
    ema.step(samples=60)
    assert ema.started


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        emakit.EMA({"weight": torch.zeros(3)})


# issue 11: counts, dtypes, callbacks and widths that were accepted or overflowed -----------


@pytest.mark.parametrize("kind", ["samples", "tokens"])
@pytest.mark.parametrize(
    ("value", "error"),
    [(-5, ValueError), ("10", TypeError), (1.7, TypeError), (True, TypeError),
     (float("nan"), TypeError), (torch.tensor(2.0), TypeError)],
)
def test_step_counts_must_be_whole_numbers(kind, value, error):
    ema = emakit.EMA(_model(), half_life="10ba")
    with pytest.raises(error, match=kind):
        ema.step(**{kind: value})
    assert ema.counts["ba"] == 0  # a refused call counts nothing
    ema.step(**{kind: 3})
    ema.step(**{kind: torch.tensor(4)})
    unit = {"samples": "sp", "tokens": "tok"}[kind]
    assert ema.counts[unit] == 7 and ema.counts["ba"] == 2
    ph = emakit.PostHocEMA(_model(), snapshot_every=None)
    with pytest.raises(error, match=kind):
        ph.step(**{kind: value})


@pytest.mark.parametrize("sigma_rels", [(1e-200,), (5e-324,), (0.05, 1e-7)])
def test_posthoc_refuses_widths_too_narrow_to_compute(sigma_rels, tmp_path):
    with pytest.raises(ValueError, match=r"sigma_rels: expected a float in \[1e-06"):
        emakit.PostHocEMA(_model(), sigma_rels=sigma_rels, snapshot_dir=tmp_path)


def test_sigma_rel_gamma_conversions_do_not_overflow():
    from emakit import gamma_to_sigma_rel, sigma_rel_to_gamma

    for s in (1e-200, 1e-300, 1e-100, 1e-8):
        g = sigma_rel_to_gamma(s)
        # the cubic divided by g^3: 1 + 7/g + (16 - s^-2)/g^2 + (12 - s^-2)/g^3 = 0, in float64
        # terms that cannot overflow: with g s = u, residual of u^2 = 1 - O(s)
        assert (g * s) ** 2 == pytest.approx(1.0, rel=1e-6), s
    assert gamma_to_sigma_rel(1e308) == pytest.approx(1e-308, rel=1e-12)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(5e-324)
    with pytest.raises(ValueError, match="gamma"):
        gamma_to_sigma_rel(float("inf"))


def _snaps(folder):
    model = _model()
    ph = emakit.PostHocEMA(model, snapshot_every="5ba", snapshot_dir=folder)
    for _ in range(20):
        with torch.no_grad():
            model[0].weight.add_(0.01)
        ph.step()
    return folder


def test_synthesize_dtype_and_progress(tmp_path):
    folder = _snaps(tmp_path / "s")
    half = emakit.synthesize(folder, 0.08, dtype="float16")  # "Invalid device string" before
    ref = emakit.synthesize(folder, 0.08, dtype=torch.float32)
    for k, t in ref.items():
        if t.is_floating_point():
            assert half[k].dtype == torch.float16 and torch.equal(half[k], t.half()), k
        else:
            assert torch.equal(half[k], t), k
    for bad in (torch.int64, torch.bool, "int64", "bogus", 3):
        with pytest.raises((TypeError, ValueError), match="dtype"):
            emakit.synthesize(folder, 0.08, dtype=bad)
    with pytest.raises(TypeError, match="progress"):  # "'str' object is not callable" before
        emakit.synthesize(folder, 0.08, progress="yes")


def test_compute_ema_names_the_argument_that_is_not_a_module():
    with pytest.raises(TypeError, match="ema_model: expected a torch.nn.Module"):
        emakit.compute_ema(_model(), None)


@pytest.mark.parametrize("change", [
    {"t": 99}, {"t": -1}, {"k": 50}, {"origin": 0},
    {"clock": {"ba": -3, "ep": 0, "sp": 0, "tok": 0}},
])
def test_posthoc_load_refuses_times_that_do_not_fit_its_clock(change, tmp_path):
    """A post-hoc update happens at a clock time: a saved time after the saved clock, a
    negative one or a negative clock is refused before anything changes."""
    model = _model()
    ph = emakit.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=None)
    for _ in range(5):
        ph.step()
    other = emakit.PostHocEMA(model, snapshot_dir=tmp_path, snapshot_every=None)
    before = other.state_dict()
    with pytest.raises(ValueError, match=r"state"):
        other.load_state_dict({**ph.state_dict(), **change})
    after = other.state_dict()
    assert after["clock"] == before["clock"] and after["num_updates"] == 0
