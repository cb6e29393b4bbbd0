"""BEMA against a float64 implementation of its formulas, step by step."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from reference import set_random_weights
from torch import nn

import emakit


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


class Reference:
    """BEMA in float64, written from the paper's formulas (t = batches since the start)."""

    def __init__(self, ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, min_beta=0.0):
        self.p_e, self.p_b, self.lag, self.m, self.min_beta = (
            ema_power, bias_power, lag, multiplier, min_beta)

    def start(self, theta: torch.Tensor) -> None:
        self.theta0, self.ema, self.out = theta.clone(), theta.clone(), theta.clone()

    def update(self, t: int, theta: torch.Tensor) -> None:
        base = self.lag + self.m * t
        beta = max(base ** -self.p_e, self.min_beta)
        self.ema = (1 - beta) * self.ema + beta * theta
        self.out = self.ema + base ** -self.p_b * (theta - self.theta0)


def _handed_out(bema: emakit.BEMA, model: nn.Module) -> torch.Tensor:
    weights = bema.state_dict()["bema_weights"]  # storage dtype, before the cast to the model's
    return torch.cat([weights[n].double().reshape(-1) for n, _ in model.named_parameters()])


@pytest.mark.parametrize("interval", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bema_matches_float64_formulas(interval, dtype):
    model = _model(dtype)
    kwargs = dict(ema_power=0.5, bias_power=0.2, lag=10.0, multiplier=1.0, min_ema_multiplier=0.0)
    bema = emakit.BEMA(model, update_interval=f"{interval}ba", **kwargs)
    ref = Reference()
    gen = torch.Generator().manual_seed(1)
    tol = dict(rtol=1e-5, atol=1e-6)
    for batch in range(1, 26):
        set_random_weights(model, gen)
        bema.step()
        theta = _flat(model)  # the model's weights as it holds them (bf16 values, exactly)
        if batch == 1:
            ref.start(theta)
        elif batch % interval == 0:
            ref.update(batch - 1, theta)
        torch.testing.assert_close(_handed_out(bema, model), ref.out, **tol,
                                   msg=f"batch {batch}")
    out = torch.cat([bema.ema_state_dict()[n].double().reshape(-1)
                     for n, _ in model.named_parameters()])
    torch.testing.assert_close(out, ref.out.to(dtype).double(), rtol=1e-2, atol=1e-2)
    with bema.swapped():  # the swap hands out the same weights
        torch.testing.assert_close(_flat(model), ref.out.to(dtype).double(), rtol=1e-2,
                                   atol=1e-2)


def test_min_ema_multiplier_and_multiplier():
    model = _model()
    bema = emakit.BEMA(model, ema_power=0.9, bias_power=0.5, lag=2.0, multiplier=3.0,
                       min_ema_multiplier=0.2)
    ref = Reference(0.9, 0.5, 2.0, 3.0, 0.2)
    gen = torch.Generator().manual_seed(2)
    for batch in range(1, 15):
        set_random_weights(model, gen)
        bema.step()
        if batch == 1:
            ref.start(_flat(model))
        else:
            ref.update(batch - 1, _flat(model))
    torch.testing.assert_close(_handed_out(bema, model), ref.out, rtol=1e-5, atol=1e-6)


def test_bema_arguments_are_checked():
    with pytest.raises(ValueError, match="lag: expected a finite number > 0"):
        emakit.BEMA(_model(), lag=0.0)
    with pytest.raises(TypeError, match="half_life"):  # BEMA's schedule sets the smoothing
        emakit.BEMA(_model(), half_life="10ba")
    with pytest.raises(ValueError, match="min_ema_multiplier"):
        emakit.BEMA(_model(), min_ema_multiplier=1.5)


_RUN = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from torch import nn
    from reference import set_random_weights
    import emakit
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    bema = emakit.BEMA(model, update_interval="2ba", lag=5.0)
    gen = torch.Generator().manual_seed(3)
    mode = sys.argv[1]
    if mode == "resume":
        saved = torch.load(sys.argv[2], weights_only=True)
        model.load_state_dict(saved["model"])
        bema.load_state_dict(saved["bema"])
        gen.set_state(saved["gen"])
    for batch in range(bema.counts["ba"] + 1, 21):
        set_random_weights(model, gen)
        bema.step()
        if mode == "first" and batch == 9:
            torch.save({{"model": model.state_dict(), "bema": bema.state_dict(),
                        "gen": gen.get_state()}}, sys.argv[2])
            break
    torch.save(bema.ema_state_dict(), sys.argv[3])
""")


def test_bema_resumes_exactly_in_a_new_process(tmp_path):
    import os

    script = tmp_path / "run.py"
    script.write_text(_RUN.format(tests=os.path.dirname(__file__)))
    ckpt, a, b = tmp_path / "ckpt.pt", tmp_path / "straight.pt", tmp_path / "resumed.pt"

    def run(*args):
        subprocess.run([sys.executable, str(script), *map(str, args)], check=True)

    run("straight", ckpt, a)
    run("first", ckpt, tmp_path / "unused.pt")
    run("resume", ckpt, b)
    straight, resumed = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for name, t in straight.items():
        assert torch.equal(resumed[name], t), name


def test_buffers_are_handed_out_as_their_plain_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    bema = emakit.BEMA(model, lag=1.0, bias_power=0.0)  # alpha = 1: the full correction
    running = []
    for step in range(1, 8):
        model(torch.randn(16, 3) * step)  # train-mode forward: running statistics move
        bema.step()
        running.append(model[1].running_var.detach().double().clone())
    ref = Reference(ema_power=0.5, bias_power=0.0, lag=1.0)
    ref.start(running[0])
    for t, v in enumerate(running[1:], start=1):
        ref.update(t, v)
    # the buffer gets the plain EMA, not EMA + (theta_t - theta_0), which can go negative
    torch.testing.assert_close(bema.state_dict()["bema_weights"]["1.running_var"].double(),
                               ref.ema, rtol=1e-6, atol=1e-7)
    assert (bema.ema_state_dict()["1.running_var"] > 0).all()
