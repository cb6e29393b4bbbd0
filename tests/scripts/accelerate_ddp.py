"""Train a tiny model prepared by accelerate.Accelerator, with emakit.EMA on the prepared
(wrapped) model; run by tests/test_accelerate.py under torch.distributed.run.

    python -m torch.distributed.run --nproc_per_node 2 accelerate_ddp.py OUT_DIR

Also importable: ``train(accelerator)`` runs the same loop in one process. The global batch
is 8 samples whatever the number of processes.
"""

import sys

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit

GLOBAL_BATCH = 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))


def train(accelerator: Accelerator, steps_per_epoch_check: int = 4) -> tuple:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True).sin())
    # Accelerate shards this loader across processes: per-process batch is global / n.
    dl = DataLoader(ds, batch_size=GLOBAL_BATCH // accelerator.num_processes, shuffle=False)
    model, opt, dl = accelerator.prepare(model, opt, dl)
    ema = emakit.EMA(model, half_life="2ba", start="1ba")  # the prepared model, as is
    for _ in range(2):
        for xb, yb in dl:
            loss = nn.functional.mse_loss(model(xb), yb)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            ema.step()
        ema.epoch_end()
    return model, ema


if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model, ema = train(accelerator)
    torch.save(
        {
            "wrapper": type(model).__name__,
            "ema": ema.ema_state_dict(),
            "model": accelerator.unwrap_model(model).state_dict(),
            "num_processes": accelerator.num_processes,
        },
        f"{sys.argv[1]}/rank{accelerator.process_index}.pt",
    )
