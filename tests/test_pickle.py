"""Pickling and deep copies of EMA, BEMA and PostHocEMA (issue 19, item 5).

On 22b934d ``pickle.dumps(emakit.EMA(model))`` raised ``Can't pickle <function _fused_one>``
(and the executor's thread pool, compiled kernels and CUDA graphs would not pickle either).
A pickle now holds the model, the configuration, the laws, the cadence state and every
average and compensation bitwise; the layout, plan and executor are rebuilt where it loads.
Each test compares against the original object driven alike (bitwise), or against the
average a float64 replay gives.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import emakit

# 70,000 elements: the fused executor's compiled kernel (65,536 and up), not its eager path
BIG = 70_000


def _model(inputs: int = BIG // 100) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(inputs, 100), nn.BatchNorm1d(100), nn.Linear(100, 3))


def _train(model: nn.Module, averager, steps: int, seed: int) -> None:
    """Deterministic "optimizer steps": every parameter moves, the BatchNorm statistics too."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
        model.train()
        model(torch.randn(8, model[0].in_features, generator=g))
        averager.step()


FACES = {
    "EMA": lambda m: emakit.EMA(m, half_life="3ba", executor="fused"),
    "EMA-eager-warmup": lambda m: emakit.EMA(m, smoothing=0.9, executor="eager",
                                             warmup=emakit.PowerWarmup(power=1.0)),
    "EMA-schedule": lambda m: emakit.EMA(m, smoothing=emakit.CosineSmoothing(0.9, 1.0, 50),
                                         update_interval="2ba", start="3ba"),
    "BEMA": lambda m: emakit.BEMA(m, lag=2.0, executor="fused"),
    "PostHocEMA": lambda m: emakit.PostHocEMA(m, snapshot_every=None, executor="fused"),
}


def _tensors(averager) -> list[torch.Tensor]:
    """Every tensor of the averager's state (averages, compensations, BEMA's extra ones)."""
    out = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            for k in sorted(value):
                walk(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(averager.state_dict())
    return out


def _assert_same(a, b) -> None:
    """Same state, bitwise (tensors), same counts and configuration record."""
    sa, sb = a.state_dict(), b.state_dict()
    plain = {k for k, v in sa.items() if not isinstance(v, (dict, list, torch.Tensor))}
    assert {k: sa[k] for k in plain} == {k: sb[k] for k in plain}
    assert sa["config"] == sb["config"] and sa["clock"] == sb["clock"]
    ta, tb = _tensors(a), _tensors(b)
    assert len(ta) == len(tb) and ta
    for x, y in zip(ta, tb, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)
    ea, eb = a.ema_state_dict(), b.ema_state_dict()
    assert list(ea) == list(eb)
    for n in ea:
        assert torch.equal(ea[n], eb[n]), n


@pytest.mark.parametrize("face", sorted(FACES))
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_copy_equals_the_original_and_keeps_working_on_its_own_model(face, how):
    model = _model()
    averager = FACES[face](model)
    _train(model, averager, 4, seed=1)
    clone = pickle.loads(pickle.dumps(averager)) if how == "pickle" else copy.deepcopy(averager)
    assert clone.model is not model and type(clone) is type(averager)
    assert clone._laws == averager._laws and clone.config == averager.config
    _assert_same(averager, clone)
    # both go on alike: the copy's model is its own (the original's is not touched by it)
    _train(model, averager, 3, seed=2)
    _train(clone.model, clone, 3, seed=2)
    _assert_same(averager, clone)
    with clone.swapped():
        swapped = {n: t.clone() for n, t in clone.model.state_dict().items()}
    exported = clone.ema_state_dict()
    for n, t in exported.items():
        assert torch.equal(swapped[n], t)
    x = torch.randn(4, model[0].in_features)
    assert torch.equal(clone.module(x), averager.module(x))


def test_the_average_after_unpickling_is_the_float64_replay():
    """Independent of the code under test: a plain EMA (smoothing 0.5, fp64 storage) of known
    weights, pickled halfway, equals the closed-form float64 average after."""
    model = nn.Linear(3, 1, bias=False).double()
    ema = emakit.EMA(model, smoothing=0.5, dtype=torch.float64, compensated=False)
    values = [float(v) for v in range(1, 7)]
    for v in values[:3]:
        with torch.no_grad():
            model.weight.fill_(v)
        ema.step()
    ema = pickle.loads(pickle.dumps(ema))
    for v in values[3:]:
        with torch.no_grad():
            ema.model.weight.fill_(v)
        ema.step()
    want = values[0]
    for v in values[1:]:
        want = 0.5 * want + 0.5 * v
    assert ema.ema_state_dict()["weight"][0, 0].item() == want
    assert ema.num_updates == 6


def test_a_pickle_loads_in_a_fresh_process(tmp_path):
    """A pickled EMA restored in another interpreter (nothing of this process in it: no
    compiled kernels, no thread pool) goes on exactly as the original does here. (Small
    tensors: the fused executor's kernels compile lazily, and compiling is not the point.)"""
    model = _model(inputs=10)
    ema = emakit.EMA(model, half_life="3ba", executor="fused", skip_nonfinite=True)
    _train(model, ema, 3, seed=1)
    blob = tmp_path / "ema.pkl"
    blob.write_bytes(pickle.dumps(ema))
    out = tmp_path / "after.pt"
    code = textwrap.dedent(f"""
        import pickle, torch
        from test_pickle import _train
        ema = pickle.loads(open({str(blob)!r}, "rb").read())
        _train(ema.model, ema, 3, seed=2)
        torch.save({{"state": ema.state_dict(), "export": ema.ema_state_dict()}}, {str(out)!r})
    """)
    path = os.pathsep.join([str(Path(__file__).parent), *(p for p in sys.path if p)])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(tmp_path),
                   env={**os.environ, "PYTHONPATH": path})
    _train(model, ema, 3, seed=2)
    there = torch.load(out, weights_only=True)
    here = ema.state_dict()
    assert there["state"]["num_updates"] == here["num_updates"] == 6
    assert there["state"]["config"] == here["config"]
    for key in ("average", "compensation"):
        for n, t in here[key].items():
            assert torch.equal(there["state"][key][n], t), (key, n)
    for n, t in ema.ema_state_dict().items():
        assert torch.equal(there["export"][n], t), n


def test_a_model_holding_its_own_ema_pickles():
    """A cycle (the EMA kept on the model, as some LightningModules do): unpickling reaches
    the stores before the model is whole; they are built at their first use."""
    model = _model()
    model.ema = emakit.BEMA(model, lag=2.0)  # a plain attribute: not a submodule
    _train(model, model.ema, 3, seed=1)
    copied = pickle.loads(pickle.dumps(model))
    assert copied.ema.model is copied
    _assert_same(model.ema, copied.ema)
    _train(model, model.ema, 2, seed=3)
    _train(copied, copied.ema, 2, seed=3)
    _assert_same(model.ema, copied.ema)


def test_deepcopy_of_model_and_ema_together_keeps_them_bound():
    model = _model()
    ema = emakit.EMA(model, half_life="3ba")
    _train(model, ema, 2, seed=1)
    model2, ema2 = copy.deepcopy((model, ema))
    assert ema2.model is model2
    _train(model2, ema2, 2, seed=2)
    _train(model, ema, 2, seed=2)
    _assert_same(ema, ema2)


def test_pickling_inside_a_swap_is_refused():
    """Inside ``swapped()`` the model holds the average: a pickle then would save it as the
    training weights."""
    model = nn.Linear(2, 2)
    ema = emakit.EMA(model)
    ema.step()
    with ema.swapped(), pytest.raises(RuntimeError, match="cannot pickle the average inside"):
        pickle.dumps(ema)
    pickle.dumps(ema)


def test_a_grad_scaler_and_guards_travel_with_the_pickle():
    model = nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scale() on
    ema = emakit.EMA(model, half_life="2ba", grad_scaler=scaler)
    ema.step()
    scaler.update(new_scale=2.0 ** 7)  # a skipped step: the scale backs off
    ema.step()
    clone = pickle.loads(pickle.dumps(ema))
    assert clone.skipped_updates == ema.skipped_updates == 1
    assert clone.config.grad_scaler is not scaler
    assert clone.config.grad_scaler.get_scale() == scaler.get_scale()
