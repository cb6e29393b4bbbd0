"""EMACallback in a real lightning.pytorch Trainer (CPU, tiny model, no mocks)."""

import copy
import inspect
import warnings

import lightning.pytorch as pl
import pytest
import torch
from internals import tensors_of
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit
from emakit.integrations.lightning import TRAINING_WEIGHTS_KEY, EMACallback

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")

N_TRAIN, BATCH = 32, 4  # 8 batches per epoch


class Tiny(pl.LightningModule):
    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), reduce_fx="sum")

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), reduce_fx="sum")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True).sin())


def loader(ds: TensorDataset) -> DataLoader:
    return DataLoader(ds, batch_size=BATCH, shuffle=False)


def trainer(callbacks, **kw) -> pl.Trainer:
    opts = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


def manual_loss(model: nn.Module, state: dict, ds: TensorDataset) -> float:
    """Sum over validation batches of the batch MSE, computed outside Lightning."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        return sum(
            nn.functional.mse_loss(m(x), y).item() for x, y in loader(ds)
        )


def plain_loop_ema(model0: Tiny, epochs: int, accumulate: int, **ema_kw) -> tuple:
    """The same optimizer steps as Lightning, in a hand-written loop driving emakit.EMA."""
    model = copy.deepcopy(model0)
    opt = model.configure_optimizers()
    ema = emakit.EMA(model, **ema_kw)
    batches = list(loader(data(N_TRAIN, 1)))
    for _ in range(epochs):
        model.train()
        for i, (x, y) in enumerate(batches):
            (nn.functional.mse_loss(model(x), y) / accumulate).backward()
            if (i + 1) % accumulate == 0 or i + 1 == len(batches):
                opt.step()
                opt.zero_grad()
                ema.step()
        ema.epoch_end()
    return model, ema


def assert_states_equal(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_average_matches_plain_loop_with_accumulation_and_delayed_start():
    model0 = Tiny()
    ema_kw = dict(half_life="3ba", start="2ba")
    model = copy.deepcopy(model0)
    cb = EMACallback(half_life=3, start=2)  # ints: that many batches (optimizer steps)
    seen_before_start = []

    class Probe(pl.Callback):  # validation before the first update must see the model itself
        def on_validation_start(self, trainer, pl_module):
            seen_before_start.append(cb.ema.started)

    t = trainer([cb, Probe()], max_epochs=2, accumulate_grad_batches=2, num_sanity_val_steps=1)
    t.fit(model, loader(data(N_TRAIN, 1)), loader(data(8, 2)))
    ref_model, ref = plain_loop_ema(model0, epochs=2, accumulate=2, **ema_kw)
    # 16 batches, accumulated by 2: 8 optimizer steps; start at 2, then 6 updates.
    assert t.global_step == 8 and cb.ema.counts == {"ba": 8, "ep": 2, "sp": 0, "tok": 0}
    assert cb.ema.num_updates == ref.num_updates == 7
    assert seen_before_start[0] is False  # the sanity check ran before any update
    # Validation ran twice during fit; the training weights must have come back bitwise.
    assert_states_equal(model.state_dict(), ref_model.state_dict(), exact=False)
    assert_states_equal(cb.ema.ema_state_dict(), ref.ema_state_dict(), exact=False)


def test_epoch_interval_counts_epochs_before_epoch_end_validation():
    model0 = Tiny()
    model = copy.deepcopy(model0)
    cb = EMACallback(half_life="2ep")
    counts_at_val = []

    class Probe(pl.Callback):
        def on_validation_start(self, trainer, pl_module):
            counts_at_val.append(cb.ema.num_updates)

    trainer([cb, Probe()], max_epochs=3).fit(model, loader(data(N_TRAIN, 1)), loader(data(8, 2)))
    _, ref = plain_loop_ema(model0, epochs=3, accumulate=1, half_life="2ep")
    # Epoch 1's end starts the EMA; epochs 2 and 3 update it; validation sees each.
    assert counts_at_val == [1, 2, 3] and ref.num_updates == 3
    assert_states_equal(cb.ema.ema_state_dict(), ref.ema_state_dict(), exact=False)


def test_validation_and_test_run_on_the_average_and_restore_training_weights():
    model = Tiny()
    cb = EMACallback(half_life="4ba")
    val = data(8, 2)
    t = trainer([cb], max_epochs=1)
    t.fit(model, loader(data(N_TRAIN, 1)), loader(val))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = cb.ema.ema_state_dict()
    assert not torch.equal(averaged["net.0.weight"], before["net.0.weight"])
    got = t.validate(model, loader(val), verbose=False)[0]["val_loss"]
    tested = t.test(model, loader(val), verbose=False)[0]["test_loss"]
    assert got == pytest.approx(manual_loss(model, averaged, val), rel=1e-6)
    assert tested == pytest.approx(got, rel=1e-6)
    predicted = torch.cat(t.predict(model, DataLoader(val.tensors[0], batch_size=BATCH)))
    m = copy.deepcopy(model)
    m.load_state_dict(averaged)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(predicted, m(val.tensors[0]))
    assert got != pytest.approx(manual_loss(model, before, val), rel=1e-4)
    assert_states_equal(model.state_dict(), before)  # bitwise back


class BothLosses(Tiny):
    """The documented way to log both losses in one validation pass: evaluate_with="model",
    and the averaged model's loss from ``ema.module`` (no swap)."""

    ema_cb: EMACallback

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), reduce_fx="sum")
        averaged = self.ema_cb.ema.module(x)
        self.log("val_loss_ema", nn.functional.mse_loss(averaged, y), reduce_fx="sum")


def test_evaluate_with_model_and_logging_both():
    model = BothLosses()
    val = data(8, 2)
    cb = model.ema_cb = EMACallback(half_life="4ba", evaluate_with="model")
    t = trainer([cb], max_epochs=1)
    t.fit(model, loader(data(N_TRAIN, 1)), loader(val))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = t.validate(model, loader(val), verbose=False)[0]
    assert metrics["val_loss_ema"] == pytest.approx(
        manual_loss(model, cb.ema.ema_state_dict(), val), rel=1e-6)
    assert metrics["val_loss"] == pytest.approx(manual_loss(model, before, val), rel=1e-6)
    assert metrics["val_loss"] != pytest.approx(metrics["val_loss_ema"], rel=1e-4)
    assert_states_equal(model.state_dict(), before)
    with pytest.raises(ValueError, match="evaluate_with"):
        EMACallback(evaluate_with="both")


def ckpt_cb(d):
    return pl.callbacks.ModelCheckpoint(dirpath=d, every_n_epochs=1, save_top_k=-1,
                                        filename="{epoch}")


def test_validate_and_test_with_ckpt_path_restore_the_ema(tmp_path):
    model0 = Tiny()
    train, val = loader(data(N_TRAIN, 1)), data(8, 2)
    cb = EMACallback(half_life="3ba", save_ema_weights=False)
    trainer([cb, ckpt_cb(tmp_path)], max_epochs=2, enable_checkpointing=True).fit(
        copy.deepcopy(model0), train, loader(val))
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    averaged = {**ckpt["state_dict"], **ckpt["callbacks"][cb.state_key]["ema"]["average"]}
    want = manual_loss(model0, averaged, val)
    assert want != pytest.approx(manual_loss(model0, ckpt["state_dict"], val), rel=1e-4)
    # a fresh trainer, callback and model, as a user evaluating a saved run would have them
    model, cb2 = Tiny(), EMACallback(half_life="3ba")
    t = trainer([cb2])
    got = t.validate(model, loader(val), ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    assert got[0]["val_loss"] == pytest.approx(want, rel=1e-6)
    assert cb2.ema.state_dict()["clock"]["ba"] == 8
    tested = t.test(model, loader(val), ckpt_path=tmp_path / "epoch=0.ckpt", verbose=False)
    assert tested[0]["test_loss"] == pytest.approx(want, rel=1e-6)
    assert_states_equal(model.state_dict(), ckpt["state_dict"])  # training weights back


def test_checkpoint_without_ema_state_warns_and_says_what_happens(tmp_path):
    model0 = Tiny()
    train, val = loader(data(N_TRAIN, 1)), data(8, 2)
    trainer([ckpt_cb(tmp_path)], max_epochs=1, enable_checkpointing=True).fit(
        copy.deepcopy(model0), train)
    path = tmp_path / "epoch=0.ckpt"
    cb = EMACallback(half_life="3ba", start="10ba")
    with pytest.warns(RuntimeWarning, match="restarts from the loaded weights") as record:
        trainer([cb], max_epochs=2).fit(Tiny(), train, ckpt_path=path)
    assert len([w for w in record if "emakit" in str(w.message)]) == 1  # once
    # the clock stood at step 8, epoch 1: the start copy at 10, then updates at 11..16
    assert cb.ema.counts["ba"] == 16 and cb.ema.counts["ep"] == 2
    assert cb.ema.num_updates == 7
    ckpt = torch.load(path, weights_only=True)
    with pytest.warns(RuntimeWarning, match="checkpoint's own weights"):
        got = trainer([EMACallback()]).validate(Tiny(), loader(val), ckpt_path=path,
                                                 verbose=False)
    assert got[0]["val_loss"] == pytest.approx(manual_loss(model0, ckpt["state_dict"], val),
                                               rel=1e-6)


@pytest.mark.parametrize("save_ema_weights", [False, None])  # None: the default, True
def test_resume_from_checkpoint_is_exact(tmp_path, save_ema_weights):
    model0 = Tiny()
    kw = dict(half_life="3ba", start="3ba")
    if save_ema_weights is not None:
        kw["save_ema_weights"] = save_ema_weights
    train, val = loader(data(N_TRAIN, 1)), loader(data(8, 2))

    straight, cb = copy.deepcopy(model0), EMACallback(**kw)
    trainer([cb, ckpt_cb(tmp_path / "a")], max_epochs=2, enable_checkpointing=True).fit(
        straight, train, val)
    half = tmp_path / "a" / "epoch=0.ckpt"  # after 8 of 16 steps
    ckpt = torch.load(half, weights_only=True)
    saved = ckpt["callbacks"][cb.state_key]["ema"]
    assert saved["clock"]["ba"] == 8 and saved["num_updates"] == 6
    if save_ema_weights is None:  # the checkpoint's model weights are the average at step 8
        w = ckpt["state_dict"]["net.0.weight"]
        assert torch.equal(w, saved["average"]["net.0.weight"])
        assert not torch.equal(w, ckpt[TRAINING_WEIGHTS_KEY]["net.0.weight"])
        loaded = Tiny.load_from_checkpoint(half)  # what users deploy
        assert torch.equal(loaded.net[0].weight, w)
    else:
        assert TRAINING_WEIGHTS_KEY not in ckpt

    resumed, cb2 = copy.deepcopy(model0), EMACallback(**kw)
    trainer([cb2], max_epochs=2).fit(resumed, train, val, ckpt_path=half)
    assert cb2.ema.num_updates == cb.ema.num_updates == 14
    assert_states_equal(cb2.ema.state_dict()["average"], cb.ema.state_dict()["average"])
    assert_states_equal(resumed.state_dict(), straight.state_dict())  # trained on from the
    # training weights, not from the average


def test_two_callbacks_keep_separate_state(tmp_path):
    fast, slow = EMACallback(half_life="2ba"), EMACallback(half_life="20ba")
    with pytest.raises(ValueError, match="save_ema_weights=True on 2 EMACallbacks"):
        trainer([fast, slow], max_steps=4).fit(Tiny(), loader(data(N_TRAIN, 1)))
    slow = EMACallback(half_life="20ba", save_ema_weights=False)
    assert fast.state_key != slow.state_key
    t = trainer([fast, slow], max_steps=4)
    t.fit(Tiny(), loader(data(N_TRAIN, 1)))
    t.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["callbacks"]
    w = "net.0.weight"
    assert torch.equal(saved[fast.state_key]["ema"]["average"][w], tensors_of(fast.ema)[w])
    assert torch.equal(saved[slow.state_key]["ema"]["average"][w], tensors_of(slow.ema)[w])
    assert not torch.equal(tensors_of(fast.ema)[w], tensors_of(slow.ema)[w])


def test_copy_on_fit_end_and_bad_arguments():
    model = Tiny()
    cb = EMACallback(smoothing=0.5, copy_on_fit_end=True)
    trainer([cb], max_steps=3).fit(model, loader(data(N_TRAIN, 1)))
    assert_states_equal(model.state_dict(), cb.ema.ema_state_dict())
    with pytest.raises(ValueError, match="evaluate_with"):
        EMACallback(evaluate_with="average")
    with pytest.raises(ValueError, match="half_life"):
        EMACallback(half_life="0ba")
    with pytest.raises(ValueError, match="start='100tok'.*not tokens"):
        EMACallback(start="100tok")  # tokens need count_tokens
    with pytest.raises(TypeError, match="halflife"):
        EMACallback(halflife="10ba")
    for name in ("save_ema_weights", "copy_on_fit_end", "log_stats"):  # strict booleans
        with pytest.raises(TypeError, match=f"{name}: expected True or False, got str 'no'"):
            EMACallback(**{name: "no"})


def test_dur_times_take_total_from_the_trainer():
    model = Tiny()
    cb = EMACallback(half_life="0.25dur", start="0.5dur")
    trainer([cb], max_steps=8).fit(model, loader(data(N_TRAIN, 1)))
    assert str(cb.ema.total) == "8ba" and cb.ema.num_updates == 5
    assert cb.ema.smoothing == pytest.approx(2 ** (-1 / 2))


def test_every_ema_argument_reaches_the_callback():
    ema_args = set(inspect.signature(emakit.EMA).parameters) - {"model"}
    ours = inspect.signature(EMACallback).parameters
    assert ema_args <= set(ours), ema_args - set(ours)
    cb = EMACallback(half_life="4ba", buffers="copy", exclude="net.3.*", compensated=True)
    model = Tiny()
    trainer([cb], max_steps=3).fit(model, loader(data(N_TRAIN, 1)))
    assert cb.ema.config.exclude == ("net.3.*",) and cb.ema.config.compensated
    assert cb.ema.config.buffers == "copy"
    config = emakit.EMAConfig(half_life="4ba")
    assert EMACallback(config=config).config is config
    with pytest.raises(TypeError, match="not both"):
        EMACallback(config=config, start="2ba")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_sample_and_token_times(accumulate):
    """start in samples: Lightning's batch size of each micro-batch, summed; in tokens: what
    count_tokens says. 4 samples (12 "tokens") per micro-batch."""
    by_samples = EMACallback(half_life="4ba", start="40sp")
    by_tokens = EMACallback(half_life="4ba", start="120tok", save_ema_weights=False,
                            count_tokens=lambda batch: batch[0].numel())
    model0 = Tiny()
    trainer([by_samples, by_tokens], max_epochs=2, accumulate_grad_batches=accumulate).fit(
        copy.deepcopy(model0), loader(data(N_TRAIN, 1)))
    steps = 16 // accumulate
    start_step = 10 // accumulate  # 40 samples = 10 micro-batches
    for cb in (by_samples, by_tokens):
        assert cb.ema.counts["ba"] == steps
        assert cb.ema.num_updates == steps - start_step + 1  # the start copy counts
    assert by_samples.ema.counts["sp"] == N_TRAIN * 2
    assert by_tokens.ema.counts["tok"] == N_TRAIN * 2 * 3
    _, ref = plain_loop_ema(model0, epochs=2, accumulate=accumulate, half_life="4ba",
                            start=f"{start_step}ba")
    assert_states_equal(by_samples.ema.ema_state_dict(), ref.ema_state_dict(), exact=False)


def test_a_bema_config_makes_the_callback_drive_a_bema():
    from test_bema import Reference

    model = Tiny()
    cb = EMACallback(config=emakit.BEMAConfig(lag=4.0, bias_power=0.3))
    params = [n for n, _ in model.named_parameters()]
    thetas = []

    class Record(pl.Callback):  # runs after the EMA callback: the weights it just averaged
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sd = pl_module.state_dict()
            thetas.append(torch.cat([sd[n].double().reshape(-1) for n in params]))

    t = trainer([cb, Record()], max_epochs=1)
    t.fit(model, loader(data(N_TRAIN, 1)))
    assert isinstance(cb.ema, emakit.BEMA)
    ref = Reference(bias_power=0.3, lag=4.0)  # float64, from the paper's formulas
    ref.start(thetas[0])
    for t_, theta in enumerate(thetas[1:], start=1):
        ref.update(t_, theta)
    out = cb.ema.state_dict()["bema_weights"]
    got = torch.cat([out[n].double().reshape(-1) for n in params])
    torch.testing.assert_close(got, ref.out, rtol=1e-5, atol=1e-6)


def test_statistics_are_logged_to_every_logger(tmp_path):
    """ema/smoothing, ema/num_updates and ema/skipped_updates after every optimizer step,
    through pl_module.log: in callback_metrics and in a real logger's file. A NaN put into a
    weight at step 3 (and taken out after the EMA saw it) is a skipped update."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    class Poison(pl.Callback):  # runs before the EMA callback: the EMA sees the NaN
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 3:
                self.saved = pl_module.net[0].weight.detach().clone()
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    class Cure(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.net[0].weight.copy_(poison.saved)

    poison = Poison()
    cb = EMACallback(half_life="2ba", start="2ba", skip_nonfinite=True)
    t = trainer([poison, cb, Cure()], max_steps=6, logger=CSVLogger(tmp_path, name="run"),
                log_every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="skipped an EMA update at batch 3"):
        t.fit(Tiny(), loader(data(N_TRAIN, 1)))
    assert t.callback_metrics["ema/num_updates"] == 4  # copy at 2, updates 4..6; 3 skipped
    assert t.callback_metrics["ema/skipped_updates"] == 1
    rows = list(csv.DictReader(open(tmp_path / "run" / "version_0" / "metrics.csv")))
    logged = [(int(r["step"]), float(r["ema/num_updates"]), float(r["ema/skipped_updates"]),
               float(r["ema/smoothing"])) for r in rows if r.get("ema/num_updates")]
    assert [row[:3] for row in logged] == [(0, 0, 0), (1, 1, 0), (2, 1, 1), (3, 2, 1),
                                           (4, 3, 1), (5, 4, 1)]
    assert all(s == pytest.approx(2 ** -0.5) for *_, s in logged)
    quiet = EMACallback(half_life="2ba", log_stats=False)
    t = trainer([quiet], max_steps=2)
    t.fit(Tiny(), loader(data(N_TRAIN, 1)))
    assert not any(k.startswith("ema/") for k in t.callback_metrics)


def test_posthoc_config_drives_a_posthoc_ema(tmp_path):
    """config=PostHocEMAConfig: the callback drives a PostHocEMA (validation on its first
    profile), its snapshots synthesize as a plain-loop PostHocEMA's of the same weights, and
    a fit resumed from a checkpoint ends bitwise equal to the straight one."""
    def config(folder):
        return emakit.PostHocEMAConfig(sigma_rels=(0.05, 0.10), snapshot_every="4ba",
                                       snapshot_dir=tmp_path / folder, snapshot_dtype=None)

    model0 = Tiny()
    train, val = loader(data(N_TRAIN, 1)), data(8, 2)
    cb, weights = EMACallback(config=config("snaps")), []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            weights.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    model = copy.deepcopy(model0)
    t = trainer([cb, Record(), ckpt_cb(tmp_path / "ckpt")], max_epochs=2,
                enable_checkpointing=True)
    t.fit(model, train, loader(val))
    assert isinstance(cb.ema, emakit.PostHocEMA) and len(cb.ema.snapshots) == 4
    got = t.validate(model, loader(val), verbose=False)[0]["val_loss"]
    assert got == pytest.approx(manual_loss(model, cb.ema.ema_state_dict(), val), rel=1e-6)
    # the same weights through a plain-loop PostHocEMA: the same profiles and snapshots
    plain = copy.deepcopy(model0)
    ref = emakit.PostHocEMA(plain, config=config("plain"))
    for w in weights:
        plain.load_state_dict(w)
        ref.step()
    for sigma in (0.05, 0.10):
        assert_states_equal(cb.ema.ema_state_dict(sigma), ref.ema_state_dict(sigma))
    # the sweep after training: any width from the snapshots
    for sigma in (0.07, 0.09):
        assert_states_equal(emakit.synthesize(tmp_path / "snaps", sigma),
                            emakit.synthesize(tmp_path / "plain", sigma), exact=False)
    resumed = EMACallback(config=config("snaps-resumed"))
    trainer([resumed], max_epochs=2).fit(copy.deepcopy(model0), train, loader(val),
                                         ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    a, b = cb.ema.state_dict(), resumed.ema.state_dict()
    assert a["clock"] == b["clock"] and a["t"] == b["t"]
    for x, y in zip(a["averages"], b["averages"], strict=True):
        assert_states_equal(x, y)


def test_sharded_checkpoints_need_save_ema_weights_false():
    """A strategy that writes the weights sharded cannot hold the average beside the
    training weights: the default save_ema_weights=True is refused when fit starts."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    t = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(),
                   logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"ModelParallelStrategy\(save_distributed_checkpoint"
                                         r"=True\).*save_ema_weights=False"):
        EMACallback().setup(t, Tiny(), "fit")
    EMACallback(save_ema_weights=False).setup(t, Tiny(), "fit")
    EMACallback().setup(t, Tiny(), "validate")  # nothing is saved there
