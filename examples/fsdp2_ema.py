"""EMA of an FSDP2 model: the average is kept shard by shard, next to the parameters.

Run (CPU, gloo; on GPUs the same script picks nccl):

    torchrun --nproc-per-node 2 examples/fsdp2_ema.py --out fsdp2-out

Writes ``fsdp2-out/ckpt`` (a torch.distributed.checkpoint folder holding the model and the
EMA, sharded; it loads on any number of ranks) and ``fsdp2-out/ema.pt`` (the averaged weights
gathered into a plain state dict on rank 0, for an unsharded model).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

import emakit
from emakit import distributed as edist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fsdp2-out")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=5))
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                          nn.Linear(256, 1)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    # After fully_shard: each averaged tensor is this rank's shard (about 1/world of it).
    ema = emakit.EMA(model, half_life="20ba")
    print(f"rank {rank}: EMA holds {ema.nbytes()} bytes", flush=True)

    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    true_w = torch.randn(32, 1, generator=torch.Generator().manual_seed(0))
    for _ in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        y = x @ true_w + 0.3 * torch.randn(64, 1, generator=gen)
        x, y = x.to(device), y.to(device)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        ema.step()  # local: no communication

    xv = torch.randn(512, 32, generator=torch.Generator().manual_seed(99))
    yv = (xv @ true_w).to(device)
    xv = xv.to(device)
    with torch.no_grad():
        live = nn.functional.mse_loss(model(xv), yv).item()
        with ema.swapped():  # the averaged shards in the model, the training ones after
            averaged = nn.functional.mse_loss(model(xv), yv).item()
    if rank == 0:
        print(f"validation MSE: live {live:.4f}, EMA {averaged:.4f}", flush=True)

    # Resumable checkpoint: sharded, written by every rank, loads on any number of ranks.
    os.makedirs(args.out, exist_ok=True)
    train = {"model": model.state_dict(), "optim": opt.state_dict()}
    dcp.save(train, storage_writer=dcp.FileSystemWriter(os.path.join(args.out, "ckpt", "train"),
                                                        overwrite=True))  # reruns
    edist.save(ema, os.path.join(args.out, "ckpt", "ema"), overwrite=True)  # reruns

    # Export: gathered full tensors, kept on rank 0 only, on the CPU.
    weights = ema.ema_state_dict(rank0_only=True)
    if rank == 0:
        tmp = os.path.join(args.out, "ema.pt.tmp")
        torch.save(weights, tmp)
        os.replace(tmp, os.path.join(args.out, "ema.pt"))
        plain = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(),
                              nn.Linear(256, 1))
        plain.load_state_dict(torch.load(os.path.join(args.out, "ema.pt"), weights_only=True))
        with torch.no_grad():
            mse = nn.functional.mse_loss(plain(xv.cpu()), yv.cpu()).item()
        print(f"unsharded model with the exported EMA: MSE {mse:.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
