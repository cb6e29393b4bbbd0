"""EMA of a DDP model, whole on every rank (default) or 1/world per rank (``--shard``).

Run (CPU, gloo; on GPUs the same script picks nccl):

    torchrun --nproc-per-node 2 examples/ddp_ema.py
    torchrun --nproc-per-node 2 examples/ddp_ema.py --shard

With ``--shard`` each rank averages only its slice of the flattened weights (the update needs
no communication); the slices are gathered only to evaluate (``swapped()``) or export.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

import emakit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", action="store_true", help="keep 1/world of the EMA per rank")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="ddp-out")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 1)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    ema = emakit.EMA(ddp, half_life="20ba", shard=args.shard)  # sees through the wrapper
    print(f"rank {rank}: EMA holds {ema.nbytes()} bytes", flush=True)

    gen = torch.Generator().manual_seed(1234 + rank)
    true_w = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    for _ in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        y = x @ true_w + 0.3 * torch.randn(64, 1, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x.to(device)), y.to(device)).backward()
        opt.step()
        ema.step()

    xv = torch.randn(512, 32, generator=torch.Generator().manual_seed(99))
    yv = (xv @ true_w).to(device)
    xv = xv.to(device)
    with torch.no_grad():
        live = nn.functional.mse_loss(model(xv), yv).item()
        with ema.swapped():  # with --shard: gathers the slices first (every rank calls it)
            averaged = nn.functional.mse_loss(model(xv), yv).item()
    weights = ema.ema_state_dict(rank0_only=True)  # collective; rank 0 keeps a CPU copy
    if rank == 0:
        print(f"validation MSE: live {live:.4f}, EMA {averaged:.4f}", flush=True)
        os.makedirs(args.out, exist_ok=True)
        tmp = os.path.join(args.out, "ema.pt.tmp")
        torch.save(weights, tmp)
        os.replace(tmp, os.path.join(args.out, "ema.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
