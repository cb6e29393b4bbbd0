"""The command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import emakit
from emakit.cli import main


def test_halflife_conversions(capsys):
    assert main(["halflife", "--half-life", "1000"]) == 0
    out = capsys.readouterr().out
    assert repr(2 ** (-1 / 1000)) in out
    assert main(["halflife", "--smoothing", "0.5", "--interval", "10"]) == 0
    assert "half-life 10" in capsys.readouterr().out
    assert main(["halflife", "--sigma-rel", "0.1"]) == 0
    assert "gamma 6.93" in capsys.readouterr().out


def test_halflife_bad_input(capsys):
    assert main(["halflife", "--smoothing", "2"]) == 2
    assert "smoothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["halflife"])


def test_demo_runs_and_writes_a_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "emakit.cli", "demo", "--epochs", "2", "--no-progress",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "| epoch | raw test loss | EMA test loss" in result.stdout
    assert "final test loss: raw" in result.stdout
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # the post-hoc sweep rides on the same run
    assert "| sigma_rel | post-hoc EMA test loss | accuracy |" in result.stdout
    assert "| 0.1 | " in result.stdout and "best sigma_rel" in result.stdout
    assert (tmp_path / "posthoc.png").read_bytes().startswith(b"\x89PNG")


def test_version():
    assert emakit.__version__


def _snapshot_run(folder, steps=60, every=10):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ph = emakit.PostHocEMA(model, snapshot_every=f"{every}ba", snapshot_dir=folder)
    for _ in range(steps):
        with torch.no_grad():
            model[0].weight.add_(0.01 * torch.randn(4, 4))
        ph.step()
    return model


def test_synthesize_command(tmp_path, capsys):
    model = _snapshot_run(tmp_path / "snaps")
    out = tmp_path / "ema.safetensors"
    argv = ["synthesize", str(tmp_path / "snaps"), "--sigma-rel", "0.08", "--at", "50",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "at step 50 from 5 snapshots" in capsys.readouterr().out
    from safetensors.torch import load_file

    state = load_file(out)
    expected = emakit.synthesize(tmp_path / "snaps", sigma_rel=0.08, at=50)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    model.load_state_dict(state, strict=True)
    before = out.read_bytes()
    assert main(argv) == 2  # exists: refused, untouched
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*argv, "--sigma-rel", "0.001", "--force"]) == 2
    assert "cannot be represented" in capsys.readouterr().err
    assert main(["synthesize", str(tmp_path), "--sigma-rel", "0.1", "--out",
                 str(tmp_path / "new.safetensors")]) == 2
    assert "holds no snapshots" in capsys.readouterr().err


def test_inspect_command(tmp_path, capsys):
    _snapshot_run(tmp_path / "snaps")
    assert main(["inspect", str(tmp_path / "snaps")]) == 0
    text = capsys.readouterr().out
    assert "6 post-hoc EMA snapshots, steps 10 to 60" in text
    assert "sigma_rel 0.05 (gamma 16.97), 0.1 (gamma 6.937); stored as float16" in text
    assert "supported sigma_rel at step 60" in text
    ckpt = tmp_path / "ema.pt"
    torch.save({"average": {"w": torch.ones(2, 3)}, "step": 3}, ckpt)
    assert main(["inspect", str(ckpt)]) == 0
    assert "average.w: float32 [2, 3]" in capsys.readouterr().out
