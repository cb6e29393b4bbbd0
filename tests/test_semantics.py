"""The average after a sequence of steps equals the float64 closed form, for every way of
setting the clock: smoothing, half-life, intervals, start, epochs, mixed units, dur, warmup,
schedules. Weights are set to random values at each step, so every step's weights matter."""

from __future__ import annotations

import math

import pytest
import torch
from reference import closed_form, flat_params, flat_state, set_random_weights
from torch import nn

import emakit


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def _drive(ema, model, n_batches, batches_per_epoch=None, due=None, start_step=None):
    """Run n_batches steps (epoch_end after each batches_per_epoch) and build the reference.

    ``due(batch, epoch, event)`` says whether an event ('ba' after step, 'ep' after epoch_end)
    is an update; ``start_step(batch, epoch, event)`` whether it is the start.
    """
    gen = torch.Generator().manual_seed(1)
    init, updates, started = None, [], False
    k = 0
    epoch = 0
    for batch in range(1, n_batches + 1):
        set_random_weights(model, gen)
        events = [("ba", batch, epoch)]
        ema.step()
        if batches_per_epoch and batch % batches_per_epoch == 0:
            epoch += 1
            ema.epoch_end()
            events.append(("ep", batch, epoch))
        for event, b, e in events:
            if not started:
                if start_step(b, e, event):
                    started, init = True, flat_params(model)
            elif due(b, e, event):
                k += 1
                updates.append((k, flat_params(model)))
    return init, updates


def _check(ema, model, init, updates, smoothing_of_k):
    """``smoothing_of_k(i)``: the smoothing of the i-th averaging update (i = 1, 2, ...)."""
    assert init is not None
    expected = closed_form(init, [(smoothing_of_k(k), theta) for k, theta in updates])
    got = flat_state(ema.ema_state_dict(), model)
    assert ema.num_updates == len(updates) + 1  # the start copy is update 1
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_fixed_smoothing():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.9)
    init, updates = _drive(
        ema, model, 30, due=lambda b, e, ev: ev == "ba", start_step=lambda b, e, ev: ev == "ba"
    )
    _check(ema, model, init, updates, lambda k: 0.9)


@pytest.mark.parametrize("interval", [1, 10])
def test_half_life_with_interval(interval):
    model = _model()
    ema = emakit.EMA(model, half_life="20ba", update_interval=f"{interval}ba")
    init, updates = _drive(
        ema, model, 60,
        due=lambda b, e, ev: ev == "ba" and b % interval == 0,
        start_step=lambda b, e, ev: ev == "ba",
    )
    assert len(updates) == 59 if interval == 1 else len(updates) == 6
    # the start (batch 1) is k = 1, so the update at batch 10 covers 9 batches, later ones 10
    first = 2.0 ** (-(interval - 1) / 20) if interval > 1 else 2.0 ** (-1 / 20)
    _check(ema, model, init, updates,
           lambda i: first if i == 1 else 2.0 ** (-interval / 20))


def test_start_after_zero():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.8, start="7ba", update_interval="2ba")
    init, updates = _drive(
        ema, model, 25,
        due=lambda b, e, ev: ev == "ba" and b % 2 == 0,
        start_step=lambda b, e, ev: ev == "ba" and b >= 7,
    )
    # 0.8 per update of 2 batches is 0.8 ** 0.5 per batch; the start (batch 7) is k = 1, so
    # the update at batch 8 covers one batch, later ones two
    _check(ema, model, init, updates, lambda i: 0.8**0.5 if i == 1 else 0.8)


def test_before_start_the_average_follows_the_model():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.5, start="100ba")
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        set_random_weights(model, gen)
        ema.step()
        assert not ema.started
        for name, value in ema.ema_state_dict().items():
            assert torch.equal(value, model.state_dict()[name])


def test_epochs_with_epoch_end():
    model = _model()
    ema = emakit.EMA(model, half_life="2ep")
    init, updates = _drive(
        ema, model, 24, batches_per_epoch=3,
        due=lambda b, e, ev: ev == "ep",
        start_step=lambda b, e, ev: ev == "ep",
    )
    assert len(updates) == 7
    _check(ema, model, init, updates, lambda k: 2.0 ** (-1 / 2))


def test_mixed_units_with_batches_per_epoch():
    model = _model()
    ema = emakit.EMA(model, half_life="1ep", update_interval="5ba", batches_per_epoch=10,
                     start="1ep")
    init, updates = _drive(
        ema, model, 40, batches_per_epoch=10,
        due=lambda b, e, ev: ev == "ba" and b % 5 == 0,
        start_step=lambda b, e, ev: ev == "ba" and e >= 1,
    )
    # the start at batch 11 (the first 'ba' event with an epoch done) is k = 1: the update at
    # batch 15 covers 4 batches, later ones 5
    _check(ema, model, init, updates, lambda i: 2.0 ** (-(4 if i == 1 else 5) / 10))


def test_dur_with_total():
    model = _model()
    ema = emakit.EMA(model, half_life="0.1dur", start="0.2dur", total="50ba")
    init, updates = _drive(
        ema, model, 50,
        due=lambda b, e, ev: ev == "ba",
        start_step=lambda b, e, ev: ev == "ba" and b >= 10,
    )
    _check(ema, model, init, updates, lambda k: 2.0 ** (-1 / 5))


def test_power_warmup():
    model = _model()
    warmup = emakit.PowerWarmup(inv_gamma=2.0, power=0.75, min_smoothing=0.1)
    ema = emakit.EMA(model, smoothing=0.95, warmup=warmup)
    init, updates = _drive(
        ema, model, 40, due=lambda b, e, ev: ev == "ba", start_step=lambda b, e, ev: ev == "ba"
    )

    def expected(i):  # the i-th averaging update is at training time k = i + 1
        k = i + 1
        return min(max(1 - (1 + (k - 1) / 2.0) ** -0.75, 0.1), 0.95)

    _check(ema, model, init, updates, expected)


def test_smoothing_schedule_callable():
    model = _model()
    ema = emakit.EMA(model, smoothing=lambda k: 1 - 1 / (k + 1))
    init, updates = _drive(
        ema, model, 15, due=lambda b, e, ev: ev == "ba", start_step=lambda b, e, ev: ev == "ba"
    )
    # a schedule is called with the update's number: the start copy is 1, so i-th -> i + 1
    _check(ema, model, init, updates, lambda i: 1 - 1 / (i + 2))


def test_cosine_smoothing_gives_dinos_schedule():
    # DINO's utils.cosine_scheduler: final + 0.5 (base - final) (1 + cos(pi * i / n))
    base, final, n = 0.996, 1.0, 37
    dino = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]
    schedule = emakit.CosineSmoothing(start=base, end=final, total=n)
    # the first averaging update is update 2, DINO's iteration 0
    ours = [schedule(k) for k in range(2, n + 2)]
    assert ours == pytest.approx(dino, abs=1e-15)
    assert schedule(n + 50) == final
    model = _model()
    ema = emakit.EMA(model, smoothing=schedule)
    init, updates = _drive(
        ema, model, 12, due=lambda b, e, ev: ev == "ba", start_step=lambda b, e, ev: ev == "ba"
    )
    _check(ema, model, init, updates, lambda i: dino[i - 1])


def test_update_now_and_smoothing_property():
    model = _model()
    ema = emakit.EMA(model, smoothing=0.7, warmup=emakit.PowerWarmup())
    # before the start: the first averaging update's factor, training time k = 2
    assert ema.smoothing == pytest.approx(min(0.7, 1.0 - 2.0 ** (-2.0 / 3.0)), abs=1e-15)
    ema.update()  # before the start: sets the average
    assert ema.started and ema.num_updates == 1
    gen = torch.Generator().manual_seed(0)
    init = flat_params(model)
    set_random_weights(model, gen)
    theta = flat_params(model)
    s = ema.smoothing
    ema.update()
    assert ema.num_updates == 2
    torch.testing.assert_close(
        flat_state(ema.ema_state_dict(), model), closed_form(init, [(s, theta)])
    )


def test_matches_torch_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = _model()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.93))
    ema = emakit.EMA(model, smoothing=0.93)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(25):
        opt.zero_grad()
        model(torch.randn(8, 5)).square().mean().backward()
        opt.step()
        ema.step()
        peer.update_parameters(model)
    ours = ema.ema_state_dict()
    for name, p in peer.module.named_parameters():
        torch.testing.assert_close(ours[name], p.detach(), rtol=1e-6, atol=1e-7)


def test_update_interval_and_half_life_keep_the_horizon():
    s1 = emakit.smoothing_from_half_life(100, 1)
    s10 = emakit.smoothing_from_half_life(100, 10)
    assert s1**10 == pytest.approx(s10, rel=1e-12)
    assert s1**100 == pytest.approx(0.5, rel=1e-12)
