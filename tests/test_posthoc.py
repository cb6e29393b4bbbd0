"""Post-hoc EMA: power-function tracking, snapshots, synthesis. References are float64 closed
forms computed here, independent of the code under test."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import emakit
from emakit.posthoc import list_snapshots, plan_synthesis

F64 = torch.float64


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def walk(model: nn.Module, scale: float = 0.01) -> None:
    """One random-walk step of every parameter and floating buffer."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.randn_like(b) * scale)


def averaged(sd: dict, model: nn.Module) -> torch.Tensor:
    """The averaged tensors of a state dict, flattened in float64."""
    names = [n for n, t in model.state_dict().items() if t.is_floating_point()]
    return torch.cat([sd[n].detach().to(F64).flatten() for n in names])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# sigma_rel <-> gamma -------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel, gamma, digits", [(0.05, 16.97, 2), (0.10, 6.937, 3),
                                                      (0.15, 3.558, 3)])
def test_sigma_rel_to_gamma_values(sigma_rel, gamma, digits):
    assert round(emakit.sigma_rel_to_gamma(sigma_rel), digits) == gamma
    # and the defining cubic (EDM2 eq. 3) vanishes at it
    g, t = emakit.sigma_rel_to_gamma(sigma_rel), sigma_rel**-2
    assert abs(g**3 + 7 * g**2 + (16 - t) * g + (12 - t)) < 1e-9 * t * g


@pytest.mark.parametrize("bad", [math.sqrt(1 / 12), 0.3, 0.0, -0.1])
def test_sigma_rel_out_of_range(bad):
    with pytest.raises(ValueError, match="sigma_rel"):
        emakit.sigma_rel_to_gamma(bad)
    with pytest.raises(ValueError, match="sigma_rel"):
        emakit.PostHocEMA(nn.Linear(2, 2), sigma_rels=(bad,), snapshot_every=None)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-3, max_value=0.2886))
def test_sigma_rel_round_trip(sigma_rel):
    gamma = emakit.sigma_rel_to_gamma(sigma_rel)
    assert gamma > 0
    assert math.isclose(emakit.gamma_to_sigma_rel(gamma), sigma_rel, rel_tol=1e-9)


# the tracked average equals the closed form ---------------------------------------------


@pytest.mark.parametrize("interval", [1, 3])
def test_power_ema_matches_closed_form(interval):
    """theta_bar_T = sum_k w_k theta_k with w_k = (t_k^(g+1) - t_{k-1}^(g+1)) / T^(g+1)."""
    model = nn.Linear(5, 4).to(F64)
    sigma_rels = (0.05, 0.10, 0.2)
    ph = emakit.PostHocEMA(model, sigma_rels=sigma_rels, snapshot_every=None,
                           update_interval=f"{interval}ba", dtype=F64)
    seen: dict[int, torch.Tensor] = {}  # update time -> weights it read
    steps = 60
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p))
        ph.step()
        if step % interval == 0:
            seen[step] = torch.cat([p.detach().flatten() for p in model.parameters()])
    times = sorted(seen)
    big_t = times[-1]
    for sigma_rel in sigma_rels:
        g = emakit.sigma_rel_to_gamma(sigma_rel)
        prev, expected = 0.0, torch.zeros_like(seen[big_t])
        for tk in times:
            w = (tk ** (g + 1) - prev ** (g + 1)) / big_t ** (g + 1)
            expected += w * seen[tk]
            prev = tk
        sd = ph.ema_state_dict(sigma_rel)
        got = torch.cat([sd["weight"].flatten(), sd["bias"].flatten()])
        assert rel(got, expected) < 1e-12
    assert ph.num_updates == steps // interval


# synthesis ------------------------------------------------------------------------------


def train(folder, steps=200, every=20, snapshot_dtype=torch.float16, sigma_rels=(0.05, 0.10),
          model=None, direct=(), interval="1ba"):
    """A random-walk run with a PostHocEMA writing to folder; optionally a second PostHocEMA
    tracking ``direct`` sigma_rels without snapshots. Returns (model, ph, direct_ph, refs)
    where refs[step][sigma_rel] are the tracked profiles' averages at each snapshot."""
    model = model or make_model()
    ph = emakit.PostHocEMA(model, sigma_rels=sigma_rels, snapshot_every=f"{every}ba",
                           snapshot_dir=folder, snapshot_dtype=snapshot_dtype,
                           update_interval=interval)
    dph = (emakit.PostHocEMA(model, sigma_rels=direct, snapshot_every=None,
                             update_interval=interval) if direct else None)
    refs = {}
    for step in range(1, steps + 1):
        walk(model)
        ph.step()
        if dph:
            dph.step()
        if step % every == 0:
            refs[step] = {s: ph.ema_state_dict(s) for s in sigma_rels}
    return model, ph, dph, refs


@pytest.mark.parametrize("snapshot_dtype, tol", [(torch.float16, 1e-3), (torch.float32, 1e-6)])
def test_synthesize_stored_profile(tmp_path, snapshot_dtype, tol):
    model, _, _, refs = train(tmp_path, steps=120, every=20, snapshot_dtype=snapshot_dtype)
    for at in (60, 120, None):
        for sigma_rel in (0.05, 0.10):
            out = emakit.synthesize(tmp_path, sigma_rel=sigma_rel, at=at)
            ref = refs[at or 120][sigma_rel]
            assert set(out) == set(model.state_dict())
            assert rel(averaged(out, model), averaged(ref, model)) < tol
            assert torch.equal(out["1.num_batches_tracked"], model.state_dict()[
                "1.num_batches_tracked"])


def test_synthesize_intermediate_matches_direct(tmp_path):
    """Random walk: synthesized sigma_rel vs a directly tracked power EMA of that width.
    Errors are relative to the EMA's displacement from the raw weights, ||direct - theta_T||."""
    targets = (0.03, 0.075, 0.15)
    model, _, dph, _ = train(tmp_path, steps=600, every=30, snapshot_dtype=torch.float16,
                             direct=targets)
    raw = averaged(model.state_dict(), model)
    outs = emakit.synthesize(tmp_path, sigma_rel=list(targets))
    errors = {}
    for sigma_rel, out in zip(targets, outs, strict=True):
        ref = averaged(dph.ema_state_dict(sigma_rel), model)
        got = averaged(out, model)
        errors[sigma_rel] = float((got - ref).norm() / (ref - raw).norm())
    print("relative errors vs direct tracking:", errors)
    assert errors[0.075] < 0.01
    assert errors[0.15] < 0.01
    assert errors[0.03] < 0.05
    # and a width well off the stored ones is not just one of them
    other = averaged(emakit.synthesize(tmp_path, sigma_rel=0.05), model)
    assert (other - averaged(outs[0], model)).norm() > 10 * (
        averaged(outs[0], model) - averaged(dph.ema_state_dict(0.03), model)).norm()


def test_several_sigma_rels_in_one_pass_equal_single_calls(tmp_path):
    train(tmp_path, steps=60, every=20)
    calls = []
    many = emakit.synthesize(tmp_path, sigma_rel=[0.06, 0.09], progress=lambda i, n:
                             calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for s, out in zip([0.06, 0.09], many, strict=True):
        one = emakit.synthesize(tmp_path, sigma_rel=s)
        assert all(torch.equal(out[k], one[k]) for k in one)


def test_update_interval_and_epochs_stay_exact(tmp_path):
    """update_interval=3: stored profiles reproduced; snapshot t is the last update."""
    model, ph, _, refs = train(tmp_path, steps=90, every=10, interval="3ba",
                               snapshot_dtype=torch.float32)
    infos = list_snapshots(tmp_path)
    assert [s.step for s in infos] == list(range(10, 91, 10))
    assert [s.t for s in infos] == [9, 18, 30, 39, 48, 60, 69, 78, 90]
    out = emakit.synthesize(tmp_path, sigma_rel=0.10, at=40)
    assert rel(averaged(out, model), averaged(refs[40][0.10], model)) < 1e-6


def test_snapshots_after_at_never_enter(tmp_path):
    model = make_model()
    run = tmp_path / "run"
    ph = emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=run,
                           snapshot_dtype=torch.float32)
    for _ in range(30):
        walk(model)
        ph.step()
    at30 = ph.ema_state_dict(0.10)
    shutil.copytree(run, tmp_path / "upto30")
    for _ in range(30):  # wild weights after step 30
        walk(model, scale=100.0)
        ph.step()
    assert len(list_snapshots(run)) == 6
    plan = plan_synthesis(run, [0.07], at=30)
    assert [s.step for s in plan.snapshots] == [10, 20, 30]
    early = emakit.synthesize(run, sigma_rel=0.07, at=30)
    alone = emakit.synthesize(tmp_path / "upto30", sigma_rel=0.07)
    assert all(torch.equal(early[k], alone[k]) for k in early)
    stored = emakit.synthesize(run, sigma_rel=0.10, at=30)
    assert rel(averaged(stored, model), averaged(at30, model)) < 1e-6
    late = emakit.synthesize(run, sigma_rel=0.07)
    assert rel(averaged(late, model), averaged(early, model)) > 1.0
    with pytest.raises(ValueError, match="at: no snapshot at step 35"):
        emakit.synthesize(run, sigma_rel=0.07, at=35)
    with pytest.raises(ValueError, match="at: no snapshot at step 5"):
        emakit.synthesize(run, sigma_rel=0.07, at=5)


def test_epoch_interval(tmp_path):
    """update_interval and snapshot_every in epochs: t counts epochs; steps name the files."""
    model = make_model()
    ph = emakit.PostHocEMA(model, update_interval="1ep", snapshot_every="2ep",
                           snapshot_dir=tmp_path, snapshot_dtype=torch.float32)
    for _ in range(6):
        for _ in range(5):
            walk(model)
            ph.step()
        ph.epoch_end()
    infos = list_snapshots(tmp_path)
    assert [(s.step, s.t, s.time_unit) for s in infos] == [(10, 2, "ep"), (20, 4, "ep"),
                                                           (30, 6, "ep")]
    out = emakit.synthesize(tmp_path, sigma_rel=0.05)
    assert rel(averaged(out, model), averaged(ph.ema_state_dict(0.05), model)) < 1e-6


def test_fp16_overflow_warns(tmp_path):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1e6)
    ph = emakit.PostHocEMA(model, snapshot_every="1ba", snapshot_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="not finite in torch.float16"):
        ph.step()


def test_start_delays_the_profiles_and_the_copy_stands_for_the_time_before(tmp_path):
    from reference import set_random_weights

    import emakit as _emakit

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ph = _emakit.PostHocEMA(model, sigma_rels=(0.05, 0.2), start="5ba", snapshot_every="2ba",
                            snapshot_dir=tmp_path / "snaps")
    gen = torch.Generator().manual_seed(7)
    thetas = {}
    for batch in range(1, 13):
        set_random_weights(model, gen)
        thetas[batch] = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
        ph.step()
        if batch < 5:  # nothing tracked yet: the average is the model, no snapshot written
            assert ph.num_updates == 0 and not (tmp_path / "snaps").exists()
            got = ph.ema_state_dict()
            assert torch.equal(got["weight"], model.weight.detach())
    T = 12
    for sigma in (0.05, 0.2):
        g = _emakit.sigma_rel_to_gamma(sigma)
        # the copy at batch 5 stands for (0, 5]; each later batch b for (b - 1, b]
        expected = (5 ** (g + 1)) / T ** (g + 1) * thetas[5]
        for b in range(6, T + 1):
            expected = expected + (b ** (g + 1) - (b - 1) ** (g + 1)) / T ** (g + 1) * thetas[b]
        sd = ph.ema_state_dict(sigma)
        got = torch.cat([sd[n].double().reshape(-1) for n, _ in model.named_parameters()])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert [p.name for p in ph.snapshots][0].startswith("phema-0000000006")
