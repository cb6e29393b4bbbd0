"""``emakit.integrations.accelerate.register`` under Accelerate's FSDP2 and FSDP1 on 2 CPU
processes (gloo), with gradient accumulation, ``save_state`` and ``load_state``: one launch of
tests/scripts/accelerate_fsdp.py (its docstring says what the CPU needs, and why).

The reference is the float64 EMA, computed here, of the full training weights the script
read after every optimizer step through torch's ``get_model_state_dict``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from multiproc import assert_close, launch, replay

from emakit.checkpoint import read_state

pytestmark = [pytest.mark.multiprocess]

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_fsdp.py"
SMOOTHING = 2 ** (-1 / 3)  # half_life="3ba", start="2ba"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("accelerate_fsdp")
    launch(SCRIPT, "all", out, 2, timeout=300, env={"CUDA_VISIBLE_DEVICES": ""},
           result="fsdp2")
    return out


@pytest.mark.parametrize("name", ["fsdp2", "fsdp1"])
def test_register_under_fsdp(out: Path, name: str) -> None:
    r = torch.load(out / f"{name}.pt", weights_only=True)
    weights = r["weights"]
    names = set(weights[0])
    # 16 micro-batches, 2 accumulated: 8 optimizer steps, the average stepped at each
    assert len(weights) == 8 and r["steps"] == 8
    assert r["wrapper"] == ("FSDPSequential" if name == "fsdp2" else "FullyShardedDataParallel")
    want = replay(weights[1:], names, SMOOTHING)
    assert_close(r["average"], want)
    # swapped(): the forward of the sharded model computes with the average
    net = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 10),
                              torch.nn.Tanh(), torch.nn.Linear(10, 3))
    net.load_state_dict({k: v.float() for k, v in want.items()})
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    assert (r["swapped_out"] - net(x)).abs().max() < 1e-5
    # save_state at step 4 wrote the safe state file, with full tensors
    saved = read_state(out / name / "emakit_ema.safetensors")
    assert saved["extra"] == {"steps": 4}
    assert_close(saved["ema"]["average"], replay(weights[1:4], names, SMOOTHING))
    # load_state restored the average and its step count
    assert r["steps_after_load"] == 4
    resumed = r["resumed_weights"]
    if name == "fsdp1":
        # Accelerate's sharded FSDP1 load (a model wrapped beforehand) does not restore
        # AdamW's state here (with plain SGD the run resumes bitwise), so the training
        # weights differ; the average was restored exactly and averaged what was trained
        assert_close(r["resumed_average"], replay(weights[1:4] + resumed, names, SMOOTHING))
        return
    for k, v in resumed[-1].items():
        assert torch.equal(v, weights[-1][k]), k
    for k, v in r["average"].items():
        assert torch.equal(r["resumed_average"][k], v), k
