"""Train a tiny model with EMACallback under Lightning; run by tests/test_lightning_ddp.py.

    python lightning_ddp.py OUT_DIR DEVICES

With DEVICES=2 Lightning's "ddp" strategy re-launches this script as a second process (gloo,
CPU). Each rank writes its EMA state and final weights to OUT_DIR/rank{r}.pt. The global batch
is 8 samples whatever DEVICES is, so one process and two see the same optimizer steps.
"""

import sys
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from emakit.integrations.lightning import EMACallback

GLOBAL_BATCH = 8


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        # LayerNorm, not BatchNorm: per-rank batch statistics would differ from one process's.
        self.net = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def main(out: str, devices: int) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True).sin())
    cb = EMACallback(half_life="3ba", start="2ba")
    # 16 samples of all ranks = 2 global batches: the same start, counted in samples
    cb_samples = EMACallback(half_life="3ba", start="16sp", evaluate_with="model",
                             save_ema_weights=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=2, callbacks=[cb, cb_samples], logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    # Lightning's own sampler would shuffle the training data; this one deals rank r the
    # samples r, r + devices, ...: global batch k is samples 8k..8k+7, as in one process.
    sampler = DistributedSampler(ds, devices, trainer.global_rank, shuffle=False)
    train = DataLoader(ds, batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    val = DataLoader(ds, batch_size=GLOBAL_BATCH // devices, sampler=sampler)
    trainer.fit(model, train, val)
    torch.save(
        {
            "ema": cb.ema.state_dict(),
            "ema_samples": cb_samples.ema.state_dict(),
            "model": model.state_dict(),
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "world_size": trainer.world_size,
        },
        f"{out}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
