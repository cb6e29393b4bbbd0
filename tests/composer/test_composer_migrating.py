"""docs/migrating.md, Composer: ``composer.algorithms.EMA`` and
``emakit.integrations.composer.EMA`` with the same arguments, side by side in one
``composer.Trainer``, compared after every batch (CPU)."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.algorithms import EMA as ComposerEMA
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from emakit.integrations.composer import EMA


def tiny() -> ComposerClassifier:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    return ComposerClassifier(module, num_classes=3)


class Both(Callback):
    """After each batch (callbacks run after the algorithms): both averages."""

    def __init__(self, theirs: ComposerEMA, ours: EMA) -> None:
        self.theirs, self.ours, self.seen = theirs, ours, []

    def batch_end(self, state, logger):
        if not self.theirs.ema_started:
            self.seen.append(None)
            return
        params = self.theirs.ema_model.named_parameters_dict
        buffers = self.theirs.ema_model.named_buffers_dict
        theirs = {k: v.detach().clone() for k, v in {**params, **buffers}.items()}
        self.seen.append((self.ours.ema.ema_state_dict(), theirs))

    def epoch_end(self, state, logger):
        self.batch_end(state, logger)


@pytest.mark.parametrize("kwargs", [
    dict(half_life="3ba", ema_start="0.0dur"),
    # a start on the interval's grid (see docs/migrating.md for one off it)
    dict(half_life="4ba", ema_start="6ba", update_interval="2ba"),
    dict(half_life="1ep", ema_start="1ep", update_interval="1ep"),
    # Composer needs update_interval with smoothing (without it its __init__ fails)
    dict(half_life=None, smoothing=0.9, ema_start="0.25dur", update_interval="1ba"),
])
def test_composer_ema_and_emakit_agree_step_by_step(kwargs):
    theirs, ours = ComposerEMA(**kwargs), EMA(**kwargs)
    both = Both(theirs, ours)
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    data = TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())
    Trainer(model=model, train_dataloader=DataLoader(data, batch_size=4), max_duration="3ep",
            algorithms=[theirs, ours], callbacks=[both], device="cpu", progress_bar=False,
            log_to_console=False, seed=0,
            optimizers=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)).fit()
    compared = [pair for pair in both.seen if pair is not None]
    assert compared and ours.ema.started
    for i, (got, want) in enumerate(compared):
        for name, value in want.items():
            if not value.is_floating_point():
                continue  # Composer truncates num_batches_tracked through its formula
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, i=i: f"check {i}, {name}: {m}")
    live = model.state_dict()
    last = compared[-1][0]
    assert any((last[k] - live[k]).abs().max() > 1e-3 for k in live if live[k].is_floating_point())
