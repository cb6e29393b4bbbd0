"""Small CPU tensors scattered through the average (``plan.Packed``): concatenated, lerped
as one tensor and written back. Checked against a float64 replay of the same updates, with
and without the compensation, on the eager and the fused executors."""

from __future__ import annotations

import pytest
import torch
from internals import make_store
from test_executors import WEIGHTS, Replay, compiles
from torch import nn

from emakit._engine import views
from emakit._engine.plan import PACK_MAX, Foreach, Packed


def _scattered() -> nn.Module:
    """Big weights (one compiled call each) between runs of fewer than 8 small tensors, so
    that no run is gathered: 4 x (Linear(256, 256), LayerNorm(256), Linear(256, 16))."""
    torch.manual_seed(2)
    blocks = []
    for _ in range(4):
        blocks += [nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 16)]
    return nn.Sequential(*blocks)


def _plain_check(store, replay: Replay) -> None:
    """An uncompensated fp32 average errs by at most an fp32 rounding of the average and of
    the increment per update, against float64."""
    got = views.tensors(store)
    for n, r in replay.ref.items():
        err = (got[n].double() - r).abs().max().item()
        bound = len(WEIGHTS) * 2**-23 * (r.abs().max().item() + replay.path[n])
        assert err <= bound, (n, err, bound)


@pytest.mark.parametrize("executor", ["eager", pytest.param("fused", marks=compiles)])
@pytest.mark.parametrize("compensated", [True, False])
def test_packed_small_tensors_track_float64(executor, compensated):
    model = _scattered()
    store = make_store(model, compensated=compensated, executor=executor)
    packed = [op for op in store.plan.main if isinstance(op, Packed)]
    assert len(packed) == 1 and len(packed[0].avg) == 4 * 5  # 2 biases, LayerNorm, small weight
    assert all(a.numel() < PACK_MAX for a in packed[0].avg)
    big = [op for op in store.plan.main if isinstance(op, Foreach)]
    assert sum(len(op.avg) for op in big) == 4  # the 256 x 256 weights
    replay = Replay(model).run(store, WEIGHTS, seed=5)
    if compensated:
        replay.check(store)
    else:
        _plain_check(store, replay)


def test_packed_sees_a_replaced_small_parameter():
    """A small parameter's storage replaced between updates: the next update averages the
    new tensor (the plan is rebuilt), as a float64 replay does."""
    model = _scattered()
    store = make_store(model, compensated=True)
    replay = Replay(model).run(store, WEIGHTS[:2], seed=6)
    with torch.no_grad():
        model[1].weight.data = torch.randn(256) + 5.0
    replay.params = dict(model.named_parameters())
    replay.run(store, WEIGHTS[2:], seed=7).check(store)
    assert any(isinstance(op, Packed) for op in store.plan.main)
