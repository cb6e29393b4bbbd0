"""One rank of a multi-process FSDP1 (``FullyShardedDataParallel``) test (gloo, CPU). Run by
``tests/test_fsdp1.py``:

    python tests/fsdp1_worker.py SCENARIO OUTDIR   (RANK, WORLD_SIZE, MASTER_* in the environment)

Scenarios: ``train`` (2 ranks: every configuration of :data:`CONFIGS` in turn, the memory
measurement, the refusals and PostHocEMA), ``load`` (1 rank: the checkpoints ``train``
wrote, loaded into FSDP1 models on one rank).

Every rank trains :class:`Net` on its share of the same global batches. After each step the
full weights are read with FSDP's own full state dict (``model.state_dict()``, not through
emakit), so the test can replay a float64 EMA of them in one process. Rank 0 writes
``OUTDIR/<scenario>.pt``; per-rank checks (bitwise restores, equal gradients) are asserts.
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
from emakit._engine.collectives import process_group
from emakit._engine.tensors import unwrap_model

HALF_LIFE = "4ba"
STEPS = 6
BATCH = 8
WIDTH = 10
BIG = 256  # the memory measurement's layer width

# name -> FSDP1 options; "freeze": parameters frozen before wrapping; "tie": blocks.2.weight
# is blocks.0.weight (one unit holds both: FSDP1 ties within a unit only)
CONFIGS: dict[str, dict] = {
    # nested units (one per Linear, the root holds scale and proj), a whole frozen unit
    "plain": dict(use_orig_params=False, wrap=True, strategy="FULL_SHARD", freeze=("head.",)),
    # original parameters kept, a frozen bias beside a trained weight in one unit
    "orig": dict(use_orig_params=True, wrap=True, strategy="FULL_SHARD", freeze=("inp.bias",)),
    # one unit, tied weights, parameters kept unsharded between forward and backward
    "tied": dict(use_orig_params=False, wrap=False, strategy="SHARD_GRAD_OP", tie=True),
    # bf16 compute: the average must be of the fp32 shards the optimizer steps
    "bf16": dict(use_orig_params=True, wrap=True, strategy="FULL_SHARD", mixed=True),
    # every rank holds every flat parameter whole; bf16 copies for the forward
    "noshard": dict(use_orig_params=False, wrap=True, strategy="NO_SHARD", mixed=True),
}


class Net(nn.Module):
    """Uneven sizes (10 and 5 rows over 2 ranks), a parameter of the root module, a
    transposed (non-contiguous) parameter, a floating buffer; optionally tied weights."""

    def __init__(self, tie: bool = False, width: int = WIDTH) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, width)
        self.blocks = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.head = nn.Linear(width, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.proj = nn.Parameter(torch.randn(5, 5).t())  # stride (1, 5)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 5))
        if tie:
            self.blocks[2].weight = self.blocks[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(torch.tanh(self.inp(x)))
        return (self.head(h) @ self.proj) * self.scale + self.shift


def make_net(config: str) -> Net:
    cfg = CONFIGS[config]
    net = Net(tie=cfg.get("tie", False))
    for name, p in net.named_parameters():
        if name.startswith(cfg.get("freeze", ())):
            p.requires_grad_(False)
    return net


def averaged_names(config: str) -> set[str]:
    """State-dict names the EMA averages: trainable parameters (tied names too) and
    floating buffers."""
    net = make_net(config)
    return {n for n, t in net.state_dict(keep_vars=True).items()
            if t.is_floating_point() and (t.requires_grad or n in dict(net.named_buffers()))}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 5, generator=g)


def eval_input() -> torch.Tensor:
    return torch.randn(3, 6, generator=torch.Generator().manual_seed(11))


def wrap(config: str, net: nn.Module | None = None) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    cfg = CONFIGS[config]
    return FSDP(
        net if net is not None else make_net(config),
        device_id=torch.device("cpu"),
        use_orig_params=cfg["use_orig_params"],
        sharding_strategy=ShardingStrategy[cfg["strategy"]],
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}) if cfg["wrap"] else None,
        mixed_precision=MixedPrecision(param_dtype=torch.bfloat16) if cfg.get("mixed") else None,
    )


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int,
               world: int) -> None:
    x, y = batch(step)
    share = BATCH // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()  # FSDP averages the gradients over ranks
    opt.step()


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """FSDP's own full state dict (gathered by FSDP, independent of emakit)."""
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def flat_locals(model: nn.Module) -> list[torch.Tensor]:
    """Every unit's sharded fp32 flat parameter (what the optimizer steps)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return [m._handle.flat_param._local_shard.detach().clone()
            for m in FSDP.fsdp_modules(model) if m._handle is not None]


def teacher_between_forward_and_backward(model: nn.Module, ema: emakit.EMA, rank: int,
                                         world: int) -> torch.Tensor:
    """DINO's pattern: a student forward, the averaged teacher's forward, the student's
    backward. The gradients must equal those without the teacher (FSDP kept some unsharded
    parameters for the backward: the teacher must neither use nor leave them swapped)."""
    x, y = batch(100)
    share = BATCH // world
    x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
    model.zero_grad(set_to_none=True)
    nn.functional.mse_loss(model(x), y).backward()
    want = grads(model)
    model.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), y)
    teacher = ema.module(eval_input())
    loss.backward()
    got = grads(model)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want,
                                                                          strict=True))
    model.zero_grad(set_to_none=True)
    return teacher


def build_inside_forward(model: nn.Module) -> emakit.EMA:
    """An EMA built, and started, inside a forward pass (flat_param.data unsharded, or its
    bf16 copy under NO_SHARD)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    built: list[emakit.EMA] = []
    target = next(m for n, m in model.named_modules() if isinstance(m, nn.Linear)
                  and [a for a in n.split(".") if a != "_fsdp_wrapped_module"] == ["blocks", "0"])

    def hook(module: nn.Module, args: tuple) -> None:
        elsewhere = [m._handle.flat_param.data_ptr()
                     != m._handle.flat_param._local_shard.data_ptr()
                     for m in FSDP.fsdp_modules(model) if m._handle is not None]
        assert any(elsewhere), "the test must build the EMA while flat_param.data is not the " \
            "local shard (unsharded, or a bf16 copy)"
        ema = emakit.EMA(model, half_life=HALF_LIFE)
        ema.update()  # the start: a copy of the model's weights, read inside the forward
        built.append(ema)

    handle = target.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(eval_input())
    handle.remove()
    return built[0]


def run_config(config: str, out: str, rank: int, world: int) -> dict:
    model = wrap(config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    ema = emakit.EMA(model, half_life=HALF_LIFE)  # before FSDP's lazy initialization
    result: dict = {"placement": type(store_of(ema).placement).__name__,
                    "group": process_group(model) is model.process_group}
    weights = []
    for step in range(STEPS):
        train_step(model, opt, step, rank, world)
        ema.step()
        weights.append(full_state(model))
        if step == 0:
            plan = store_of(ema).plan  # the start copy may re-plan; training must not
            inner = build_inside_forward(model)
            result["inside_forward"] = inner.ema_state_dict()
            result["inside_forward_want"] = full_state(model)
    result["replanned"] = store_of(ema).plan is not plan
    result["weights"] = weights
    # exports: everywhere, and rank 0 only (CPU)
    full = ema.ema_state_dict()
    only0 = ema.ema_state_dict(rank0_only=True)
    if rank == 0:
        assert list(only0) == list(full)
        assert all(torch.equal(full[k], only0[k]) and only0[k].device.type == "cpu" for k in full)
    else:
        assert only0 == {}, "rank0_only: other ranks must get nothing"
    result["average"] = full
    result["export_dtypes"] = {k: v.dtype for k, v in full.items()}
    result["state_names"] = list(ema.state_dict()["average"])
    # outputs: training weights, averaged (swapped, teacher module), training again
    before = flat_locals(model)
    with torch.no_grad():
        result["train_out"] = model(eval_input()).float()
        with ema.swapped():
            result["swapped_out"] = model(eval_input()).float()
        result["train_out_after"] = model(eval_input()).float()
    assert all(torch.equal(a, b) for a, b in zip(before, flat_locals(model), strict=True))
    result["module_out"] = ema.module(eval_input()).float()
    result["teacher_out"] = teacher_between_forward_and_backward(model, ema, rank, world).float()
    assert all(torch.equal(a, b) for a, b in zip(before, flat_locals(model), strict=True))
    # a sharded checkpoint: the test loads it in one process and on one FSDP rank
    edist.save(ema, os.path.join(out, f"{config}-ckpt"))
    # state_dict() -> load_state_dict() round trip
    again = emakit.EMA(model, half_life=HALF_LIFE)
    again.load_state_dict(ema.state_dict())
    reloaded = again.ema_state_dict()
    assert all(torch.equal(reloaded[k], full[k]) for k in full)
    # a swap where FSDP holds the parameters unsharded would not be seen: refused
    if CONFIGS[config]["strategy"] != "NO_SHARD":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            try:
                with ema.swapped():
                    pass
            except RuntimeError as err:
                result["summon_error"] = str(err)
        assert all(torch.equal(a, b) for a, b in zip(before, flat_locals(model), strict=True))
    # copy_to(): the average into the training shards for good
    ema.copy_to()
    result["copied"] = full_state(model)
    return result


def memory(rank: int, world: int) -> dict:
    """Bytes of EMA state per rank for a model of 4 layers of BIG x BIG."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(BIG, BIG) for _ in range(4)])
    n = sum(p.numel() for p in net.parameters())
    model = FSDP(net, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
    got = {}
    for compensated in (True, False):
        ema = emakit.EMA(model, half_life=HALF_LIFE, compensated=compensated)
        per_rank: list = [None] * world
        dist.all_gather_object(per_rank, ema.nbytes())
        got[compensated] = per_rank
    return {"numel": n, "nbytes": got[True], "nbytes_plain": got[False]}


def refusals() -> dict:
    """What the EMA must refuse, by the error it raises on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffload, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    errors = {}

    def error(key: str, build) -> None:
        model = build()  # outside the try: only the EMA's refusal counts
        try:
            emakit.EMA(model, half_life=HALF_LIFE)
        except ValueError as err:
            errors[key] = str(err)

    mesh = init_device_mesh("cpu", (1, dist.get_world_size()),
                            mesh_dim_names=("replicate", "shard"))
    error("hybrid", lambda: FSDP(make_net("tied"), device_id=torch.device("cpu"),
                                 device_mesh=mesh,
                                 sharding_strategy=ShardingStrategy.HYBRID_SHARD))
    error("offload", lambda: FSDP(make_net("tied"), device_id=torch.device("cpu"),
                                  cpu_offload=CPUOffload(offload_params=True)))
    # the module FSDP wraps, not the FSDP module: its flat parameter's owner is outside
    error("inner", lambda: wrap("plain").module)
    error("inner_orig", lambda: wrap("orig").module)
    try:
        emakit.EMA(wrap("plain"), half_life=HALF_LIFE, shard=True)
    except ValueError as err:
        errors["shard"] = str(err)
    # FSDP over a compiled module: FSDP forwards `_orig_mod` to the module it wraps, which
    # must not be taken for torch.compile's wrapper (the FSDP module holds the state)
    compiled = FSDP(torch.compile(make_net("tied")), device_id=torch.device("cpu"))
    errors["unwrapped_is_fsdp"] = unwrap_model(compiled) is compiled
    return errors


def posthoc(out: str, rank: int, world: int) -> None:
    """PostHocEMA on the ``orig`` configuration (a frozen bias: a live, gathered entry)."""
    model = wrap("orig")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ph = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                           snapshot_dir=os.path.join(out, "phema-fsdp1"), snapshot_dtype=None)
    for step in range(STEPS):
        train_step(model, opt, step, rank, world)
        ph.step()


def posthoc_one_process(out: str) -> None:
    """The same PostHocEMA in one process on the unwrapped model, whole batches."""
    model = make_net("orig")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ph = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                           snapshot_dir=out, snapshot_dtype=None)
    for step in range(STEPS):
        train_step(model, opt, step, 0, 1)
        ph.step()


def train(out: str, rank: int, world: int) -> None:
    result = {name: run_config(name, out, rank, world) for name in CONFIGS}
    result["memory"] = memory(rank, world)
    result["errors"] = refusals()
    posthoc(out, rank, world)
    if rank == 0:
        torch.save(result, os.path.join(out, "train.pt"))


def load(out: str, rank: int, world: int) -> None:
    """Each configuration's 2-rank checkpoint, loaded into the same FSDP1 model on one rank
    (where FSDP keeps every flat parameter whole)."""
    result = {}
    for config in CONFIGS:
        model = wrap(config)
        ema = emakit.EMA(model, half_life=HALF_LIFE)
        edist.load(ema, os.path.join(out, f"{config}-ckpt"))
        result[config] = {"average": ema.ema_state_dict(), "num_updates": ema.num_updates,
                          "strategy": model.sharding_strategy.name}
    if rank == 0:
        torch.save(result, os.path.join(out, "load.pt"))


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    try:
        {"train": train, "load": load}[scenario](out, dist.get_rank(), dist.get_world_size())
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
