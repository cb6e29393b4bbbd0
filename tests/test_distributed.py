"""Real multi-process runs (gloo, CPU) of FSDP2 and DDP, against a one-process reference.

Each launch starts 2 processes of ``tests/dist_worker.py``; the reference here trains the same
model on the same global batches in one process and averages its weights in float64 by the
closed form ``avg_1 = p_1, avg_k = s * avg_{k-1} + (1 - s) * p_k``, ``s = 2 ** (-1 / 4)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dist_worker import (
    BATCH,
    HALF_LIFE,
    STEPS,
    batch,
    eval_input,
    make_model,
    posthoc_run,
    tied_run,
)
from internals import tensors_of
from multiproc import run_ranks
from torch import nn

import emakit
from emakit import distributed as edist

# DCP in one process without a process group says so, and says when it overwrites on request.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:Detected an existing checkpoint:UserWarning"),
]

WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-6


def launch(scenario: str, out: Path, world: int = 2, timeout: float = 120.0) -> dict | None:
    """Run ``world`` ranks of the worker (see :func:`multiproc.run_ranks`); what rank 0
    wrote, if anything."""
    # CPU ranks over gloo also on a GPU machine: FSDP2's default mesh would otherwise put
    # both ranks on the one CUDA device, with gloo collectives on CUDA tensors (a hang)
    run_ranks(WORKER, scenario, out, world, timeout=timeout, env={"CUDA_VISIBLE_DEVICES": ""})
    path = out / f"{scenario}.pt"
    return torch.load(path, weights_only=True) if path.exists() else None


def one_process(steps: int = STEPS) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model trained in one process on the whole global batches, and its float64 EMA."""
    model = make_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    s = 2.0 ** (-1.0 / 4.0)  # half_life "4ba", one update per batch
    avg: dict[str, torch.Tensor] = {}
    for step in range(steps):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        for name, p in model.named_parameters():
            p64 = p.detach().double()
            avg[name] = p64.clone() if step == 0 or not p.requires_grad else s * avg[name] + (
                1 - s) * p64
    return model, avg


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        err = (got[name].double() - want[name]).abs().max().item()
        assert err <= TOL, f"{name}: off by {err}"


def _averaged_model(avg: dict[str, torch.Tensor]) -> nn.Module:
    model = make_model()
    model.load_state_dict({k: v.float() for k, v in avg.items()})
    return model


def test_fsdp2_two_processes(tmp_path: Path) -> None:
    assert HALF_LIFE == "4ba" and BATCH % 4 == 0
    result = launch("fsdp", tmp_path)
    trained, avg = one_process()

    # the gathered average equals the one-process EMA
    _assert_close(result["average"], avg)
    # each rank keeps about N / world elements of the average, none twice (rows of 6, 10
    # and 1 elements are split as torch.chunk splits them: rank 0 gets 30 + 30 + 3)
    n, local = result["total_numel"], result["local_numel"]
    assert n == 60 + 50 + 5  # two weights and the trainable bias; the frozen bias is live
    assert sum(local) == n and local == [63, 52], local
    assert max(local) <= 1.1 * n / 2
    # swapped(): the forward inside is the averaged model's; outside, the trained model's
    with torch.no_grad():
        want_avg, want_train = _averaged_model(avg)(eval_input()), trained(eval_input())
    assert (result["swapped_out"] - want_avg).abs().max() <= TOL
    assert (result["train_out"] - want_train).abs().max() <= TOL
    assert (result["module_out"] - want_avg).abs().max() <= TOL
    # a rank with another model: a clear error, on every rank (rank 0 reports it)
    assert "rank 1 passed a different model" in result["mismatch_error"]
    assert "0.weight: expected (10, 6), got (11, 6)" in result["mismatch_error"]

    # resume on 1 process from the 2-process DCP checkpoint: same as never stopping
    model = make_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ema = emakit.EMA(model, half_life=HALF_LIFE)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt-model"))
    model.load_state_dict(state["model"])
    edist.load(ema, tmp_path / "ckpt-ema")
    assert ema.num_updates == STEPS // 2 and ema.started
    for step in range(STEPS // 2, STEPS):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.step()
    _assert_close(ema.ema_state_dict(), avg)
    _assert_close(ema.ema_state_dict(), {k: v.double() for k, v in result["average"].items()})

    # and on 4 processes (one rank of 4 holds an empty shard of the 5-element bias)
    _assert_close(launch("fsdp_resume", tmp_path, world=4)["average"], avg)


def test_ddp_two_processes(tmp_path: Path) -> None:
    result = launch("ddp", tmp_path)
    _, avg = one_process()
    # both modes give the one-process average
    _assert_close(result["full"], avg)
    _assert_close(result["shard"], avg)
    # shard=True keeps about half of the (aligned) elements per rank, none twice; the
    # default keeps all N (+ alignment)
    n, aligned = result["total_numel"], result["aligned_numel"]
    assert sum(result["shard_numel"]) == aligned
    assert max(result["shard_numel"]) <= aligned // 2 + 16, result["shard_numel"]
    assert result["full_numel"] >= n
    with torch.no_grad():
        want = _averaged_model(avg)(eval_input())
    assert (result["swapped_out"] - want).abs().max() <= TOL
    assert (result["module_out"] - want).abs().max() <= TOL
    assert "rank 1 passed a different model" in result["mismatch_error"]
    # a NaN that only rank 1's slice sees: both ranks skip that update
    assert result["skipped"] == [1, 1]


def test_shard_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="shard"):
        emakit.EMA(make_model(), shard=True)
    with pytest.raises(TypeError, match="shard"):
        emakit.EMA(make_model(), shard="yes")


def test_dcp_save_keeps_an_existing_checkpoint(tmp_path: Path) -> None:
    ema = emakit.EMA(make_model(), half_life=HALF_LIFE)
    ema.update()
    edist.save(ema, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="checkpoint_id"):
        edist.save(ema, tmp_path / "ckpt")
    edist.save(ema, tmp_path / "ckpt", overwrite=True)
    again = emakit.EMA(make_model(), half_life=HALF_LIFE)
    edist.load(again, tmp_path / "ckpt")
    assert again.started and all(
        torch.equal(a, b) for a, b in zip(tensors_of(again).values(),
                                          tensors_of(ema).values(), strict=True)
    )


def test_shard_ties_and_spans_two_processes(tmp_path: Path) -> None:
    """Tied weights under shard=True export as in one process: one tensor under both names,
    equal to the one-process EMA; a flattened model gets the span path there too, and a
    parameter moved out of the flat buffer mid-run re-plans with the averages carried."""
    result = launch("ddp_ties", tmp_path)
    one = tied_run()
    assert one["shared"] and result["shared"]
    assert list(result["average"]) == list(one["average"])
    for name, want in one["average"].items():
        err = (result["average"][name].double() - want.double()).abs().max().item()
        assert err <= TOL, f"{name}: off by {err}"
    assert result["ops"][0] == one["ops"][0] == 1  # one lerp over one span on every rank
    assert result["ops"][-1] > 1 and one["ops"][-1] > 1  # the moved parameter broke the span


@pytest.mark.parametrize("mode", ["fsdp", "shard"])
def test_posthoc_two_processes(tmp_path: Path, mode: str) -> None:
    """PostHocEMA under FSDP2 and shard=True: rank 0 writes snapshots of the gathered
    profiles; synthesis on them equals the one-process synthesis."""
    launch(f"posthoc_{mode}", tmp_path)
    posthoc_run(str(tmp_path / "phema-one"))
    got_files = sorted((tmp_path / f"phema-{mode}").glob("phema-*.safetensors"))
    want_files = sorted((tmp_path / "phema-one").glob("phema-*.safetensors"))
    assert [p.name[:16] for p in got_files] == [p.name[:16] for p in want_files]
    assert len(got_files) == STEPS // 2
    for sigma in (0.05, 0.08, 0.10):
        got = emakit.synthesize(tmp_path / f"phema-{mode}", sigma_rel=sigma)
        want = emakit.synthesize(tmp_path / "phema-one", sigma_rel=sigma)
        assert list(got) == list(want)
        for name in want:
            assert got[name].shape == want[name].shape, name
            err = (got[name].double() - want[name].double()).abs().max().item()
            assert err <= TOL, f"sigma_rel {sigma}, {name}: off by {err}"
