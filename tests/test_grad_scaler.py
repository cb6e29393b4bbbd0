"""Steps a GradScaler skipped leave the average unchanged, decided on the device."""

from __future__ import annotations

import pytest
import torch
from reference import closed_form, flat_params, flat_state
from torch import nn

import emakit

BAD = {3, 4, 9}  # steps whose loss is made Inf: the scaler skips their optimizer step


def _run(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=3)
    ema = emakit.EMA(model, smoothing=0.8, grad_scaler=scaler)
    init, updates = None, []
    for step in range(1, 13):
        x = torch.randn(16, 6, device=device)
        loss = model(x).square().mean()
        if step in BAD:
            loss = loss * float("inf")
        opt.zero_grad()
        scaler.scale(loss).backward()
        before = flat_params(model)
        scaler.step(opt)
        scaler.update()
        ema.step()
        after = flat_params(model)
        if step in BAD:
            assert torch.equal(before, after)  # the optimizer step was skipped
        if step == 1:
            init = after
        elif step not in BAD:
            updates.append((0.8, after))
    return ema, model, init, updates


def test_skipped_steps_leave_the_average_unchanged_cpu():
    ema, model, init, updates = _run("cpu")
    torch.testing.assert_close(flat_state(ema.ema_state_dict(), model),
                               closed_form(init, updates), rtol=1e-6, atol=1e-7)
    assert ema.skipped_updates == len(BAD)
    assert ema.num_updates == 12  # every step counts; skipped_updates says which did nothing


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_skipped_steps_without_a_host_sync_cuda():
    ema, model, init, updates = _run("cuda")
    torch.testing.assert_close(flat_state(ema.ema_state_dict(), model),
                               closed_form(init, updates), rtol=1e-6, atol=1e-7)
    assert ema.skipped_updates == len(BAD)
    # and an update's step() itself asks nothing of the host
    x = torch.randn(16, 6, device="cuda")
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_grad_scaler_argument_is_checked():
    with pytest.raises(TypeError, match="grad_scaler: expected a torch.amp.GradScaler"):
        emakit.EMA(nn.Linear(2, 2), grad_scaler=object())
