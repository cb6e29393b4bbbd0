"""EMACallback under Lightning's FSDPStrategy (FSDP1) and ModelParallelStrategy (FSDP2), 2 CPU
processes (gloo), one launch of tests/scripts/lightning_fsdp.py for both.

The reference is the float64 EMA, computed here, of the full training weights the script read
after every step through torch's own ``get_model_state_dict``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import assert_close, replay
from torch import nn

import emakit
from emakit.integrations.lightning import TRAINING_WEIGHTS_KEY

pytestmark = [pytest.mark.multiprocess]

SCRIPT = Path(__file__).parent / "scripts" / "lightning_fsdp.py"
spec = importlib.util.spec_from_file_location("lightning_fsdp", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

SMOOTHING = 2 ** (-1 / 3)  # half_life="3ba", start="2ba": the copy at step 2


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lightning_fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, {name: torch.load(out / f"{name}.pt", weights_only=True)
                 for name in ("fsdp1", "fsdp2")}


def plain_net(state: dict[str, torch.Tensor]) -> nn.Module:
    net = script.Net()
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval()


def val_loss(state: dict[str, torch.Tensor]) -> float:
    (x, y), = list(script.data(1, 0)[1])  # the 8 validation samples, one batch
    with torch.no_grad():
        return nn.functional.mse_loss(plain_net(state).net(x), y).item()


@pytest.mark.parametrize("name", ["fsdp1", "fsdp2"])
def test_average_evaluation_logging_and_resume(results, name: str) -> None:
    r = results[1][name]
    weights = r["weights"]
    assert len(weights) == 8 and r["counts"] == {"ba": 8, "ep": 2, "sp": 0, "tok": 0}
    # FSDP1: the average is of the root FSDPStrategy wraps the LightningModule in
    assert r["wrapper"] == ("FullyShardedDataParallel" if name == "fsdp1" else "Net")
    names = set(weights[0])
    assert_close(r["average"], replay(weights[1:], names, SMOOTHING))
    # validation after each epoch ran on the average, and saw the logged statistics
    for (updates, loss, smoothing), step in zip(r["val"], (4, 8), strict=True):
        assert updates == step - 1 and smoothing == pytest.approx(SMOOTHING)
        want = replay(weights[1:step], names, SMOOTHING)
        assert loss == pytest.approx(val_loss(want), rel=1e-5)
        assert loss != pytest.approx(val_loss(weights[step - 1]), rel=1e-3)
    # resumed from the end of epoch 1: the same average, bitwise, trained on from the
    # training weights (not from the average)
    assert r["resumed_equal"] and r["resumed_counts"] == r["counts"]
    for k, v in r["resumed_weights"][-1].items():
        assert torch.equal(v, weights[-1][k]), k
    if name == "fsdp1":
        assert r["posthoc_resumed_equal"]


def test_fsdp2_full_checkpoint_holds_the_average(results) -> None:
    """ModelParallelStrategy(save_distributed_checkpoint=False) writes full weights, so
    save_ema_weights=True (the default) puts the average there."""
    out, r = results[0], results[1]["fsdp2"]
    path = out / "fsdp2" / "epoch=0.ckpt"
    ckpt = torch.load(path, weights_only=True)
    weights = r["weights"]
    assert_close(ckpt["state_dict"], replay(weights[1:4], set(weights[0]), SMOOTHING))
    for k, v in weights[3].items():
        assert torch.equal(ckpt[TRAINING_WEIGHTS_KEY][k], v), k
    loaded = script.Net.load_from_checkpoint(path)  # what users deploy: the average
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"][k]), k


def test_fsdp1_posthoc_snapshots(results) -> None:
    """The PostHocEMA driven under FSDP1 wrote snapshots (rank 0, gathered) that synthesize
    as those of a one-process PostHocEMA fed the same weights."""
    out, r = results[0], results[1]["fsdp1"]
    model = script.Net()
    ph = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                           snapshot_dir=out / "one", snapshot_dtype=None)
    for w in r["weights"]:
        model.load_state_dict(w)
        ph.step()
    for sigma in (0.05, 0.08):
        assert_close(emakit.synthesize(out / "phema", sigma_rel=sigma),
                     emakit.synthesize(out / "one", sigma_rel=sigma))
