"""DeepSpeed ZeRO-1/2/3 (CPU accelerator, gloo), as real multi-process runs.

The workers (``tests/ds_worker.py``) record the full weights after every step, gathered
with DeepSpeed's own ``GatheredParameters``; the reference is the float64 EMA of those
weights computed here in one process. Skipped where DeepSpeed is not installed
(``pip install emakit[deepspeed]``). DeepSpeed compiles a shared-memory op at its first
use on a machine (about a minute here); the compiled op is cached (``TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), so later runs and the other tests of a run reuse it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import TOL, assert_close, expected_outputs, launch, replay

import emakit
from emakit import distributed as edist

if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("DeepSpeed is not installed (pip install emakit[deepspeed])",
                allow_module_level=True)

from ds_worker import HALF_LIFE, eval_input, make_model  # noqa: E402

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

WORKER = Path(__file__).with_name("ds_worker.py")
ENV = {"DS_ACCELERATOR": "cpu"}


@pytest.fixture(scope="module", autouse=True)
def _shm_op_built() -> None:
    """DeepSpeed's CPU communication op, compiled once (about a minute on a fresh machine,
    then cached under TORCH_EXTENSIONS_DIR) before any test starts ranks that wait on it."""
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **ENV), check=True,
                   timeout=900, capture_output=True)


def _outputs(result: dict, want: dict[str, torch.Tensor]) -> None:
    """Outputs computed with the average (``swapped_out*``, ``module_out``) are the
    averaged model's; those computed outside the swaps (``train_out*``) the trained
    model's."""
    want_avg, want_train = expected_outputs(want, result["weights"][-1], make_model,
                                            eval_input)
    assert not torch.allclose(want_avg, want_train, atol=1e-4)  # the checks can tell them apart
    keys = [k for k in result if k.startswith(("swapped_out", "module_out", "train_out"))]
    assert len(keys) >= 2
    for key in keys:
        want_out = want_train if key.startswith("train_out") else want_avg
        err = (result[key] - want_out).abs().max().item()
        assert err <= 1e-5, f"{key}: off by {err}"


@pytest.mark.parametrize("stage", ["1", "2"])
def test_zero_1_2(stage: str, tmp_path: Path) -> None:
    result = launch(WORKER, "zero12", tmp_path, 2, stage, env=ENV, result=f"zero12-{stage}")
    want = replay(result["weights"], set(result["trainable"]))
    assert_close(result["whole"], want)
    assert_close(result["shard"], want)
    # shard=True keeps about half the average on each of the 2 ranks
    assert result["shard_bytes"] <= 0.5 * result["whole_bytes"] + 64 * 4
    _outputs(result, want)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """ZeRO-3 on 2 ranks, threshold 0, EMA after initialize: its folder (with the checkpoint
    written half way) and its result; shared by two tests."""
    out = tmp_path_factory.mktemp("zero3")
    return out, launch(WORKER, "zero3", out, 2, "0", "after", env=ENV, result="zero3-0-after")


@pytest.mark.parametrize(
    ("world", "threshold", "order"),
    [(2, "0", "after"), (2, "default", "before"), (4, "0", "before"), (4, "default", "after")],
)
def test_zero3(world: int, threshold: str, order: str, tmp_path: Path, request) -> None:
    if (world, threshold, order) == (2, "0", "after"):
        result = request.getfixturevalue("two_ranks")[1]
    else:
        result = launch(WORKER, "zero3", tmp_path, world, threshold, order, env=ENV,
                        result=f"zero3-{threshold}-{order}")
    want = replay(result["weights"], set(result["trainable"]))
    model = make_model()
    # never an empty tensor: every exported shape is the model's
    assert {k: v.shape for k, v in result["average"].items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert all(v.numel() > 0 for v in result["average"].values())
    # the gathered average equals the one-process float64 EMA of the same weights
    assert_close(result["average"], want)
    # the default threshold persists the small parameters and partitions the large one
    if threshold == "default":
        assert result["partitioned"] == ["2.weight"]
    else:
        assert len(result["partitioned"]) == len(model.state_dict())
    # each rank keeps about 1 / world of what the same EMA holds in one process (the
    # partitions, alignment aside), and the ranks hold all of it between them
    whole, per_rank = result["one_process_bytes"], result["ema_bytes"]
    assert len(per_rank) == world
    assert max(per_rank) <= whole / world * 1.01, (per_rank, whole)
    assert sum(per_rank) >= whole * 0.99, (per_rank, whole)
    _outputs(result, want)


def test_zero3_resume_on_1_and_4(two_ranks: tuple[Path, dict]) -> None:
    """A ZeRO-3 checkpoint written on 2 ranks (the model's weights and the EMA's
    ``emakit.distributed.save``) loads on 1 and on 4 ranks: training continued there ends
    equal to the run that never stopped."""
    tmp_path, full = two_ranks
    want = replay(full["weights"], set(full["trainable"]))
    for world in (1, 4):
        resumed = launch(WORKER, "zero3_resume", tmp_path, world, env=ENV,
                         result=f"zero3_resume-{world}")
        assert_close(resumed["average"], want, tol=TOL)
        assert_close(resumed["average"], full["average"], tol=TOL)
    # and in a process without DeepSpeed or a process group: the average of the first half
    ema = emakit.EMA(make_model(), half_life=HALF_LIFE)
    edist.load(ema, tmp_path / "ema-half")
    assert ema.started
    assert_close(ema.ema_state_dict(), replay(full["weights"][:3], set(full["trainable"])))


def test_posthoc_zero3(tmp_path: Path) -> None:
    """PostHocEMA under ZeRO-3 (2 ranks): the synthesis from its snapshots equals the one
    from a one-process PostHocEMA fed the same weights."""
    result = launch(WORKER, "posthoc", tmp_path, 2, env=ENV)
    model = make_model()
    ph = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                           snapshot_dir=tmp_path / "one", snapshot_dtype=torch.float32)
    for weights in result["weights"]:
        with torch.no_grad():
            for name, t in model.state_dict().items():
                t.copy_(weights[name])
        ph.step()
    got = emakit.synthesize(tmp_path / "snapshots", sigma_rel=0.08)
    want = emakit.synthesize(tmp_path / "one", sigma_rel=0.08)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert_close(got, want)


def test_accelerate_deepspeed_plugin_zero3(tmp_path: Path) -> None:
    """Accelerate's DeepSpeed plugin (ZeRO-3, 2 ranks): the EMA of the unwrapped model is
    kept partition by partition and equals the float64 EMA of the same weights; evaluation
    inside swapped() computes with the average."""
    env = dict(ENV, ACCELERATE_USE_DEEPSPEED="true", HF_HUB_OFFLINE="1")
    result = launch(WORKER, "accelerate", tmp_path, 2, env=env)
    assert result["placement"] == "ZeroPartition"
    want = replay(result["weights"], set(result["trainable"]))
    assert_close(result["average"], want)
    _outputs(result, want)
