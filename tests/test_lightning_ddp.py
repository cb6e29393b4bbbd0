"""EMACallback under Lightning's "ddp" strategy on 2 CPU processes (gloo), against 1 process
on the same global batches."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "lightning_ddp.py"


def run(out: Path, devices: int) -> None:
    out.mkdir()
    # CPU ranks (gloo), also on a GPU machine
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def run_here(out: Path) -> None:
    """One process, in this one (saves an interpreter start)."""
    out.mkdir()
    spec = importlib.util.spec_from_file_location("lightning_ddp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(str(out), 1)


def test_two_process_ddp_matches_one_process(tmp_path):
    run_here(tmp_path / "one")
    run(tmp_path / "two", 2)
    one = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    r0 = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "two" / "rank1.pt", weights_only=True)
    assert one["world_size"] == 1 and r0["world_size"] == r1["world_size"] == 2
    # 64 samples / global batch 8 = 8 steps per epoch, 2 epochs; start at step 2.
    for r in (one, r0, r1):
        assert r["ema"]["clock"]["ba"] == 16 and r["ema"]["num_updates"] == 15
        # start="16sp": the samples of both ranks are counted, so it starts at step 2 too
        assert r["ema_samples"]["clock"]["sp"] == 128
        for name, t in r["ema"]["average"].items():
            assert torch.equal(r["ema_samples"]["average"][name], t), name
    for name, t in r0["ema"]["average"].items():
        assert torch.equal(t, r1["ema"]["average"][name]), name  # ranks agree bitwise
        torch.testing.assert_close(t, one["ema"]["average"][name], rtol=1e-5, atol=1e-6)
    for name, t in r0["model"].items():
        torch.testing.assert_close(t, one["model"][name], rtol=1e-5, atol=1e-6)
    # The average moved away from the weights, so the comparison above is not trivial.
    w = r0["ema"]["average"]["net.0.weight"]
    assert (w - r0["model"]["net.0.weight"]).abs().max() > 1e-3
    assert r0["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
