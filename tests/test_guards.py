"""Arguments checked without a model, loads that are all or nothing, swaps that cannot be
mixed up, non-finite starts, reset and switch-back: each case against float64 or the
documented error."""

from __future__ import annotations

import pytest
import torch
from reference import closed_form, flat_params, flat_state, set_random_weights
from torch import nn

import emakit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


# arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["skip_nonfinite", "side_stream", "shard", "compensated"])
@pytest.mark.parametrize("value", ["no", "yes", 1, None])
def test_flags_must_be_bool(name, value):
    with pytest.raises(TypeError, match=f"{name}: expected True or False"):
        emakit.EMA(_model(), **{name: value})


@pytest.mark.parametrize("device", ["bogus", "cuda:notanumber", 1.5, True])
def test_bad_device_names_the_argument(device):
    with pytest.raises((TypeError, ValueError), match="device"):
        emakit.EMA(_model(), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0])
def test_cuda_device_without_cuda_names_the_argument(device):
    with pytest.raises(ValueError, match="device: .* not available"):
        emakit.EMA(_model(), device=device)


def test_lazy_parameters_are_refused_naming_the_tensor():
    model = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"model: 0\.weight is not initialized"):
        emakit.EMA(model)


def test_zero_total_blames_total():
    with pytest.raises(ValueError, match="total: expected a training length > 0"):
        emakit.EMA(_model(), half_life="0.1dur", total="0ba")


def test_integral_interval_written_with_an_exponent_is_accepted():
    ema = emakit.EMA(_model(), update_interval="1e20ba")
    assert ema.update_interval.value == 10**20 and isinstance(ema.update_interval.value, int)


def test_config_object_or_keywords_not_both():
    config = emakit.EMAConfig(half_life="10ba")
    ema = emakit.EMA(_model(), config)
    assert str(ema.half_life) == "10ba"
    with pytest.raises(TypeError, match="not both"):
        emakit.EMA(_model(), config, half_life="5ba")


# swaps ----------------------------------------------------------------------------------


def test_step_inside_swapped_is_refused_before_the_clock_moves():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.5)
    ema.step()
    with ema.swapped():
        for call in (ema.step, ema.update, ema.epoch_end, ema.reset):
            with pytest.raises(RuntimeError, match="swapped"):
                call()
    assert ema.counts["ba"] == 1 and ema.counts["ep"] == 0
    assert ema.num_updates == 1


def test_two_emas_on_one_model_cannot_mix_their_swaps():
    model = _model()
    a, b = emakit.EMA(model, smoothing=0.5), emakit.EMA(model, smoothing=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        set_random_weights(model, gen)
        a.step()
        b.step()
    training = flat_params(model)
    b_before = flat_state(b.ema_state_dict(), model)
    with a.swapped():
        with pytest.raises(RuntimeError, match="another EMA"):
            b.step()
        with pytest.raises(RuntimeError, match="another EMA"), b.swapped():
            pass
        # b does not average a's average
        torch.testing.assert_close(flat_state(b.ema_state_dict(), model), b_before)
    assert torch.equal(flat_params(model), training)
    assert b.counts["ba"] == 3


# atomic loads ---------------------------------------------------------------------------


def test_load_with_a_bad_clock_changes_nothing():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        set_random_weights(model, gen)
        ema.step()
    other = emakit.EMA(_model(), smoothing=0.5)
    other.step()
    before = {n: t.clone() for n, t in other.state_dict()["average"].items()}
    state = ema.state_dict()
    state["clock"] = {"ba": 3, "ep": -1, "sp": 0, "tok": 0}
    with pytest.raises(ValueError, match=r"state\['clock'\]\['ep'\]"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert other.counts["ba"] == 1 and other.num_updates == 1
    for n, t in before.items():
        assert torch.equal(after["average"][n], t)


def test_load_with_a_bad_tensor_changes_nothing():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.5)
    ema.step()
    state = ema.state_dict()
    state["average"]["2.weight"] = torch.zeros(5, 5)
    target = emakit.EMA(_model(), smoothing=0.5)
    before = {n: t.clone() for n, t in target.state_dict()["average"].items()}
    with pytest.raises(ValueError, match=r"2\.weight: expected \(2, 3\), got \(5, 5\)"):
        target.load_state_dict(state)
    assert not target.started and target.counts["ba"] == 0
    for n, t in before.items():
        assert torch.equal(target.state_dict()["average"][n], t)


def test_version_1_state_still_loads():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.5)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        set_random_weights(model, gen)
        ema.step()
    state = ema.state_dict()
    old = {k: v for k, v in state.items() if k not in ("origin", "k")}
    old["version"], old["num_updates"] = 1, state["num_updates"] - 1  # 0.1 did not count the copy
    again = emakit.EMA(model, smoothing=0.5)
    again.load_state_dict(old)
    assert again.num_updates == ema.num_updates and again.started
    set_random_weights(model, gen)
    ema.step()
    again.step()
    for n, t in ema.ema_state_dict().items():
        assert torch.equal(again.ema_state_dict()[n], t)


# non-finite starts ----------------------------------------------------------------------


def test_nan_at_the_start_waits_for_a_finite_model():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.6, skip_nonfinite=True)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="does not start"):
        ema.step()
    assert not ema.started
    ema.step()  # still NaN: no second warning, still not started
    assert not ema.started
    gen = torch.Generator().manual_seed(3)
    set_random_weights(model, gen)
    ema.step()
    init = flat_params(model)
    assert ema.started and ema.num_updates == 1
    set_random_weights(model, gen)
    theta = flat_params(model)
    ema.step()
    torch.testing.assert_close(flat_state(ema.ema_state_dict(), model),
                               closed_form(init, [(0.6, theta)]))


# reset and switch-back ------------------------------------------------------------------


def test_reset_takes_the_model_now_and_restarts_warmup():
    model = _model()
    warmup = emakit.PowerWarmup(inv_gamma=1.0, power=1.0)
    ema = emakit.EMA(model, smoothing=0.99, warmup=warmup)
    gen = torch.Generator().manual_seed(4)
    for _ in range(6):
        set_random_weights(model, gen)
        ema.step()
    ema.reset()
    init = flat_params(model)
    torch.testing.assert_close(flat_state(ema.ema_state_dict(), model), init)
    updates = []
    for k in range(2, 6):  # warmup restarted: k = 2, 3, ... after the reset
        set_random_weights(model, gen)
        ema.step()
        updates.append((1 - 1 / k, flat_params(model)))
    assert ema.counts["ba"] == 10  # the clock ran on
    torch.testing.assert_close(flat_state(ema.ema_state_dict(), model),
                               closed_form(init, updates))


def test_switch_every_writes_the_average_into_the_model():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.7, switch_every="3ba")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(1, 10):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        before = flat_params(model)
        ema.step()
        averaged = flat_state(ema.ema_state_dict(), model)
        if step % 3 == 0:
            assert torch.equal(flat_params(model), averaged)
        else:
            assert torch.equal(flat_params(model), before)
    assert all(s["momentum_buffer"] is not None for s in opt.state.values())


def test_nan_in_a_copied_buffer_skips_the_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = emakit.EMA(model, smoothing=0.5, buffers="copy", skip_nonfinite=True)
    model(torch.randn(8, 3))
    ema.step()
    kept = {n: t.clone() for n, t in ema.state_dict()["average"].items()}
    model(torch.randn(8, 3))
    with torch.no_grad():
        model[1].running_mean[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped an EMA update"):
        ema.step()
    assert ema.skipped_updates == 1
    after = ema.state_dict()["average"]
    for n, t in kept.items():  # neither the averaged weights nor the copied buffer moved
        assert torch.equal(after[n], t), n
