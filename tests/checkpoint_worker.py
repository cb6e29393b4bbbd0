"""One rank of tests/test_checkpoint_safety.py (gloo, CPU):

    python tests/checkpoint_worker.py SCENARIO OUTDIR   (RANK, WORLD_SIZE, MASTER_* set)

``save``: an FSDP2 model trains a few steps on every rank, its EMA is saved with
``emakit.checkpoint.save`` and rank 0 writes the gathered average to ``OUTDIR/saved.pt``.
``load``: a fresh FSDP2 EMA on this run's ranks loads the folder; rank 0 writes the gathered
average to ``OUTDIR/loaded.pt``. ``hostile``: loading a crafted folder must raise a ValueError
on every rank (none hangs); rank 0 writes the messages to ``OUTDIR/hostile.pt``.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import emakit
from emakit import checkpoint


def fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5))  # 5, 10 rows: uneven
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        model = fsdp_model()
        ema = emakit.EMA(model, half_life="4ba")
        folder = os.path.join(out, "ckpt")
        if scenario == "save":
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(4):
                g = torch.Generator().manual_seed(step)
                x, y = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                ema.step()
            checkpoint.save(ema, folder)
            full = ema.ema_state_dict(rank0_only=True)
            if rank == 0:
                torch.save({"average": full, "num_updates": ema.num_updates},
                           os.path.join(out, "saved.pt"))
        elif scenario == "load":
            checkpoint.load(ema, os.path.join(out, "ckpt"))
            full = ema.ema_state_dict(rank0_only=True)
            if rank == 0:
                torch.save({"average": full, "num_updates": ema.num_updates},
                           os.path.join(out, "loaded.pt"))
        elif scenario == "hostile":
            try:
                checkpoint.load(ema, os.path.join(out, "hostile"))
                message = "loaded"
            except ValueError as err:
                message = str(err)
            messages: list = [None] * dist.get_world_size()
            dist.all_gather_object(messages, message)
            if rank == 0:
                torch.save({"messages": messages}, os.path.join(out, "hostile.pt"))
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
