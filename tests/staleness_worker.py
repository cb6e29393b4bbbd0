"""One rank of a multi-process staleness test (gloo, CPU). Run by ``tests/test_staleness.py``:

    python tests/staleness_worker.py SCENARIO[,SCENARIO...] OUTDIR   (RANK, WORLD_SIZE, ...)

Scenarios, run one after another in one launch: ``fsdp1`` (FullyShardedDataParallel,
``use_orig_params=True``, one unit per Linear), ``fsdp2`` (``fully_shard`` per Linear and
the root), ``zero3`` (DeepSpeed ZeRO-3, CPU accelerator).

The model's first layer (a backbone) is frozen when the EMA is built and starts training at
step :data:`UNFREEZE`. Every step runs a forward and backward pass and an optimizer step on
the trainable parameters, then moves the first layer by a pointwise affine map on every rank
(its sharded storage, the same on every rank, so the full weights move alike): it moves
whether or not the framework computes its gradients. After each ``ema.step()`` the full
weights are read through the framework's own gather (FSDP1's full state dict,
``DTensor.full_tensor()``, ``GatheredParameters``), so the test replays a float64 EMA of
them in one process. Rank 0 writes ``OUTDIR/<scenario>.pt`` with the number of times the
store classified the model at each step (FSDP1 re-registers its parameters in every
forward: that must not make the store look again).
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

HALF_LIFE = "4ba"
STEPS = 6
UNFREEZE = 3  # the first layer trains from this step on
BATCH = 8


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                          nn.Linear(10, 5))
    model[0].requires_grad_(False)
    return model


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 5, generator=g)


# the three placements: (model to train and hand to the EMA, the first layer's parameters,
# the parameters' local storage to move, full weights) ------------------------------------


def _fsdp1() -> tuple[nn.Module, nn.Module]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = make_model()
    first = model[0]
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True,
                   auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
    return wrapped, first


def _fsdp2() -> tuple[nn.Module, nn.Module]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for m in (model[0], model[2], model[4], model):
        fully_shard(m, mesh=mesh)
    return model, model[0]


def _zero3() -> tuple[nn.Module, nn.Module, object]:
    import deepspeed

    model = make_model()
    first = model[0]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cfg = {
        "train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine.module, first, engine


def _local(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds of parameter ``p`` (a ZeRO-3 partition, a DTensor's
    local shard, an FSDP1 original parameter's view of the local flat shard)."""
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def full_weights(scenario: str, model: nn.Module) -> dict[str, torch.Tensor]:
    if scenario == "fsdp1":
        return {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    if scenario == "zero3":
        import deepspeed

        with torch.no_grad(), deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def run(scenario: str, out: str, rank: int, world: int) -> None:
    built = {"fsdp1": _fsdp1, "fsdp2": _fsdp2, "zero3": _zero3}[scenario]()
    model, first = built[0], built[1]
    engine = built[2] if len(built) > 2 else None
    ema = emakit.EMA(model, half_life=HALF_LIFE)
    store = store_of(ema)
    classified: list[int] = []
    plain = store._classify

    def counted(*args, **kwargs):
        classified[-1] += 1
        return plain(*args, **kwargs)

    store._classify = counted
    opt = None if engine is not None else torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1)
    weights, names = [], []
    for step in range(STEPS):
        classified.append(0)
        if step == UNFREEZE:
            first.requires_grad_(True)
        x, y = batch(step)
        share = BATCH // world
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        loss = nn.functional.mse_loss(model(x), y)
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
        if step >= UNFREEZE:
            with torch.no_grad():
                for p in first.parameters():
                    _local(p).mul_(1.25).add_(0.05 * (step + 1))
        ema.step()
        weights.append(full_weights(scenario, model))
        names.append(sorted(e.name for e in store.entries if e.kind.value == "average"))
    result = {"weights": weights, "classified": classified, "averaged": names,
              "average": ema.ema_state_dict()}
    if rank == 0:
        torch.save(result, os.path.join(out, f"{scenario}.pt"))


def main() -> None:
    scenarios, out = sys.argv[1].split(","), sys.argv[2]
    if "zero3" in scenarios:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        for scenario in scenarios:
            run(scenario, out, dist.get_rank(), dist.get_world_size())
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
