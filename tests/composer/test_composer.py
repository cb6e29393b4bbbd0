"""emakit.integrations.composer.EMA in a real composer.Trainer (CPU, tiny classifier).

Composer pins an older torch, so these run in their own environment: `make test-composer`.
"""

import copy

import pytest
import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import emakit
from emakit.integrations.composer import EMA


def tiny() -> ComposerClassifier:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    return ComposerClassifier(module, num_classes=3)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


TRAIN, EVAL = data(32, 1), data(16, 2)  # 8 batches of 4 per epoch


def loader(ds, batch=4):
    return DataLoader(ds, batch_size=batch, shuffle=False)


def trainer(model, algorithm, **kw):
    opts = dict(
        model=model, train_dataloader=loader(TRAIN), max_duration="2ep", algorithms=[algorithm],
        optimizers=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), device="cpu",
        progress_bar=False, log_to_console=False, seed=0,
    )
    opts.update(kw)
    return Trainer(**opts)


class Recorder(Callback):
    """Weights after each batch; the average and the eval metric at each evaluation."""

    def __init__(self, algorithm):
        self.algorithm, self.steps, self.evals = algorithm, [], []

    def batch_end(self, state, logger):
        self.steps.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})

    def eval_start(self, state, logger):  # runs after the algorithm swapped the average in
        self.evals.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})

    def eval_end(self, state, logger):
        loss = float(state.eval_metrics["eval"]["CrossEntropy"].compute())
        self.evals[-1] = (self.evals[-1], loss)


def manual_cross_entropy(model, weights, ds) -> float:
    m = copy.deepcopy(model)
    m.load_state_dict(weights)
    m.eval()
    with torch.no_grad():
        x, y = ds.tensors
        return nn.functional.cross_entropy(m.module(x), y).item()


def test_average_matches_plain_ema_and_evaluation_uses_it():
    model = tiny()
    algorithm = EMA(half_life="3ba", ema_start="0.25dur")
    rec = Recorder(algorithm)
    t = trainer(model, algorithm, callbacks=[rec], eval_dataloader=loader(EVAL, 16),
                eval_interval="1ep", max_duration="16ba")  # 2 epochs; "dur" counts batches
    t.fit()
    assert len(rec.steps) == 16
    ref_model = tiny()
    ref = emakit.EMA(ref_model, half_life="3ba", start="4ba")  # 0.25 of 16 batches
    for i, snapshot in enumerate(rec.steps):
        ref_model.load_state_dict(snapshot)
        ref.step()
        if (i + 1) % 8 == 0:
            ref.epoch_end()
    ema = algorithm.ema
    assert ema.num_updates == ref.num_updates == 13  # the start copy counts
    got, want = ema.ema_state_dict(), ref.ema_state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k  # BatchNorm statistics included
    # evaluations at each epoch end saw the average
    assert len(rec.evals) == 2
    for weights, loss in rec.evals:
        assert loss == pytest.approx(manual_cross_entropy(model, weights, EVAL), rel=1e-5)
    assert torch.equal(rec.evals[-1][0]["module.0.weight"], got["module.0.weight"])
    # standalone eval too, and the training weights come back bitwise
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t.eval()
    assert rec.evals[-1][1] == pytest.approx(manual_cross_entropy(model, got, EVAL), rel=1e-5)
    assert rec.evals[-1][1] != pytest.approx(manual_cross_entropy(model, before, EVAL), rel=1e-4)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_holds_the_average_and_resume_is_exact(tmp_path):
    straight_alg = EMA(half_life="3ba", ema_start="2ba")
    straight = tiny()
    trainer(straight, straight_alg, save_folder=str(tmp_path / "a"), save_interval="1ep",
            save_filename="ep{epoch}.pt").fit()
    half = tmp_path / "a" / "ep1.pt"
    ckpt = torch.load(half, weights_only=False)
    [(name, saved)] = [a for a in ckpt["state"]["algorithms"] if a[0] == "EMA"]
    assert saved["ema"]["num_updates"] == 7 and saved["ema"]["clock"]["ba"] == 8
    model_weights = ckpt["state"]["model"]
    # the checkpoint's model weights are the average; the training weights ride along
    assert torch.equal(model_weights["module.0.weight"], saved["ema"]["average"]["module.0.weight"])
    assert not torch.equal(model_weights["module.0.weight"],
                           saved["training_weights"]["module.0.weight"])

    resumed_alg = EMA(half_life="3ba", ema_start="2ba")
    resumed = tiny()
    trainer(resumed, resumed_alg, load_path=str(half)).fit()
    assert resumed_alg.ema.num_updates == straight_alg.ema.num_updates == 15
    a, b = straight_alg.ema.state_dict(), resumed_alg.ema.state_dict()
    assert a["clock"] == b["clock"]
    for k in a["average"]:
        assert torch.equal(a["average"][k], b["average"][k]), k
    for k, v in straight.state_dict().items():  # trained on from the training weights
        assert torch.equal(resumed.state_dict()[k], v), k


def test_arguments():
    with pytest.raises(ValueError, match="half_life"):
        EMA(half_life="0ba")
    with pytest.raises(ValueError, match="give one of them"):
        EMA(half_life="10ba", smoothing=0.9)
    algorithm = EMA(smoothing=0.9)  # the seed crashed here
    assert algorithm.config.smoothing == 0.9
    with pytest.raises(ValueError, match="update_interval"):
        EMA(half_life="10ba", update_interval="10sp")


def test_every_ema_argument_reaches_the_algorithm():
    import dataclasses
    import inspect

    # EMA's keywords are its configuration's fields (its signature says **kwargs)
    ema_args = {f.name for f in dataclasses.fields(emakit.EMAConfig)} - {"start", "total"}
    ema_args.add("config")
    ours = set(inspect.signature(EMA).parameters)
    assert ema_args | {"ema_start"} <= ours, ema_args - ours
    algorithm = EMA(half_life="4ba", buffers="copy", compensated=True, skip_nonfinite=True)
    assert algorithm.config.buffers == "copy" and algorithm.config.compensated
    config = emakit.EMAConfig(half_life="4ba", start="3ba")
    assert EMA(config=config).config is config
    with pytest.raises(TypeError, match="not both"):
        EMA(half_life="2ba", config=config)
    with pytest.raises(TypeError, match="ema_start"):
        EMA(start="2ba")
    with pytest.raises(TypeError, match="max_duration"):
        EMA(total="2ep")


def test_posthoc_config_in_composer(tmp_path):
    """config=PostHocEMAConfig: a PostHocEMA (evaluation on its first profile), its
    profiles and snapshots those of a plain PostHocEMA of the same weights (the sweep after
    training), and a run resumed from a checkpoint ends bitwise equal to the straight one."""
    def config(folder):
        return emakit.PostHocEMAConfig(sigma_rels=(0.05, 0.10), snapshot_every="4ba",
                                       snapshot_dir=tmp_path / folder, snapshot_dtype=None)

    model = tiny()
    algorithm = EMA(config=config("snaps"))
    rec = Recorder(algorithm)
    trainer(model, algorithm, callbacks=[rec], eval_dataloader=loader(EVAL, 16),
            eval_interval="1ep", save_folder=str(tmp_path / "ckpt"), save_interval="1ep",
            save_filename="ep{epoch}.pt").fit()
    assert isinstance(algorithm.ema, emakit.PostHocEMA) and len(algorithm.ema.snapshots) == 4
    weights, loss = rec.evals[-1]
    assert loss == pytest.approx(manual_cross_entropy(model, weights, EVAL), rel=1e-5)
    ref_model = tiny()
    ref = emakit.PostHocEMA(ref_model, config=config("plain"))
    for i, snapshot in enumerate(rec.steps):
        ref_model.load_state_dict(snapshot)
        ref.step()
        if (i + 1) % 8 == 0:
            ref.epoch_end()
    for sigma in (0.05, 0.10):
        got, want = algorithm.ema.ema_state_dict(sigma), ref.ema_state_dict(sigma)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert torch.equal(weights["module.0.weight"], ref.ema_state_dict()["module.0.weight"])
    for sigma in (0.06, 0.09):  # the sweep after training
        got, want = (emakit.synthesize(tmp_path / d, sigma) for d in ("snaps", "plain"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    resumed = EMA(config=config("snaps-resumed"))
    trainer(tiny(), resumed, load_path=str(tmp_path / "ckpt" / "ep1.pt")).fit()
    a, b = algorithm.ema.state_dict(), resumed.ema.state_dict()
    assert a["clock"] == b["clock"] and a["t"] == b["t"]
    for x, y in zip(a["averages"], b["averages"], strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k
