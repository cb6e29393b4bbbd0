"""The saved state records the smoothing law, and loading it under another law warns (issue 19,
item 5).

On 22b934d the state's ``config`` held only ``half_life``, ``update_interval`` and ``start``:
a state saved with ``smoothing=0.995`` loaded silently into ``EMA(model, smoothing=0.0)``
(torch_ema restores its decay), and so did one saved with a warmup or a schedule into an EMA
without. Each law below is saved, read back from a file written with ``torch.save`` and
loaded with ``weights_only=True``, then loaded under the same law (no warning) and under
another (a warning that names both).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import emakit
from emakit.schedules import RatioRamp

LAWS = {
    "smoothing": dict(smoothing=0.995),
    "smoothing-interval": dict(smoothing=0.995, update_interval="4ba"),
    "half-life": dict(half_life="100ba"),
    "half-life-epochs": dict(half_life="2ep"),
    "warmup": dict(half_life="100ba", warmup=emakit.PowerWarmup(inv_gamma=1.0, power=0.75)),
    "cosine": dict(smoothing=emakit.CosineSmoothing(start=0.99, end=1.0, total=1000)),
    "ratio-ramp": dict(smoothing=RatioRamp(decay=0.999)),
    "default": dict(),
}

# what each law's record must say (read independently of the code: from the arguments)
EXPECTED = {
    "smoothing": {"law": "exponential", "per_unit": 0.995},
    "smoothing-interval": {"law": "exponential", "per_unit": 0.995 ** 0.25},
    "half-life": {"law": "exponential", "per_unit": 2.0 ** (-1.0 / 100.0)},
    "half-life-epochs": {"law": "exponential", "per_unit": 2.0 ** (-1.0 / 2.0)},
    "warmup": {"law": "exponential", "per_unit": 2.0 ** (-1.0 / 100.0),
               "warmup": [1.0, 0.75, 0.0]},
    "cosine": {"law": "exponential", "per_unit": 1.0,
               "schedule": "CosineSmoothing(start=0.99, end=1.0, total=1000)"},
    "ratio-ramp": {"law": "exponential", "per_unit": 1.0,
                   "schedule": "RatioRamp(decay=0.999, factor=10.0, min_smoothing=0.0)"},
    "default": {"law": "exponential", "per_unit": 2.0 ** (-1.0 / 1000.0)},
}


def _saved(tmp_path, **law) -> dict:
    model = nn.Linear(3, 2)
    ema = emakit.EMA(model, **law)
    for _ in range(3):
        ema.step()
    path = tmp_path / "state.pt"
    torch.save(ema.state_dict(), path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", sorted(LAWS))
def test_the_state_records_the_law(name, tmp_path):
    state = _saved(tmp_path, **LAWS[name])
    record = state["config"]["law"]
    want = EXPECTED[name]
    assert sorted(record) == sorted(want)
    for key, value in want.items():
        if isinstance(value, float):
            assert record[key] == pytest.approx(value, rel=1e-15), key
        else:
            assert record[key] == value, key


def _load_warnings(state: dict, **law) -> list[str]:
    ema = emakit.EMA(nn.Linear(3, 2), **law)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema.load_state_dict(state)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("name", sorted(LAWS))
def test_loading_under_the_same_law_does_not_warn(name, tmp_path):
    state = _saved(tmp_path, **LAWS[name])
    assert _load_warnings(state, **LAWS[name]) == []


OTHER = [
    ("smoothing", dict(smoothing=0.0)),  # the case the issue measured
    ("smoothing", dict(smoothing=0.99)),
    ("smoothing", dict(half_life="100ba")),
    ("half-life", dict(half_life="200ba")),
    ("warmup", dict(half_life="100ba")),  # same half-life, no warmup
    ("warmup", dict(half_life="100ba", warmup=emakit.PowerWarmup(inv_gamma=1.0, power=2 / 3))),
    ("cosine", dict(smoothing=emakit.CosineSmoothing(start=0.996, end=1.0, total=1000))),
    ("cosine", dict(smoothing=RatioRamp(decay=0.999))),
    ("ratio-ramp", dict(smoothing=0.999)),
]


@pytest.mark.parametrize("name, other", OTHER)
def test_loading_under_another_law_warns(name, other, tmp_path):
    state = _saved(tmp_path, **LAWS[name])
    messages = _load_warnings(state, **other)
    assert len(messages) == 1, messages
    assert "loading a state saved with" in messages[0]
    assert repr(state["config"]["law"]) in messages[0]


def test_a_state_recorded_before_the_law_was_loads_without_a_warning(tmp_path):
    """States saved by an emakit that did not record the law yet are compared on what they
    recorded: no warning for a key they never had."""
    state = _saved(tmp_path, half_life="100ba")
    del state["config"]["law"]
    assert _load_warnings(state, half_life="100ba") == []
    assert len(_load_warnings(state, half_life="50ba")) == 1


def test_bema_records_its_law_and_warns_on_another(tmp_path):
    model = nn.Linear(3, 2)
    bema = emakit.BEMA(model, lag=5.0)
    bema.step()
    state = bema.state_dict()
    assert state["config"]["law"] == {"law": "bias-corrected", "ema_power": 0.5,
                                      "bias_power": 0.2, "lag": 5.0, "multiplier": 1.0,
                                      "min_ema_multiplier": 0.0}
    other = emakit.BEMA(model, lag=10.0)
    with pytest.warns(UserWarning, match="loading a state saved with"):
        other.load_state_dict(state)


def test_smoothing_reads_the_first_update_factor_before_the_start():
    """``ema.smoothing`` is the factor of the next averaging update: before the start, the
    first one's (Composer's EMA test asserts it right after construction)."""
    model = nn.Linear(2, 2)
    assert emakit.EMA(model, smoothing=0.995).smoothing == 0.995
    assert emakit.EMA(model, half_life="10ba", start="5ba").smoothing == 2.0 ** (-1 / 10)
    # an interval of 4 batches: the start copy at batch 1, the first update at batch 4
    # covers batches 2..4
    ema = emakit.EMA(model, half_life="10ba", update_interval="4ba")
    assert ema.smoothing == pytest.approx(2.0 ** (-3 / 10), rel=1e-15)
    schedule = emakit.CosineSmoothing(start=0.9, end=1.0, total=100)
    assert emakit.EMA(model, smoothing=schedule).smoothing == schedule(2)
