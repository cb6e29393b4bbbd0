"""EMACallback under Lightning's FSDP strategies on 2 CPU processes (gloo); run by
tests/test_lightning_fsdp.py:

    python lightning_fsdp.py OUT_DIR

Lightning re-launches this script as rank 1. Both strategies run in turn in the same two
processes: ``FSDPStrategy`` (FSDP1: Lightning wraps the LightningModule in one
``FullyShardedDataParallel`` root) and ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in
``configure_model``). For each: a run of 8 optimizer steps with a checkpoint after each epoch,
then a run resumed from the first epoch's checkpoint. After every step the recorder reads
the full training weights through torch's own ``get_model_state_dict`` (not emakit), so the
test can replay a float64 EMA of them. Rank 0 writes ``OUT_DIR/<strategy>.pt``.

Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` (a check on the exact class)
and passes ``device_id=None``, which torch's FSDP refuses without an accelerator. The
subclass below changes only that: it wraps the module as ``FSDPStrategy`` does, with
``device_id`` the CPU, and hands the wrapped module to Lightning's own set-up.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import emakit
from emakit.integrations.lightning import EMACallback

GLOBAL_BATCH = 8
STEPS_PER_EPOCH = 4
KW = dict(half_life="3ba", start="2ba")


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on the CPU (see the module docstring): Lightning's wrapping, with
    ``device_id`` the CPU."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not isinstance(model, FullyShardedDataParallel):
            model = FullyShardedDataParallel(
                model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                **self.kwargs)
        return super()._setup_model(model)


class Net(pl.LightningModule):
    def __init__(self, fsdp2: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 5),
                                 nn.Tanh(), nn.Linear(5, 1))
        self.fsdp2 = fsdp2

    def configure_model(self) -> None:
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for i in (0, 3):
                fully_shard(self.net[i], mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full training weights, gathered by torch (every rank calls; rank 0 keeps them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True)  # (cpu_offload on the CPU crashes)
    return {k: v.clone() for k, v in get_model_state_dict(model, options=options).items()}


class Recorder(pl.Callback):
    """The full weights after every optimizer step, and what validation saw."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.val: list[tuple[int, float, float]] = []  # (num_updates, val_loss, smoothing)
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._step:
            self._step = trainer.global_step
            self.weights.append(full_weights(trainer.strategy.model))

    def on_validation_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        self.val.append((int(m["ema/num_updates"]), float(m["val_loss"]),
                         float(m["ema/smoothing"])))


def data(devices: int, rank: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH * STEPS_PER_EPOCH, 3, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True).sin())
    val = TensorDataset(*(t[:GLOBAL_BATCH] + 0.5 for t in ds.tensors))
    # rank r gets samples r, r + devices, ...: global batch k is samples 8k..8k+7
    sampler = DistributedSampler(ds, devices, rank, shuffle=False)
    vsampler = DistributedSampler(val, devices, rank, shuffle=False)
    return (DataLoader(ds, batch_size=GLOBAL_BATCH // devices, sampler=sampler),
            DataLoader(val, batch_size=GLOBAL_BATCH // devices, sampler=vsampler))


def trainer(strategy, callbacks, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=callbacks,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, use_distributed_sampler=False, **kw)


def run(out: Path, name: str) -> None:
    fsdp2 = name == "fsdp2"

    def strategy():
        if fsdp2:  # full checkpoints: they hold the average as "state_dict"
            return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)
        # sharded checkpoints (DCP folders): the average cannot be swapped in; FSDP1's full
        # state dict with offload_to_cpu (Lightning's "full") crashes on the CPU in torch 2.13
        return CPUFSDPStrategy(use_orig_params=True, state_dict_type="sharded")

    save = fsdp2

    def posthoc(folder: str) -> list[EMACallback]:  # FSDP1 also drives a PostHocEMA
        if fsdp2:
            return []
        config = emakit.PostHocEMAConfig(sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                                         snapshot_dir=out / folder, snapshot_dtype=None)
        return [EMACallback(config=config, evaluate_with="model", save_ema_weights=False,
                            log_stats=False)]

    cb, rec, ph = EMACallback(**KW, save_ema_weights=save), Recorder(), posthoc("phema")
    ckpt = ModelCheckpoint(dirpath=out / name, every_n_epochs=1, save_top_k=-1,
                           filename="{epoch}")
    t = trainer(strategy(), [cb, rec, ckpt, *ph], max_epochs=2)
    train, val = data(2, t.global_rank)
    t.fit(Net(fsdp2), train, val)
    result = {
        "weights": rec.weights, "val": rec.val, "average": cb.ema.ema_state_dict(rank0_only=True),
        "state": cb.ema.state_dict() if not fsdp2 else None,
        "wrapper": type(cb.ema.model).__name__, "counts": cb.ema.counts,
    }
    first = out / name / ("epoch=0.ckpt")
    straight = cb.ema.ema_state_dict()
    # resumed from the end of epoch 1 by a fresh trainer, callback and model
    cb2, rec2, ph2 = (EMACallback(**KW, save_ema_weights=save), Recorder(),
                      posthoc("phema-resumed"))
    t2 = trainer(strategy(), [cb2, rec2, *ph2], max_epochs=2, enable_checkpointing=False)
    t2.fit(Net(fsdp2), train, val, ckpt_path=first)
    resumed = cb2.ema.ema_state_dict()
    result["resumed_equal"] = all(torch.equal(resumed[k], straight[k]) for k in straight)
    if ph:  # every profile, bitwise
        a, b = ph[0].ema.state_dict(), ph2[0].ema.state_dict()
        result["posthoc_resumed_equal"] = a["clock"] == b["clock"] and all(
            torch.equal(x[k], y[k]) for x, y in zip(a["averages"], b["averages"], strict=True)
            for k in x)
    result["resumed_counts"] = cb2.ema.counts
    result["resumed_weights"] = rec2.weights
    if t.global_rank == 0:
        torch.save(result, out / f"{name}.pt")


def main(out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    for name in ("fsdp1", "fsdp2"):
        run(Path(out), name)
    assert emakit.EMA is not None


if __name__ == "__main__":
    main(sys.argv[1])
