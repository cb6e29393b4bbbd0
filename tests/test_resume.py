"""Resume: 2N steps straight through equal N steps, save, a new process that loads with
weights_only=True and runs N more, bitwise."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys, torch, emakit
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = emakit.EMA(model, half_life="5ba", update_interval="2ba", start="3ba",
                     warmup=emakit.PowerWarmup())
    mode, path, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode == "resume":
        ckpt = torch.load(path, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        ema.load_state_dict(ckpt["ema"])
    for step in range(first, last):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(8, 6, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        ema.step()
        if step % 5 == 4:
            ema.epoch_end()
    out = {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
           "export": ema.ema_state_dict()}
    torch.save(out, path if mode != "resume" else path + ".final")
    """
)


def _run(tmp_path, *args):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, str(script), *map(str, args)], check=True, timeout=120)


@pytest.mark.parametrize("n", [7])
def test_resume_in_a_new_process_is_bitwise(tmp_path, n):
    straight = tmp_path / "straight.pt"
    half = tmp_path / "half.pt"
    _run(tmp_path, "fresh", straight, 0, 2 * n)
    _run(tmp_path, "fresh", half, 0, n)
    _run(tmp_path, "resume", half, n, 2 * n)
    a = torch.load(straight, weights_only=True)
    b = torch.load(str(half) + ".final", weights_only=True)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] > 0
    assert a["ema"]["clock"] == b["ema"]["clock"]
    for name, t in a["ema"]["average"].items():
        assert torch.equal(t, b["ema"]["average"][name]), name
    for name, t in a["export"].items():
        assert torch.equal(t, b["export"][name]), name
