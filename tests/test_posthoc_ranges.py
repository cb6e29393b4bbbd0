"""Supported sigma_rel ranges that tell the truth (issue 10, item 4).

Snapshots of the profiles 0.05 and 0.28 support two islands of sigma_rel, not the range
between them. The islands printed by ``emakit inspect`` and by the refusal of ``synthesize``
are checked against an independent computation of the profile error (numeric quadrature in
numpy, not emakit's closed-form inner products), and a refused value must never lie inside a
printed range.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import emakit
from emakit.cli import main
from emakit.posthoc import list_snapshots, plan_synthesis


def _gamma(sigma_rel: float) -> float:
    """Largest root of g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) (numpy's roots)."""
    t = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def quadrature_error(stored: list[tuple[float, float]], t_end: float, sigma_rel: float) -> float:
    """Relative L2 error of the best sum-to-one combination of the stored profiles
    ``(t_i, gamma_i)`` to the target profile at ``t_end``, by the trapezoid rule."""
    tau = np.linspace(0.0, t_end, 400_001)

    def profile(t: float, g: float) -> np.ndarray:
        x = np.where(tau <= t, tau / t, 0.0)
        return (g + 1) * x**g / t

    basis = np.stack([profile(t, g) for t, g in stored])
    target = profile(t_end, _gamma(sigma_rel))
    gram = np.trapezoid(basis[:, None] * basis[None], tau, axis=-1)
    rhs = np.trapezoid(basis * target, tau, axis=-1)
    n = len(stored)
    kkt = np.zeros((n + 1, n + 1))
    kkt[:n, :n], kkt[:n, n], kkt[n, :n] = gram, 1.0, 1.0
    c = np.linalg.lstsq(kkt, np.append(rhs, 1.0), rcond=None)[0][:n]
    resid = c @ basis - target
    return float(np.sqrt(np.trapezoid(resid**2, tau) / np.trapezoid(target**2, tau)))


def _parse(text: str) -> list[tuple[float, float]]:
    pairs = re.findall(r"(\d[0-9.e-]*\d) to (\d[0-9.e-]*\d)", text)
    return [(float(a), float(b)) for a, b in pairs]


@pytest.fixture(scope="module")
def two_islands(tmp_path_factory):
    folder = tmp_path_factory.mktemp("islands")
    model = torch.nn.Linear(4, 2)
    ph = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.28), snapshot_every="50ba",
                           snapshot_dir=folder)
    for _ in range(100):
        ph.step()
    return folder


def test_inspect_and_refusal_print_the_two_islands(two_islands, capsys):
    snaps = list_snapshots(two_islands)
    stored = [(s.t, g) for s in snaps for g in s.gammas]
    t_end = snaps[-1].t
    assert main(["inspect", str(two_islands)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "supported sigma_rel" in x)
    islands = _parse(line.split("):", 1)[1])
    assert len(islands) == 2, line  # "0.0456 to 0.2848" before: one range over the gap
    (a, b), (c, d) = islands
    assert a < 0.05 < b < 0.15 < c < 0.28 < d
    for lo, hi in islands:  # every printed value is supported, by independent quadrature
        for x in (lo, (lo * hi) ** 0.5, hi):
            assert quadrature_error(stored, t_end, x) <= 0.05 + 1e-4, x
        # and the edges are tight: 1% beyond them the error is above max_error
        assert quadrature_error(stored, t_end, lo * 0.99) > 0.05
        assert quadrature_error(stored, t_end, hi * 1.01) > 0.05
    assert quadrature_error(stored, t_end, 0.15) > 0.05
    with pytest.raises(ValueError, match="cannot be represented") as err:
        emakit.synthesize(two_islands, 0.15)
    said = _parse(str(err.value).split("they support sigma_rel", 1)[1])
    assert said == islands
    assert not any(lo <= 0.15 <= hi for lo, hi in said)


def test_a_refused_value_never_lies_inside_a_printed_range(two_islands):
    for x in np.geomspace(0.01, 0.285, 41):
        try:
            plan_synthesis(two_islands, [float(x)])
        except ValueError as err:
            said = _parse(str(err).split("they support sigma_rel", 1)[1])
            assert said and not any(lo <= x <= hi for lo, hi in said), (x, str(err))
