"""One rank of a multi-process test (gloo, CPU). Run by ``tests/test_distributed.py``:

    python tests/dist_worker.py SCENARIO OUTDIR   (RANK, WORLD_SIZE, MASTER_* in the environment)

Every rank trains the same small model on its share of the same global batches; rank 0
writes what the test compares (``OUTDIR/<scenario>.pt``). Internal checks that are per rank
(bitwise restore of the shards, errors raised) are asserts: a failing rank exits non-zero.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import warnings

import torch
import torch.distributed as dist
from internals import store_of
from torch import nn

import emakit
from emakit import distributed as edist

HALF_LIFE = "4ba"
STEPS = 6  # a checkpoint is written after STEPS // 2
BATCH = 8


def make_model() -> nn.Module:
    """Uneven shapes on purpose: 5 and 10 rows split unevenly over 2 and 4 ranks (one rank
    of 4 holds an empty shard of the 5-row weight), and a frozen bias (a live entry)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5))
    model[0].bias.requires_grad_(False)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 5, generator=g)


def eval_input() -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(7))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int, world: int):
    x, y = batch(step)
    share = BATCH // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()  # DDP/FSDP average grads over ranks
    opt.step()


def _local(model: nn.Module) -> list[torch.Tensor]:
    return [p.to_local().detach().clone() for p in model.parameters()]


def _fsdp_setup():
    """The test model under FSDP2 (each Linear, then the root), its optimizer and its EMA."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, opt, emakit.EMA(model, half_life=HALF_LIFE)


def fsdp(out: str, rank: int, world: int) -> None:
    from torch.distributed.fsdp import fully_shard

    model, opt, ema = _fsdp_setup()
    local_avg = sum(s.avg.numel() for s in store_of(ema).slots)
    total_avg = sum(math.prod(s.shape) for s in store_of(ema).slots)
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, local_avg)
    result = {"local_numel": per_rank, "total_numel": total_avg}
    plan = store_of(ema).plan
    for step in range(STEPS):
        train_step(model, opt, step, rank, world)
        ema.step()
        assert store_of(ema).plan is plan, "FSDP2 training made the store re-plan"
        if step + 1 == STEPS // 2:
            dcp_model = {"model": model.state_dict()}
            import torch.distributed.checkpoint as dcp

            dcp.save(dcp_model, checkpoint_id=os.path.join(out, "ckpt-model"))
            edist.save(ema, os.path.join(out, "ckpt-ema"))
    # state_dict() is sharded: DTensors with the parameters' placements
    average = ema.state_dict()["average"]
    assert all(isinstance(t, torch.distributed.tensor.DTensor) for t in average.values())
    # the gathered average, everywhere and on rank 0 only (CPU)
    full = ema.ema_state_dict()
    only0 = ema.ema_state_dict(rank0_only=True)
    if rank == 0:
        assert all(torch.equal(full[k], only0[k]) and only0[k].device.type == "cpu" for k in full)
    else:
        assert only0 == {}
    result["average"] = full
    # a state of full (unsharded) tensors loads too: each rank takes its own shard
    plain = ema.state_dict()
    plain["average"] = {k: v.full_tensor() for k, v in plain["average"].items()}
    fresh = emakit.EMA(model, half_life=HALF_LIFE)
    fresh.load_state_dict(plain)
    for a, b in zip(store_of(fresh).slots, store_of(ema).slots, strict=True):
        assert torch.equal(a.avg, b.avg), a.entry.names
    # swapped(): the forward inside sees the average; the shards come back bitwise
    before = _local(model)
    with ema.swapped():
        result["swapped_out"] = model(eval_input()).detach()
    after = _local(model)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "shards changed"
    result["train_out"] = model(eval_input()).detach()
    # ema.module: the averaged model's forward without a swap visible to the caller
    result["module_out"] = ema.module(eval_input())
    assert all(torch.equal(a, b) for a, b in zip(before, _local(model), strict=True))
    # a rank that passes another model gets an error naming it, on every rank, no hang
    other = make_model() if rank == 0 else nn.Sequential(nn.Linear(6, 11), nn.Linear(11, 5))
    fully_shard(other)
    try:
        emakit.EMA(other, half_life=HALF_LIFE)
    except ValueError as err:
        result["mismatch_error"] = str(err)
    # copy_to(): the average into the training shards for good, shard to shard
    ema.copy_to()
    for s in store_of(ema).slots:
        assert torch.equal(s.src, s.avg), s.entry.names
    if rank == 0:
        torch.save(result, os.path.join(out, "fsdp.pt"))


def ddp(out: str, rank: int, world: int) -> None:
    model = make_model()
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    if rank == 0:  # the default mode is local: an EMA on one rank alone must not wait
        solo = emakit.EMA(wrapped, half_life=HALF_LIFE, skip_nonfinite=True)
        solo.update()
        solo.update()
        solo.ema_state_dict()
    full_ema = emakit.EMA(wrapped, half_life=HALF_LIFE)
    shard_ema = emakit.EMA(wrapped, half_life=HALF_LIFE, shard=True)
    shard_numel: list = [None] * world
    dist.all_gather_object(shard_numel, sum(f.numel() for f in store_of(shard_ema).flat.values()))
    result = {
        "full_numel": sum(f.numel() for f in store_of(full_ema).flat.values()),
        "shard_numel": shard_numel,
        "total_numel": sum(math.prod(s.shape) for s in store_of(shard_ema).slots),
        "aligned_numel": sum(emakit._engine.layout.align(math.prod(s.shape))
                             for s in store_of(shard_ema).slots),
    }
    plans = (store_of(full_ema).plan, store_of(shard_ema).plan)
    for step in range(STEPS):
        train_step(wrapped, opt, step, rank, world)
        full_ema.step()
        shard_ema.step()
    assert (store_of(full_ema).plan, store_of(shard_ema).plan) == plans, "DDP training re-planned"
    result["full"] = full_ema.ema_state_dict()
    result["shard"] = shard_ema.ema_state_dict()
    only0 = shard_ema.ema_state_dict(rank0_only=True)  # a gather to rank 0, not all-gather
    if rank == 0:
        assert all(torch.equal(only0[k], result["shard"][k]) for k in only0) and only0
    else:
        assert only0 == {}
    result["module_out"] = shard_ema.module(eval_input())
    before = [p.detach().clone() for p in model.parameters()]
    with shard_ema.swapped():
        result["swapped_out"] = model(eval_input()).detach()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # state_dict() gathers full tensors: it loads into a fresh sharded EMA, slice by slice
    state = shard_ema.state_dict()
    again = emakit.EMA(wrapped, half_life=HALF_LIFE, shard=True)
    again.load_state_dict(state)
    for key, flat in store_of(again).flat.items():
        assert torch.equal(flat, store_of(shard_ema).flat[key])
    # a rank whose model differs (shape) gets an error naming it, on every rank
    other = make_model() if rank == 0 else nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 4))
    try:
        emakit.EMA(other, half_life=HALF_LIFE, shard=True)
    except ValueError as err:
        result["mismatch_error"] = str(err)
    # skip_nonfinite: a NaN in rank 1's slice only; every rank must skip the same update
    guarded = emakit.EMA(wrapped, half_life=HALF_LIFE, shard=True, skip_nonfinite=True)
    guarded.update()  # starts the average
    bias = model[2].bias
    kept = bias.detach().clone()
    with torch.no_grad():
        bias[-1] = float("nan")  # the last element of the flat vector: rank 1's slice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        guarded.update()
    with torch.no_grad():
        bias.copy_(kept)
    skipped: list = [None] * world
    dist.all_gather_object(skipped, guarded.skipped_updates)
    result["skipped"] = skipped
    # copy_to(): the gathered average into the (replicated) training weights
    shard_ema.copy_to()
    for name, p in model.named_parameters():
        assert torch.equal(p, result["shard"][name]), name
    if rank == 0:
        torch.save(result, os.path.join(out, "ddp.pt"))


def fsdp_resume(out: str, rank: int, world: int) -> None:
    """Load the checkpoint that ``fsdp`` wrote on 2 ranks into ``world`` ranks; go on."""
    import torch.distributed.checkpoint as dcp

    model, opt, ema = _fsdp_setup()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(out, "ckpt-model"))
    model.load_state_dict(state["model"])
    edist.load(ema, os.path.join(out, "ckpt-ema"))
    for step in range(STEPS // 2, STEPS):
        train_step(model, opt, step, rank, world)
        ema.step()
    full = ema.ema_state_dict(rank0_only=True)
    if rank == 0:
        torch.save({"average": full}, os.path.join(out, "fsdp_resume.pt"))


class Tied(nn.Module):
    """An embedding tied to the output layer, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 5)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(x)))


def tied_run(world: int = 1, rank: int = 0, shard: bool = False) -> dict:
    """Train :class:`Tied` (flattened) with an EMA; used in one process by the test too."""
    model = emakit.flatten_parameters(Tied())
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = emakit.EMA(wrapped, half_life=HALF_LIFE, shard=shard)
    ops = []
    for step in range(STEPS):
        train_step(wrapped, opt, step, rank, world)
        ema.step()
        ops.append(sum(len(op.avg) for op in store_of(ema).plan.main))  # lerped tensors
        if step == STEPS // 2:  # storage moved out of the flat buffer: a re-plan, same average
            with torch.no_grad():
                model.mid.weight.data = model.mid.weight.data.clone()
    sd = ema.ema_state_dict()
    return {"average": sd, "ops": ops,
            "shared": sd["emb.weight"].data_ptr() == sd["out.weight"].data_ptr()}


def ddp_ties(out: str, rank: int, world: int) -> None:
    result = tied_run(world, rank, shard=True)
    if rank == 0:
        torch.save(result, os.path.join(out, "ddp_ties.pt"))


def posthoc_run(out: str, world: int = 1, rank: int = 0, mode: str = "plain") -> None:
    """Train the test model with a PostHocEMA snapshotting into ``out``: in one process
    (``plain``), under FSDP2 (``fsdp``) or DDP with ``shard=True`` (``shard``)."""
    model = make_model()
    wrapped = model
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model[2])
        fully_shard(model)
    elif mode == "shard":
        wrapped = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ph = emakit.PostHocEMA(wrapped, sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                           snapshot_dir=out, snapshot_dtype=None, shard=mode == "shard")
    for step in range(STEPS):
        train_step(wrapped, opt, step, rank, world)
        ph.step()


def posthoc_fsdp(out: str, rank: int, world: int) -> None:
    posthoc_run(os.path.join(out, "phema-fsdp"), world, rank, "fsdp")


def posthoc_shard(out: str, rank: int, world: int) -> None:
    posthoc_run(os.path.join(out, "phema-shard"), world, rank, "shard")


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        run = {"fsdp": fsdp, "ddp": ddp, "fsdp_resume": fsdp_resume, "ddp_ties": ddp_ties,
               "posthoc_fsdp": posthoc_fsdp, "posthoc_shard": posthoc_shard}[scenario]
        run(out, dist.get_rank(), dist.get_world_size())
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
