"""Property tests: Time.parse round trips, half-life/smoothing conversions."""

from __future__ import annotations

import math
import sys

from hypothesis import given
from hypothesis import strategies as st

import emakit
from emakit.time import UNITS

values = st.one_of(
    st.integers(min_value=0, max_value=10**15),
    st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False),
)


@given(values, st.sampled_from(UNITS))
def test_time_round_trip(value, unit):
    t = emakit.Time(value, unit)
    assert emakit.Time.parse(str(t)) == t
    assert float(emakit.Time.parse(str(t)).value) == float(value)


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from(UNITS),
       st.sampled_from(["", " ", "  "]))
def test_time_parse_tolerates_spaces_and_case(value, unit, space):
    t = emakit.Time.parse(f"{space}{value}{space}{unit.upper()}{space}")
    assert t == emakit.Time(value, unit)


@given(st.floats(min_value=1e-3, max_value=1e7), st.floats(min_value=1e-3, max_value=1e3))
def test_half_life_round_trip(half_life, interval):
    s = emakit.smoothing_from_half_life(half_life, interval)
    if sys.float_info.min < s < 1.0:  # a subnormal s has lost its precision
        back = emakit.half_life_from_smoothing(s, interval)
        assert math.isclose(back, half_life, rel_tol=1e-6)
        # The definition: after one half-life the old average keeps weight 1/2.
        # s carries a relative rounding error of ~2**-53, which the power multiplies.
        tolerance = 1e-12 + 4 * 2**-52 * half_life / interval
        assert math.isclose(s ** (half_life / interval), 0.5, rel_tol=tolerance)


@given(st.floats(min_value=1e-6, max_value=1 - 1e-9))
def test_smoothing_round_trip(smoothing):
    h = emakit.half_life_from_smoothing(smoothing)
    assert math.isclose(emakit.smoothing_from_half_life(h), smoothing, rel_tol=1e-9)
