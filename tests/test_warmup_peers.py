"""Warmup in training time against the installed peers, step by step.

timm's ModelEmaV3 is driven as timm's train.py drives it (``update(model, step=num_updates)``
after each optimizer step, ``num_updates`` counting from 1) and diffusers' EMAModel as its
training scripts do (``step(parameters)`` after each optimizer step); emakit's
``PowerWarmup`` must give the same average after every step. The simple-average case
(``inv_gamma=1, power=1``) is checked against the running mean in float64.
"""

from __future__ import annotations

import pytest
import torch
from reference import set_random_weights
from test_migrating import timm_model_ema
from torch import nn

import emakit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


CASES = [  # (inv_gamma, power, min_smoothing, max smoothing)
    (1.0, 2 / 3, 0.0, 0.999),
    (1.0, 3 / 4, 0.0, 0.999),
    (10.0, 2 / 3, 0.0, 0.99),
    (10.0, 3 / 4, 0.3, 0.999),
    (1.0, 3 / 4, 0.5, 0.9),
]


def _params(sd: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    return torch.cat([sd[n].double().reshape(-1) for n, _ in model.named_parameters()])


@pytest.mark.parametrize(("inv_gamma", "power", "min_s", "max_s"), CASES)
def test_power_warmup_matches_timm_model_ema_v3(inv_gamma, power, min_s, max_s):
    model = _model()
    peer = timm_model_ema().ModelEmaV3(
        model, decay=max_s, min_decay=min_s, use_warmup=True, warmup_gamma=inv_gamma,
        warmup_power=power, foreach=True,
    )
    ema = emakit.EMA(model, smoothing=max_s,
                     warmup=emakit.PowerWarmup(inv_gamma=inv_gamma, power=power,
                                               min_smoothing=min_s))
    gen = torch.Generator().manual_seed(1)
    for num_updates in range(1, 31):
        set_random_weights(model, gen)
        peer.update(model, step=num_updates)
        ema.step()
        torch.testing.assert_close(
            _params(ema.ema_state_dict(), model), _params(peer.module.state_dict(), model),
            rtol=2e-6, atol=2e-7, msg=f"after step {num_updates}",
        )
    assert ema.num_updates == 30  # the start copy counts, as timm's step 1 (decay 0) does


@pytest.mark.parametrize(("inv_gamma", "power", "min_s", "max_s"), CASES)
def test_power_warmup_matches_diffusers_ema_model(inv_gamma, power, min_s, max_s):
    training_utils = pytest.importorskip("diffusers.training_utils")
    model = _model()
    peer = training_utils.EMAModel(
        model.parameters(), decay=max_s, min_decay=min_s, use_ema_warmup=True,
        inv_gamma=inv_gamma, power=power,
    )
    ema = emakit.EMA(model, smoothing=max_s,
                     warmup=emakit.PowerWarmup(inv_gamma=inv_gamma, power=power,
                                               min_smoothing=min_s))
    gen = torch.Generator().manual_seed(2)
    for step in range(1, 31):
        set_random_weights(model, gen)
        peer.step(model.parameters())
        ema.step()
        theirs = torch.cat([p.double().reshape(-1) for p in peer.shadow_params])
        torch.testing.assert_close(_params(ema.ema_state_dict(), model), theirs,
                                   rtol=2e-6, atol=2e-7, msg=f"after step {step}")
        # the smoothing diffusers used for this step is emakit's for the same batch
        assert ema.num_updates == step


def test_simple_average_is_the_running_mean():
    model = nn.Linear(1, 1, bias=False)
    ema = emakit.EMA(model, smoothing=1.0, warmup=emakit.PowerWarmup(inv_gamma=1, power=1))
    values = [1.0, 2.0, 3.0, 10.0, -4.0, 0.5, 7.25]
    for i, v in enumerate(values, start=1):
        with torch.no_grad():
            model.weight.fill_(v)
        ema.step()
        mean = sum(values[:i]) / i  # float64
        assert float(ema.ema_state_dict()["weight"]) == pytest.approx(mean, rel=1e-6)
    assert ema.num_updates == len(values)


def _final(interval: int, warmup: emakit.PowerWarmup | None) -> torch.Tensor:
    model = nn.Linear(8, 8)
    ema = emakit.EMA(model, half_life="40ba", update_interval=f"{interval}ba", warmup=warmup)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        drift = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    for step in range(1, 301):
        with torch.no_grad():  # a slow drift with noise, as training gives
            model.weight.copy_(drift * step / 300 + 0.05 * torch.randn(8, 8, generator=gen))
        ema.step()
    return ema.ema_state_dict()["weight"].double()


def test_interval_changes_the_average_no_more_with_warmup_than_without():
    warmup = emakit.PowerWarmup(inv_gamma=1.0, power=3 / 4)
    plain = (_final(10, None) - _final(1, None)).norm() / _final(1, None).norm()
    warm = (_final(10, warmup) - _final(1, warmup)).norm() / _final(1, warmup).norm()
    # warmup counts batches, so a coarser interval keeps the same horizon
    assert warm <= plain * 1.05 + 1e-6, (float(warm), float(plain))
