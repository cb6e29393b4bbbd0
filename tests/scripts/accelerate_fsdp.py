"""One rank of Accelerate with FSDP2 and FSDP1 (CPU, gloo) and ``emakit.integrations.
accelerate.register``; run by tests/test_accelerate_fsdp.py through tests/multiproc.py:

    python accelerate_fsdp.py all OUT_DIR   (RANK, WORLD_SIZE, MASTER_* set)

For FSDP2 (Accelerate's own ``fully_shard``) and then FSDP1, in the same processes: 8
optimizer steps of 2 accumulated micro-batches, ``helper.step()`` after every micro-batch,
``accelerator.save_state`` after step 4; then fresh objects ``load_state`` that folder and train
steps 5 to 8 again. After every optimizer step the full training weights are read with
torch's ``get_model_state_dict`` (not emakit). Rank 0 writes ``OUT_DIR/<name>.pt``.

Accelerate uses its FSDP plugin only on accelerators (on the CPU it trains under DDP), so
:func:`force_fsdp` makes its state say FSDP; FSDP1 through Accelerate's own wrapping fails in
torch on the CPU (``device_id`` ``cpu:0`` against the compute device ``cpu``), so the FSDP1
model is wrapped beforehand (Accelerate's manual-wrapping path) and checkpointed with
``SHARDED_STATE_DICT`` (FSDP1's full state dict with ``offload_to_cpu`` crashes on the CPU in
torch 2.13). See docs/distributed.md.
"""

from __future__ import annotations

import datetime
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import emakit
from emakit.integrations.accelerate import register

MICRO = 4  # samples per rank per micro-batch; 2 ranks x 2 micro-batches = 16 per step
STEPS = 8
ACCUMULATE = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(),
                         nn.Linear(10, 3))


def micro_batch(i: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + i)
    x, y = torch.randn(2 * MICRO, 6, generator=g), torch.randn(2 * MICRO, 3, generator=g)
    return x[rank * MICRO:(rank + 1) * MICRO], y[rank * MICRO:(rank + 1) * MICRO]


def force_fsdp(name: str):
    """A fresh Accelerator whose state says FSDP (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    AcceleratorState._reset_state()  # keeps the process group
    if name == "fsdp2":
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    else:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=1, sync_module_states=False,
                                                state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin,
                              gradient_accumulation_steps=ACCUMULATE)
    state = AcceleratorState()
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator


def prepared(name: str):
    accelerator = force_fsdp(name)
    model = make_model()
    if name == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                         use_orig_params=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    model, opt = accelerator.prepare(model, opt)
    helper = register(accelerator, emakit.EMA(model, half_life="3ba", start="2ba"))
    return accelerator, model, opt, helper


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in state.items()}


def train(accelerator, model, opt, helper, micro_batches: range, rank: int, out: Path,
          save_at: int | None) -> list[dict[str, torch.Tensor]]:
    weights = []
    for i in micro_batches:
        x, y = micro_batch(i, rank)
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(x), y))
            opt.step()
            opt.zero_grad()
        if helper.step():  # once per optimizer step
            weights.append(full_weights(model))
            if helper.steps == save_at:
                accelerator.save_state(str(out))
    return weights


def run(out: Path, name: str) -> None:
    rank = dist.get_rank()
    accelerator, model, opt, helper = prepared(name)
    weights = train(accelerator, model, opt, helper, range(STEPS * ACCUMULATE), rank,
                    out / name, save_at=4)
    result = {"weights": weights, "steps": helper.steps,
              "average": helper.ema.ema_state_dict(rank0_only=True),
              "wrapper": type(helper.ema.model).__name__}
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), helper.swapped():
        result["swapped_out"] = model(x)
    helper.remove()
    # resumed: fresh objects, load_state, the last 4 optimizer steps again
    accelerator, model, opt, helper = prepared(name)
    accelerator.load_state(str(out / name))
    result["steps_after_load"] = helper.steps
    result["resumed_weights"] = train(accelerator, model, opt, helper,
                                      range(4 * ACCUMULATE, STEPS * ACCUMULATE), rank,
                                      out / f"{name}-again", save_at=None)
    result["resumed_average"] = helper.ema.ema_state_dict(rank0_only=True)
    helper.remove()
    if rank == 0:
        torch.save(result, out / f"{name}.pt")


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        for name in ("fsdp2", "fsdp1"):
            run(out, name)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
