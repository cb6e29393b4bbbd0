"""One rank of a multi-process mesh test (gloo, CPU). Run by ``tests/test_meshes.py``:

    python tests/mesh_worker.py SCENARIO OUTDIR   (RANK, WORLD_SIZE, MASTER_* in the environment)

Scenarios: ``hsdp`` (``fully_shard`` over a (2, 2) replicate x shard mesh, 4 ranks), ``tp``
(``ColwiseParallel``/``RowwiseParallel``, 2 ranks), ``fsdp_tp`` (FSDP2 over the data-parallel
dimension of a (2, 2) mesh on top of tensor parallelism, 4 ranks: ``_StridedShard``).

Every rank trains the model of ``dist_worker.make_model`` on its data-parallel share of the
same global batches. After each step rank 0 records the full weights, gathered here with
``DTensor.full_tensor()`` (not through emakit), so the test can replay a float64 EMA of them
in one process. Rank 0 writes ``OUTDIR/<scenario>.pt``; per-rank checks are asserts.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from dist_worker import BATCH, eval_input, make_model
from torch import nn
from torch.distributed.tensor import DTensor

import emakit
from emakit import distributed as edist

HALF_LIFE = "4ba"
STEPS = 5


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 5, generator=g)


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.full_tensor() if isinstance(t, DTensor) else t).clone()


def _locals(model: nn.Module) -> list[torch.Tensor]:
    return [
        (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
        for p in model.parameters()
    ]


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _tp_plan():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {"0": ColwiseParallel(), "2": RowwiseParallel()}


def build(scenario: str) -> tuple[nn.Module, int, int]:
    """The model placed on the scenario's mesh, and this rank's data-parallel (rank, size)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    model = make_model()
    if scenario == "hsdp":
        mesh = _mesh((2, 2), ("replicate", "shard"))
        for m in (model[0], model[2], model):
            fully_shard(m, mesh=mesh)
        return model, dist.get_rank(), dist.get_world_size()
    if scenario == "tp":
        parallelize_module(model, _mesh((dist.get_world_size(),), ("tp",)), _tp_plan())
        return model, 0, 1  # every rank sees the whole batch
    if scenario == "fsdp_tp":
        mesh = _mesh((2, dist.get_world_size() // 2), ("dp", "tp"))
        parallelize_module(model, mesh["tp"], _tp_plan())
        for m in (model[0], model[2], model):
            fully_shard(m, mesh=mesh["dp"])
        return model, mesh["dp"].get_local_rank(), mesh["dp"].size()
    raise ValueError(f"unknown scenario {scenario!r}")


def run(scenario: str, out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, dp_rank, dp_world = build(scenario)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ema = emakit.EMA(model, half_life=HALF_LIFE)
    weights = []
    share = BATCH // dp_world
    for step in range(STEPS):
        x, y = _batch(step)
        part = slice(dp_rank * share, (dp_rank + 1) * share)
        x, y = x[part], y[part]
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.step()
        weights.append({k: _full(v) for k, v in model.state_dict().items()})
    result: dict = {"weights": weights,
                    "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}
    # this rank's elements of the average (the local parts of the sharded state)
    average = ema.state_dict()["average"]
    local = sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in average.values())
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, local)
    result["local_numel"] = per_rank
    result["total_numel"] = sum(t.numel() for t in average.values())
    # exports: everywhere, and rank 0 only (CPU), equal
    full = ema.ema_state_dict()
    only0 = ema.ema_state_dict(rank0_only=True)
    if rank == 0:
        assert only0.keys() == full.keys()
        assert all(torch.equal(full[k], only0[k]) and only0[k].device.type == "cpu" for k in full)
    else:
        assert only0 == {}, "rank0_only: other ranks must get nothing"
    result["average"] = full
    # swapped(): the forward inside is the average's; the training shards come back bitwise
    before = _locals(model)
    with torch.no_grad(), ema.swapped():
        result["swapped_out"] = _full(model(eval_input()))
    assert all(torch.equal(a, b) for a, b in zip(before, _locals(model), strict=True))
    with torch.no_grad():
        result["train_out"] = _full(model(eval_input()))
    result["module_out"] = _full(ema.module(eval_input()))
    assert all(torch.equal(a, b) for a, b in zip(before, _locals(model), strict=True))
    # a sharded checkpoint; the test loads it in one process
    edist.save(ema, os.path.join(out, f"{scenario}-ckpt"))
    # state_dict() -> load_state_dict() round trip on the same mesh
    again = emakit.EMA(model, half_life=HALF_LIFE)
    again.load_state_dict(ema.state_dict())
    reloaded = again.ema_state_dict()
    assert all(torch.equal(reloaded[k], full[k]) for k in full)
    if rank == 0:
        torch.save(result, os.path.join(out, f"{scenario}.pt"))


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    try:
        run(scenario, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The work is done and checked: leave without the interpreter's teardown, where gloo's
    # threads can abort the process ("terminate called without an active exception").
    import os as _os
    import sys as _sys

    _sys.stdout.flush()
    _sys.stderr.flush()
    _os._exit(0)
