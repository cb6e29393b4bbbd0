"""One rank of a DeepSpeed test (CPU accelerator, gloo). Run by ``tests/test_deepspeed.py``:

    python tests/ds_worker.py SCENARIO OUTDIR [OPTIONS...]  (RANK, WORLD_SIZE, MASTER_* set)

Scenarios:

- ``zero12 STAGE``: ZeRO-1 or ZeRO-2; the EMA of ``engine.module``, whole and ``shard=True``.
- ``zero3 THRESHOLD ORDER``: ZeRO-3 with ``stage3_param_persistence_threshold`` THRESHOLD
  (``0``, or ``default``), the EMA built ``before`` or ``after`` ``deepspeed.initialize``.
  Writes a checkpoint after ``STEPS // 2`` steps (the model's full weights, and the EMA with
  ``emakit.distributed.save``).
- ``zero3_resume``: loads that checkpoint on this run's ranks and trains on.
- ``posthoc``: ``PostHocEMA`` under ZeRO-3, snapshots in ``OUTDIR/snapshots``.
- ``accelerate``: Accelerate with its DeepSpeed plugin (ZeRO-3); the EMA of
  ``accelerator.unwrap_model(model)``.

Every rank trains on its share of the same global batches. After each step rank 0 records
the full weights, gathered with ``deepspeed.zero.GatheredParameters`` (DeepSpeed's gather,
not emakit's), so the test replays a float64 EMA of them in one process.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from internals import store_of
from torch import nn

import emakit
from emakit import distributed as edist

# DeepSpeed is imported by the functions that use it, so that the test process can import
# the model and constants from here without loading DeepSpeed.

HALF_LIFE = "4ba"
STEPS = 6
BATCH = 8


def make_model() -> nn.Module:
    """One weight above ZeRO-3's default persistence threshold (1e5 elements), so that the
    default partitions it and persists the rest; a frozen bias, not averaged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 300), nn.Tanh(), nn.Linear(300, 400), nn.Tanh(),
                          nn.Linear(400, 5))
    model[0].bias.requires_grad_(False)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 5, generator=g)


def eval_input() -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(7))


def config(stage: int, world: int, threshold: str = "0") -> dict:
    zero: dict = {"stage": stage}
    if stage == 3 and threshold != "default":
        zero["stage3_param_persistence_threshold"] = int(threshold)
    return {
        "train_micro_batch_size_per_gpu": BATCH // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # a plain torch SGD
        "steps_per_print": 10**9,
    }


def initialize(model: nn.Module, cfg: dict):
    import deepspeed

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def train_step(engine, step: int, rank: int, world: int) -> None:
    x, y = batch(step)
    share = BATCH // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    loss = nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()


def full_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with full tensors, gathered by DeepSpeed (every rank)."""
    import deepspeed

    params = list(module.parameters())
    with torch.no_grad(), deepspeed.zero.GatheredParameters(params):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _trainable(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def zero12(out: str, rank: int, world: int, stage: str) -> None:
    engine = initialize(make_model(), config(int(stage), world))
    whole = emakit.EMA(engine.module, half_life=HALF_LIFE)
    sliced = emakit.EMA(engine.module, half_life=HALF_LIFE, shard=True)
    weights = []
    for step in range(STEPS):
        train_step(engine, step, rank, world)
        whole.step()
        sliced.step()
        weights.append(full_weights(engine.module))
    result = {"weights": weights, "trainable": _trainable(engine.module)}
    result["whole"] = whole.ema_state_dict()
    result["shard"] = sliced.ema_state_dict()
    result["shard_bytes"] = store_of(sliced).state_nbytes()
    result["whole_bytes"] = store_of(whole).state_nbytes()
    before = [p.detach().clone() for p in engine.module.parameters()]
    with torch.no_grad(), sliced.swapped():
        result["swapped_out"] = engine.module(eval_input())
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters(), strict=True))
    result["module_out"] = sliced.module(eval_input())
    if rank == 0:
        torch.save(result, os.path.join(out, f"zero12-{stage}.pt"))


def _record(result: dict, ema: emakit.EMA, engine, rank: int) -> None:
    """What every ZeRO-3 scenario reports: exports, memory, swapped() and ema.module."""
    from deepspeed.utils import safe_get_local_fp32_param

    world = dist.get_world_size()
    full = ema.ema_state_dict()
    only0 = ema.ema_state_dict(rank0_only=True)
    if rank == 0:
        assert only0.keys() == full.keys()
        assert all(torch.equal(full[k], only0[k]) for k in full)
    else:
        assert only0 == {}, "rank0_only: other ranks must get nothing"
    result["average"] = full
    per_rank: list = [None] * world
    dist.all_gather_object(per_rank, store_of(ema).state_nbytes())
    result["ema_bytes"] = per_rank
    # the same EMA of the same model in one process, for scale
    alone = emakit.EMA(make_model(), half_life=HALF_LIFE)
    result["one_process_bytes"] = store_of(alone).state_nbytes()
    # swapped(): ZeRO-3's gathered forward computes with the average. Right after a step
    # the partitioned parameters are released (the forward gathers the averaged partitions);
    # after an evaluation forward ZeRO-3 keeps them gathered (the swap writes .data too).
    # Outside the swaps the forward must compute with the training weights again.
    params = list(engine.module.parameters())
    parts = [p.ds_tensor.detach().clone() for p in params]
    masters = [safe_get_local_fp32_param(p) for p in params if p.requires_grad]
    masters = [m.detach().clone() for m in masters]
    x = eval_input()
    with torch.no_grad():
        engine.eval()
        for tag in ("released", "gathered"):
            with ema.swapped():
                result[f"swapped_out_{tag}"] = engine.module(x)
            result[f"train_out_{tag}"] = engine.module(x)
        engine.train()
    result["module_out"] = ema.module(x)
    # the training state comes back bitwise: partitions, fp32 master partitions, and the
    # full weights as DeepSpeed gathers them
    assert all(torch.equal(a, p.ds_tensor) for a, p in zip(parts, params, strict=True))
    again = [safe_get_local_fp32_param(p) for p in params if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(masters, again, strict=True))
    now = full_weights(engine.module)
    assert all(torch.equal(now[k], v) for k, v in result["weights"][-1].items())


def zero3(out: str, rank: int, world: int, threshold: str, order: str) -> None:
    model = make_model()
    ema = emakit.EMA(model, half_life=HALF_LIFE) if order == "before" else None
    engine = initialize(model, config(3, world, threshold))
    if ema is None:
        ema = emakit.EMA(engine.module, half_life=HALF_LIFE)
    weights = []
    for step in range(STEPS):
        train_step(engine, step, rank, world)
        ema.step()
        weights.append(full_weights(engine.module))
        if step + 1 == STEPS // 2:
            if rank == 0:
                torch.save(weights[-1], os.path.join(out, "model-half.pt"))
            edist.save(ema, os.path.join(out, "ema-half"))
    result = {"weights": weights, "trainable": _trainable(engine.module)}
    result["partitioned"] = [n for n, p in engine.module.named_parameters()
                             if not getattr(p, "ds_persist", False)]
    _record(result, ema, engine, rank)
    if rank == 0:
        torch.save(result, os.path.join(out, f"zero3-{threshold}-{order}.pt"))


def zero3_resume(out: str, rank: int, world: int) -> None:
    model = make_model()
    model.load_state_dict(torch.load(os.path.join(out, "model-half.pt"), weights_only=True))
    engine = initialize(model, config(3, world))
    ema = emakit.EMA(engine.module, half_life=HALF_LIFE)
    edist.load(ema, os.path.join(out, "ema-half"))
    for step in range(STEPS // 2, STEPS):
        train_step(engine, step, rank, world)
        ema.step()
    result = {"average": ema.ema_state_dict(rank0_only=True)}
    if rank == 0:
        torch.save(result, os.path.join(out, f"zero3_resume-{world}.pt"))


def posthoc(out: str, rank: int, world: int) -> None:
    """PostHocEMA under ZeRO-3: snapshots gathered from the partitions, written by rank 0."""
    engine = initialize(make_model(), config(3, world))
    ph = emakit.PostHocEMA(engine.module, sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                           snapshot_dir=os.path.join(out, "snapshots"),
                           snapshot_dtype=torch.float32)
    weights = []
    for step in range(STEPS):
        train_step(engine, step, rank, world)
        ph.step()
        weights.append(full_weights(engine.module))
    if rank == 0:
        torch.save({"weights": weights}, os.path.join(out, "posthoc.pt"))


def accelerate(out: str, rank: int, world: int) -> None:
    """Accelerate with its DeepSpeed plugin (ZeRO-3): the EMA of the unwrapped model."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1)
    plugin.deepspeed_config.update(config(3, world), train_batch_size=BATCH)
    accelerator = Accelerator(deepspeed_plugin=plugin)
    model = make_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    inner = accelerator.unwrap_model(model)
    ema = emakit.EMA(inner, half_life=HALF_LIFE)
    weights = []
    share = BATCH // world
    for step in range(STEPS):
        x, y = batch(step)
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()
        opt.zero_grad()
        ema.step()
        weights.append(full_weights(inner))
    result = {"weights": weights, "trainable": _trainable(inner),
              "placement": type(store_of(ema).placement).__name__}
    result["average"] = ema.ema_state_dict()
    model.eval()
    with torch.no_grad(), ema.swapped():
        result["swapped_out"] = model(eval_input())
    with torch.no_grad():
        result["train_out"] = model(eval_input())
    result["module_out"] = ema.module(eval_input())
    if rank == 0:
        torch.save(result, os.path.join(out, "accelerate.pt"))


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    scenario, out, *args = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        {"zero12": zero12, "zero3": zero3, "zero3_resume": zero3_resume,
         "posthoc": posthoc, "accelerate": accelerate}[scenario](
            out, rank, world, *args
        )
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
