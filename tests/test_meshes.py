"""Every torch.distributed mesh the EMA is kept on, as real multi-process gloo runs.

HSDP (``fully_shard`` over a (2, 2) replicate x shard mesh, 4 processes), tensor parallel
(``ColwiseParallel``/``RowwiseParallel``, 2 processes) and FSDP2 + TP (a (2, 2) mesh, 4
processes). The workers (``tests/mesh_worker.py``) record the full weights after every step;
the reference is the float64 EMA of those weights computed here in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_worker import eval_input, make_model
from mesh_worker import HALF_LIFE
from multiproc import assert_close, expected_outputs, launch, replay

import emakit
from emakit import distributed as edist

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]

WORKER = Path(__file__).with_name("mesh_worker.py")


@pytest.mark.parametrize(
    ("scenario", "world", "holders"),
    # holders: how many ranks share the average between them (the sharded dimensions)
    [("hsdp", 4, 2), ("tp", 2, 2), ("fsdp_tp", 4, 4)],
)
def test_mesh(scenario: str, world: int, holders: int, tmp_path: Path) -> None:
    result = launch(WORKER, scenario, tmp_path, world)
    want = replay(result["weights"], set(result["trainable"]))

    # the gathered average equals the one-process float64 EMA of the same weights
    assert_close(result["average"], want)
    # and its shapes are the model's
    model = make_model()
    assert {k: v.shape for k, v in result["average"].items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }

    # memory: each rank keeps about N / (ranks the average is split over), none empty
    n, local = result["total_numel"], result["local_numel"]
    # (the frozen bias is not averaged; shards are whole rows, so up to a row more than an
    # even split, and RowwiseParallel replicates the last bias over the TP ranks)
    assert n == 60 + 50 + 5
    assert len(local) == world and sum(local) >= n * world // holders, local
    assert max(local) <= n / holders + 12, local

    # swapped() and ema.module compute with the average; outside, the trained weights
    want_avg, want_train = expected_outputs(want, result["weights"][-1], make_model,
                                            eval_input)
    for key, want_out in (("swapped_out", want_avg), ("module_out", want_avg),
                          ("train_out", want_train)):
        err = (result[key] - want_out).abs().max().item()
        assert err <= 1e-5, f"{key}: off by {err}"

    # the sharded checkpoint loads in one process, without a process group
    ema = emakit.EMA(make_model(), half_life=HALF_LIFE)
    edist.load(ema, tmp_path / f"{scenario}-ckpt")
    assert ema.started
    assert_close(ema.ema_state_dict(), want)
