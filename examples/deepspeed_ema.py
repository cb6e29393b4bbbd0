"""EMA of a DeepSpeed model: under ZeRO-3 the average is kept partition by partition.

Run (CPU accelerator and gloo here; on GPUs leave DS_ACCELERATOR unset):

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_ema.py --stage 3
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 examples/deepspeed_ema.py --stage 3

``--stage 1`` or ``2`` keeps the parameters whole on every rank (pass ``--shard`` to keep
1/world of the average per rank). Writes ``deepspeed-out/ema`` (the EMA, a
torch.distributed.checkpoint folder that loads on any number of ranks) and
``deepspeed-out/ema.pt`` (the averaged weights as a plain state dict, from rank 0).
"""

from __future__ import annotations

import argparse
import os

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

import emakit
from emakit import distributed as edist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--shard", action="store_true", help="ZeRO-1/2: 1/world per rank")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="deepspeed-out")
    parser.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher's
    args = parser.parse_args()

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 1))
    config = {
        "train_micro_batch_size_per_gpu": 64,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        # threshold 0: every parameter partitioned (the default persists small ones whole)
        "zero_optimization": {"stage": args.stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)

    # After deepspeed.initialize, on engine.module (the model the engine wraps). Under ZeRO-3
    # each averaged tensor is this rank's partition: about 1/world of it.
    ema = emakit.EMA(engine.module, half_life="20ba", shard=args.shard)
    print(f"rank {rank}: EMA holds {ema.nbytes()} bytes", flush=True)

    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    true_w = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    device = engine.device
    for _ in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        y = x @ true_w + 0.3 * torch.randn(64, 1, generator=gen)
        loss = nn.functional.mse_loss(engine(x.to(device)), y.to(device))
        engine.backward(loss)
        engine.step()
        ema.step()  # this rank's partitions only: no communication

    xv = torch.randn(512, 32, generator=torch.Generator().manual_seed(99)).to(device)
    yv = xv @ true_w.to(device)
    engine.eval()
    with torch.no_grad():
        live = nn.functional.mse_loss(engine(xv), yv).item()
        with ema.swapped():  # ZeRO-3's gathered forward computes with the average
            averaged = nn.functional.mse_loss(engine(xv), yv).item()
    engine.train()
    if rank == 0:
        print(f"validation MSE ({world} ranks, ZeRO-{args.stage}): live {live:.4f}, "
              f"EMA {averaged:.4f}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    edist.save(ema, os.path.join(args.out, "ema"), overwrite=True)  # every rank writes
    weights = ema.ema_state_dict(rank0_only=True)  # gathered: full tensors on rank 0's CPU
    if rank == 0:
        torch.save(weights, os.path.join(args.out, "ema.pt"))
        plain = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                              nn.Linear(256, 1))
        plain.load_state_dict(weights)
        with torch.no_grad():
            mse = nn.functional.mse_loss(plain(xv.cpu()), yv.cpu()).item()
        print(f"plain model with the exported EMA: MSE {mse:.4f}", flush=True)


if __name__ == "__main__":
    main()
