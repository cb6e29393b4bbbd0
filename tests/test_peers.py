"""The recipes of docs/migrating.md for Ultralytics, YOLOX, MMEngine, torch_ema, d2go, Keras 3,
TF1's ``tf.train.ExponentialMovingAverage``, optax and PaddleDetection: the peer and emakit side
by side on the same training run, compared after every optimizer step.

Installed peers run their own code: MMEngine, torch_ema, Keras (torch backend) and optax (jax
on the CPU). Ultralytics is installed without its dependencies (they pull a CUDA torch and
OpenCV): its ``ModelEMA`` class and ``unwrap_model`` are taken from the installed
``ultralytics/utils/torch_utils.py`` by name and run as they are. The others are ported below
from their source, the commit named:

- YOLOX: Megvii-BaseDetection/YOLOX ``yolox/utils/ema.py`` at
  390ec1ae0353b113f6732336a260d0e0e684a216
- d2go: facebookresearch/d2go ``d2go/modeling/ema.py`` at
  1c9e0e83b5b268cc7a90c5ac9d6142adb7d304da (``EMAState``, ``EMAUpdater``, ``EMAHook``)
- TF1: tensorflow/tensorflow ``tensorflow/python/training/moving_averages.py`` at
  0004ac98864da68d6a90d96385bd55c86e04a8c1 (``ExponentialMovingAverage.apply``,
  ``assign_moving_average``, ``_zero_debias``)
- PaddleDetection: PaddlePaddle/PaddleDetection ``ppdet/optimizer/ema.py`` at
  1718e0f0cf2abf4c94049f4bec364fcf517ef476 (``ModelEMA``)

Where the peer computes in float64 the comparison is to 1e-12 relative; TF1 and
PaddleDetection compute in float32 (TF1 even its decay), and are compared to 1e-6.
"""

from __future__ import annotations
import __future__

import ast
import copy
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import emakit
from emakit.schedules import (
    ExponentialRamp,
    MomentumAnnealing,
    RatioRamp,
    RunningMean,
    ZeroDebiased,
)

STEPS = 24


def net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(),
                         nn.Linear(8, 2)).to(dtype)


def batches(steps: int = STEPS, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (torch.randn(16, 4, generator=g, dtype=dtype),
               torch.randn(16, 2, generator=g, dtype=dtype))


def training(model: nn.Module, steps: int = STEPS):
    """SGD with momentum on random data; yields the step number after each optimizer step."""
    dtype = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    model.train()
    for step, (x, y) in enumerate(batches(steps, dtype), start=1):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        yield step


def EMA(model: nn.Module, **kwargs) -> emakit.EMA:
    """The recipe's ``emakit.EMA``, storing the average in the model's dtype: float64 for
    the float64 runs here (emakit stores float32 by default, which would round the
    comparison to float32 precision)."""
    return emakit.EMA(model, dtype=next(model.parameters()).dtype, **kwargs)


def params_of(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def assert_same(ours: dict, theirs: dict, names=None, step=None) -> None:
    """Floating tensors of ``theirs`` (restricted to ``names``) against ours: to 1e-12 in
    float64, 1e-6 in float32."""
    want = {k: v for k, v in theirs.items()
            if torch.is_tensor(v) and v.is_floating_point() and (names is None or k in names)}
    assert want, "nothing compared"
    for k, v in want.items():
        tight = v.dtype == torch.float64
        torch.testing.assert_close(ours[k], v, rtol=1e-12 if tight else 1e-6,
                                   atol=1e-13 if tight else 1e-7,
                                   msg=lambda m, k=k: f"step {step}, {k}: {m}")


def assert_moved(ours: dict, model: nn.Module) -> None:
    """The average is not the model (so the comparisons could have failed)."""
    live = model.state_dict()
    assert any((ours[k] - live[k]).abs().max() > 1e-3
               for k, v in live.items() if v.is_floating_point())


def relative_gap(a: dict, b: dict, names) -> float:
    num = sum(float((a[n].double() - b[n].double()).norm() ** 2) for n in names)
    den = sum(float(b[n].double().norm() ** 2) for n in names)
    return math.sqrt(num / den)


# Ultralytics (installed without its dependencies) ---------------------------------------------

def ultralytics_model_ema():
    """``ModelEMA`` and ``unwrap_model`` from the installed torch_utils.py, run as written:
    importing the module needs OpenCV and a CUDA torch; the class needs only math, torch and
    deepcopy."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ultralytics is not installed")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "torch_utils.py"
    tree = ast.parse(path.read_text())
    wanted = {"ModelEMA", "unwrap_model"}
    nodes = [n for n in tree.body
             if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in wanted]
    assert {n.name for n in nodes} == wanted, f"{path} no longer defines {wanted}"
    namespace = {"__name__": "_ultralytics_model_ema", "math": math, "torch": torch, "nn": nn,
                 "deepcopy": copy.deepcopy, "TORCH_2_0": True, "TORCH_2_4": True}
    code = compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, namespace)
    return namespace["ModelEMA"]


@pytest.mark.parametrize("decay,tau", [(0.9999, 2000), (0.9, 5)])
def test_ultralytics_model_ema(decay, tau):
    ModelEMA = ultralytics_model_ema()
    model = net()
    peer = ModelEMA(model, decay=decay, tau=tau)
    # Ultralytics copies the model when it is built
    ema = EMA(model, smoothing=ExponentialRamp(decay=decay, tau=tau), copy_at_construction=True)
    for step in training(model):
        peer.update(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.ema.state_dict(), step=step)
    assert peer.updates == ema.num_updates - 1
    if tau < 100:
        assert_moved(ema.ema_state_dict(), model)


# YOLOX (ported) -----------------------------------------------------------------------------

class YOLOXModelEMA:
    """YOLOX's ModelEMA: a deepcopy at construction; ``updates += 1; d = decay * (1 -
    exp(-updates / 2000))``; floating state-dict entries ``v *= d; v += (1 - d) * msd[k]``."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, updates: int = 0) -> None:
        self.ema = copy.deepcopy(model).eval()
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / 2000))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            msd = model.state_dict()
            for k, v in self.ema.state_dict().items():
                if v.dtype.is_floating_point:
                    v *= d
                    v += (1.0 - d) * msd[k].detach()


@pytest.mark.parametrize("decay", [0.9999, 0.9])
def test_yolox_model_ema(decay):
    model = net()
    peer = YOLOXModelEMA(model, decay=decay)
    # YOLOX copies the model when it is built
    ema = EMA(model, smoothing=ExponentialRamp(decay=decay, tau=2000), copy_at_construction=True)
    for step in training(model, steps=40):
        peer.update(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.ema.state_dict(), step=step)


# torch_ema (installed) ----------------------------------------------------------------------

@pytest.mark.parametrize("use_num_updates", [True, False])
def test_torch_ema(use_num_updates):
    torch_ema = pytest.importorskip("torch_ema")
    model = net()
    peer = torch_ema.ExponentialMovingAverage(model.parameters(), decay=0.9,
                                              use_num_updates=use_num_updates)
    smoothing = RatioRamp(decay=0.9) if use_num_updates else 0.9
    # torch_ema copies the parameters when it is built
    ema = EMA(model, smoothing=smoothing, buffers="copy", copy_at_construction=True)
    names = params_of(model)
    for step in training(model):
        peer.update()
        ema.step()
        assert_same(ema.ema_state_dict(), dict(zip(names, peer.shadow_params, strict=True)),
                    names, step=step)
    assert_moved(ema.ema_state_dict(), model)


# d2go (ported) ------------------------------------------------------------------------------

class D2GoEMA:
    """d2go's EMAState (include_frozen=True, include_buffer=True) + EMAUpdater, driven as its
    EMAHook does: ``init_state`` (a copy) before training, ``update`` after each step.
    ``_num_updates += 1; decay = min(decay, (1 + n) / (factor + n))`` when
    ``decay_warm_up_factor >= 0``; float32/16 tensors by ``_foreach_mul_`` and
    ``_foreach_add_`` (or ``_foreach_lerp_`` with use_lerp), others by ``copy_(e * d + v *
    (1 - d))``."""

    def __init__(self, model: nn.Module, decay: float, use_lerp: bool = False,
                 decay_warm_up_factor: float = -1) -> None:
        self.decay, self.use_lerp, self.factor = decay, use_lerp, decay_warm_up_factor
        self._num_updates = 0 if decay_warm_up_factor >= 0 else -1
        self.state = {n: v.detach().clone() for n, v in self._iterate(model)}  # init_state

    @staticmethod
    def _iterate(model: nn.Module):
        yield from model.named_parameters()
        yield from model.named_buffers()

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay
        if self._num_updates >= 0:
            self._num_updates += 1
            decay = min(self.decay, (1 + self._num_updates) / (self.factor + self._num_updates))
        ema_list, param_list = [], []
        for name, val in self._iterate(model):
            ema_val = self.state[name]
            if val.dtype in (torch.float32, torch.float16):
                ema_list.append(ema_val)
                param_list.append(val)
            else:
                ema_val.copy_(ema_val * decay + val * (1.0 - decay))
        if self.use_lerp:
            torch._foreach_lerp_(ema_list, param_list, 1.0 - decay)
        else:
            torch._foreach_mul_(ema_list, decay)
            torch._foreach_add_(ema_list, param_list, alpha=1 - decay)


@pytest.mark.parametrize("factor,use_lerp", [(-1, False), (10, False), (3, True)])
def test_d2go_ema(factor, use_lerp):
    model = net(torch.float32)
    peer = D2GoEMA(model, decay=0.9, use_lerp=use_lerp, decay_warm_up_factor=factor)
    smoothing = 0.9 if factor < 0 else RatioRamp(decay=0.9, factor=factor)
    # d2go's EMAHook copies the model before training
    ema = EMA(model, smoothing=smoothing, copy_at_construction=True)
    for step in training(model):
        peer.update(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.state, step=step)
    assert_moved(ema.ema_state_dict(), model)


# MMEngine (installed) -----------------------------------------------------------------------

def _mmengine_model():
    pytest.importorskip("mmengine")
    from mmengine import model as mm

    return mm


@pytest.mark.parametrize("update_buffers", [False, True])
def test_mmengine_exponential_moving_average(update_buffers):
    mm = _mmengine_model()
    model = net()
    peer = mm.ExponentialMovingAverage(model, momentum=0.2, update_buffers=update_buffers)
    ema = EMA(model, smoothing=1 - 0.2, buffers="average" if update_buffers else "copy")
    for step in training(model):
        peer.update_parameters(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=step)
    assert_moved(ema.ema_state_dict(), model)


@pytest.mark.parametrize("momentum,gamma", [(0.0002, 100), (0.1, 3)])
def test_mmengine_momentum_annealing_ema(momentum, gamma):
    mm = _mmengine_model()
    model = net()
    peer = mm.MomentumAnnealingEMA(model, momentum=momentum, gamma=gamma)
    ema = EMA(model, smoothing=MomentumAnnealing(momentum=momentum, gamma=gamma),
                     buffers="copy")
    for step in training(model):
        peer.update_parameters(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=step)
    assert_moved(ema.ema_state_dict(), model)


def test_mmengine_stochastic_weight_average():
    mm = _mmengine_model()
    model = net()
    peer = mm.StochasticWeightAverage(model, update_buffers=True)
    ema = EMA(model, smoothing=RunningMean())
    for step in training(model):
        peer.update_parameters(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=step)
    assert_moved(ema.ema_state_dict(), model)


@pytest.mark.parametrize("kind", ["ema", "annealing", "swa"])
@pytest.mark.parametrize("n", [2, 3])
def test_mmengine_interval(kind, n):
    """interval=n > 1: MMEngine copies at its first call and updates at calls n + 1, 2n + 1,
    ...: ``update_interval=f"{n}ba", update_phase="start"`` (every n steps after the start
    copy), driven by ``ema.step()``."""
    mm = _mmengine_model()
    model = net()
    peer, smoothing = {
        "ema": (mm.ExponentialMovingAverage(model, momentum=0.2, interval=n), 0.8),
        "annealing": (mm.MomentumAnnealingEMA(model, momentum=0.01, gamma=4, interval=n),
                      MomentumAnnealing(momentum=0.01, gamma=4, interval=n)),
        "swa": (mm.StochasticWeightAverage(model, interval=n), RunningMean()),
    }[kind]
    ema = EMA(model, smoothing=smoothing, buffers="copy", update_interval=f"{n}ba",
              update_phase="start")
    for call in training(model):
        peer.update_parameters(model)
        ema.step()
        # parameters: MMEngine copies the buffers at every call, emakit's buffers="copy" at
        # its updates
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), params_of(model), step=call)
    assert ema.num_updates == 1 + (STEPS - 1) // n
    assert_moved(ema.ema_state_dict(), model)


def test_mmengine_interval_is_not_the_default_phase():
    """Without ``update_phase="start"`` emakit updates at steps n, 2n, ... (multiples of the
    interval), one step before MMEngine's n + 1, 2n + 1, ...: the same horizon, other
    numbers (up to 10% apart on this fast-moving run, n = 3, momentum 0.2). This measures
    the gap, so that the recipe's ``update_phase`` is seen to matter."""
    mm = _mmengine_model()
    n, model = 3, net()
    peer = mm.ExponentialMovingAverage(model, momentum=0.2, interval=n)
    ema = EMA(model, smoothing=0.8, update_interval=f"{n}ba", buffers="copy")
    names, gaps = params_of(model), []
    for _ in training(model, steps=60):
        peer.update_parameters(model)
        ema.step()
        gaps.append(relative_gap(ema.ema_state_dict(), peer.module.state_dict(), names))
    assert 0.01 < max(gaps[10:]) < 0.2, gaps


def _mmengine_runner(tmp_path, hooks, steps=STEPS):
    pytest.importorskip("mmengine")
    pytest.importorskip("cv2", reason="mmengine.runner imports OpenCV")
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader, TensorDataset

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = net()

        def forward(self, x, y, mode="loss"):
            return {"loss": nn.functional.mse_loss(self.net(x), y)}

    xs, ys = zip(*batches(steps), strict=True)
    data = TensorDataset(torch.cat(xs), torch.cat(ys))
    runner = Runner(
        model=Model(), work_dir=str(tmp_path),
        train_dataloader=DataLoader(data, batch_size=16, shuffle=False),
        train_cfg=dict(by_epoch=False, max_iters=steps, val_interval=10**9),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.2, momentum=0.9)),
        custom_hooks=hooks, default_hooks=dict(checkpoint=None, logger=None),
        default_scope="mmengine", log_level="ERROR",
    )
    return runner


@pytest.mark.parametrize("begin_iter,n", [(0, 1), (5, 1), (0, 3), (5, 3)])
def test_mmengine_ema_hook_begin_iter(tmp_path, begin_iter, n):
    """EMAHook(begin_iter=B, interval=n) in a real mmengine Runner: before iteration B it
    copies the model; at B its averaged model's first update copies again; it averages at
    B + n, B + 2n, ..."""
    from mmengine.hooks import EMAHook, Hook

    seen = []
    emakit_box = {}

    class Probe(Hook):
        priority = "LOWEST"  # after EMAHook's after_train_iter

        def before_train(self, runner):
            emakit_box["ema"] = EMA(runner.model, smoothing=0.8, buffers="copy",
                                    start=f"{max(begin_iter, 1)}ba", update_interval=f"{n}ba",
                                    update_phase="start")

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            ema = emakit_box["ema"]
            ema.step()
            peer = {k: v.clone() for k, v in hook.ema_model.module.state_dict().items()}
            seen.append((ema.ema_state_dict(), peer))

    hook = EMAHook(momentum=0.2, begin_iter=begin_iter, interval=n)
    runner = _mmengine_runner(tmp_path, [hook, Probe()])
    runner.train()
    assert len(seen) == STEPS
    # with n > 1, MMEngine copies the buffers at every iteration, emakit at its updates
    names = None if n == 1 else ["net." + k for k in params_of(net())]
    for step, (ours, theirs) in enumerate(seen, start=1):
        assert_same(ours, theirs, names, step=step)
    assert_moved(seen[-1][0], runner.model)


# Keras 3 on its torch backend (installed) ---------------------------------------------------

def _keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras runs on {keras.backend.backend()}, not torch")
    return keras


def _keras_model(keras):
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((4,), dtype="float64"),
        keras.layers.Dense(8, activation="tanh", dtype="float64"),
        keras.layers.Dense(2, dtype="float64"),
    ])


def _keras_data():
    xs, ys = zip(*batches(STEPS), strict=True)
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def _keras_fit(keras, model, optimizer, on_batch_end) -> None:
    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            on_batch_end()

    model.compile(optimizer=optimizer, loss="mse")
    x, y = _keras_data()
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[Probe()])


def _keras_names(model) -> dict[str, str]:
    """keras variable path -> its name in the torch state dict of the keras model."""
    names = dict.fromkeys(model.state_dict())
    out = {v.path: "_torch_params." + v.path for v in model.trainable_variables}
    assert all(n in names for n in out.values()), (list(names), out)
    return out


# Keras rounds ema_momentum to float32 (0.8 becomes 0.800000011920929): the tests use 0.75,
# which float32 holds exactly, to compare in float64.

KERAS_WARNINGS = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


@KERAS_WARNINGS
def test_keras_optimizer_use_ema():
    """``use_ema=True`` without overwrites: the optimizer copies at its first step and
    averages from the second. When fit() ends Keras writes the average into the model
    (``finalize_variable_values``): ``ema.copy_to()`` after training does the same."""
    keras = _keras()
    model = _keras_model(keras)
    opt = keras.optimizers.SGD(0.2, momentum=0.9, use_ema=True, ema_momentum=0.75)
    ema = EMA(model, smoothing=0.75)
    names = _keras_names(model)
    gaps = []

    def compare():
        ema.step()
        theirs = {names[v.path]: a.value.detach().clone()
                  for v, a in zip(opt._trainable_variables, opt._model_variables_moving_average,
                                  strict=True)}
        ours = ema.ema_state_dict()
        assert_same(ours, theirs, step=len(gaps) + 1)
        gaps.append(relative_gap(ours, model.state_dict(), list(theirs)))

    _keras_fit(keras, model, opt, compare)
    assert len(gaps) == STEPS and max(gaps) > 1e-2  # the average is not the model
    assert_same(model.state_dict(), ema.ema_state_dict(), step="end")  # Keras's overwrite


@KERAS_WARNINGS
def test_keras_optimizer_ema_overwrite_frequency():
    """``ema_overwrite_frequency=f``: after steps f, 2f, ... the model takes the average, and
    at the end of fit() too (``finalize_variable_values``). emakit: ``switch_every`` and a
    ``copy_to()`` after training. Two models, the same start: the overwrite changes the run."""
    keras = _keras()
    peer_model, our_model = _keras_model(keras), _keras_model(keras)
    our_model.set_weights(peer_model.get_weights())
    peer_opt = keras.optimizers.SGD(0.2, momentum=0.9, use_ema=True, ema_momentum=0.75,
                                    ema_overwrite_frequency=5)
    ema = EMA(our_model, smoothing=0.75, switch_every="5ba")
    # the peer's variables by position, under our model's state-dict names
    names = dict(zip([v.path for v in peer_model.trainable_variables],
                     _keras_names(our_model).values(), strict=True))
    peer_trace, our_trace = [], []

    def peer_probe():
        peer_trace.append((
            {names[v.path]: v.value.detach().clone() for v in peer_model.trainable_variables},
            {names[v.path]: a.value.detach().clone() for v, a in zip(
                peer_opt._trainable_variables, peer_opt._model_variables_moving_average,
                strict=True)}))

    def our_probe():
        ema.step()
        our_trace.append(({n: t.detach().clone() for n, t in our_model.state_dict().items()},
                          ema.ema_state_dict()))

    _keras_fit(keras, peer_model, peer_opt, peer_probe)
    _keras_fit(keras, our_model, keras.optimizers.SGD(0.2, momentum=0.9), our_probe)
    ema.copy_to()  # keras overwrites the model with the average when fit() ends
    assert len(peer_trace) == len(our_trace) == STEPS
    for step, ((p_model, p_avg), (o_model, o_avg)) in enumerate(
            zip(peer_trace, our_trace, strict=True), start=1):
        assert_same(o_avg, p_avg, step=step)
        assert_same(o_model, p_model, step=step)
    final = {names[v.path]: v.value for v in peer_model.trainable_variables}
    assert_same(our_model.state_dict(), final, step="end")


# optax (installed, jax on the CPU) ------------------------------------------------------------

def _optax_run(decay: float, debias: bool):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import numpy as np

    model = net()
    names = params_of(model)
    ema = EMA(model, smoothing=ZeroDebiased(decay=decay), buffers="copy")
    trace = []
    with jax.enable_x64(True):
        tx = optax.ema(decay, debias=debias)
        leaves = lambda: {n: jax.numpy.asarray(p.detach().numpy()) for n, p in  # noqa: E731
                          model.named_parameters()}
        state = tx.init(leaves())
        for step in training(model):
            out, state = tx.update(leaves(), state)
            ema.step()
            theirs = {n: torch.from_numpy(np.array(out[n])) for n in names}
            assert all(t.dtype == torch.float64 for t in theirs.values())
            trace.append((step, ema.ema_state_dict(), theirs))
    return model, names, trace


@pytest.mark.parametrize("decay", [0.9, 0.5])
def test_optax_ema_debias(decay):
    model, names, trace = _optax_run(decay, debias=True)
    for step, ours, theirs in trace:
        assert_same(ours, theirs, names, step=step)
    assert_moved(trace[-1][1], model)


def test_optax_ema_without_debias_is_a_scaled_average():
    """``debias=False`` hands out the zero-start average ``z_t``, whose weights add up to
    ``1 - d ** t``, not 1: no EMA of the weights gives it. It is exactly ``(1 - d ** t)``
    times the debiased average that ``ZeroDebiased`` reproduces; the relative gap is ``d **
    t`` (0.08 after 24 updates at d = 0.9, 0.37 after 1000 at d = 0.999)."""
    decay = 0.9
    _, names, trace = _optax_run(decay, debias=False)
    for step, ours, theirs in trace:
        scale = 1 - decay**step
        assert_same({n: scale * ours[n] for n in names}, theirs, names, step=step)
        assert relative_gap(theirs, ours, names) == pytest.approx(decay**step, rel=1e-9)


# TF1 tf.train.ExponentialMovingAverage (ported) --------------------------------------------

def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


class TF1ExponentialMovingAverage:
    """``ExponentialMovingAverage(decay, num_updates)``, ``apply(var_list)`` for Variables:
    the shadow is created with the variable's value at ``apply`` (construction), and each run
    of the op assigns ``shadow -= (1 - decay) * (shadow - var)`` with ``decay =
    min(decay, (1 + num_updates) / (10 + num_updates))``, computed in float32 (TF converts
    ``decay`` to a float32 tensor and casts ``num_updates`` to float32)."""

    def __init__(self, variables: list[torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = [v.detach().clone() for v in variables]

    @torch.no_grad()
    def run(self, variables: list[torch.Tensor], num_updates: int | None) -> None:
        decay = _f32(self.decay)
        if num_updates is not None:
            n = _f32(num_updates)
            decay = min(decay, _f32(_f32(1.0 + n) / _f32(10.0 + n)))
        one_minus = _f32(1.0 - decay)
        for s, v in zip(self.shadow, variables, strict=True):
            s.sub_((s - v) * one_minus)


@pytest.mark.parametrize("with_num_updates", [True, False])
def test_tf1_exponential_moving_average(with_num_updates):
    """The usual TF1 graph: ``ema.apply(var_list)`` under ``control_dependencies([opt_op])``
    with ``num_updates=global_step``, read after the optimizer's increment (1 at the first
    run)."""
    model = net(torch.float32)
    names = params_of(model)
    peer = TF1ExponentialMovingAverage(list(model.parameters()), decay=0.9)
    # TF1 creates the shadow variables with the weights at apply()
    ema = EMA(model, smoothing=RatioRamp(decay=0.9) if with_num_updates else 0.9,
              buffers="copy", copy_at_construction=True)
    for step in training(model):
        peer.run(list(model.parameters()), step if with_num_updates else None)
        ema.step()
        assert_same(ema.ema_state_dict(), dict(zip(names, peer.shadow, strict=True)), names,
                    step=step)
    assert_moved(ema.ema_state_dict(), model)


def test_tf1_zero_debias():
    """``assign_moving_average(..., zero_debias=True)`` (what ``apply`` does for Tensors that
    are not Variables, with ``zero_debias=True``): ``biased -= (biased - value) * (1 - d)``
    from 0, ``local_step += 1``, the average is ``biased / (1 - d ** local_step)``. In float64
    here (TF computes in the variable's dtype; the decay in float32)."""
    decay = _f32(0.9)
    model = net()
    names = params_of(model)
    biased = [torch.zeros_like(p) for p in model.parameters()]
    ema = EMA(model, smoothing=ZeroDebiased(decay=decay), buffers="copy")
    for step in training(model):
        with torch.no_grad():
            for b, p in zip(biased, model.parameters(), strict=True):
                b.sub_((b - p) * (1.0 - decay))
        unbiased = {n: b / (1 - decay**step) for n, b in zip(names, biased, strict=True)}
        ema.step()
        assert_same(ema.ema_state_dict(), unbiased, names, step=step)


# PaddleDetection (ported) -------------------------------------------------------------------

class PaddleModelEMA:
    """PaddleDetection's ModelEMA: the state starts at zeros (float32); ``update`` computes the
    decay from ``step`` (0 at the first update): ``'threshold'``: ``min(decay, (1 + step) /
    (10 + step))``, ``'normal'``: ``decay``; then ``v = decay * v + (1 - decay) *
    model.astype(float32)`` and ``step += 1``. ``apply`` hands out ``v / (1 - _decay **
    step)``, ``_decay`` being the last update's decay."""

    def __init__(self, model: nn.Module, decay: float = 0.9998,
                 ema_decay_type: str = "threshold") -> None:
        self.step, self.decay, self.ema_decay_type = 0, decay, ema_decay_type
        self.state_dict = {k: torch.zeros_like(v, dtype=torch.float32)
                           for k, v in model.state_dict().items()}
        self._decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.ema_decay_type == "threshold":
            decay = min(self.decay, (1 + self.step) / (10 + self.step))
        else:
            decay = self.decay
        self._decay = decay
        model_dict = model.state_dict()
        for k, v in self.state_dict.items():
            self.state_dict[k] = decay * v + (1 - decay) * model_dict[k].to(torch.float32)
        self.step += 1

    def apply(self, model: nn.Module) -> dict:
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        return {k: (v / (1 - self._decay**self.step)).to(dtypes[k])
                for k, v in self.state_dict.items()}


def test_paddledetection_normal_decay():
    model = net(torch.float32)
    peer = PaddleModelEMA(model, decay=0.9, ema_decay_type="normal")
    ema = EMA(model, smoothing=ZeroDebiased(decay=0.9))
    for step in training(model):
        peer.update(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.apply(model), step=step)
    assert_moved(ema.ema_state_dict(), model)


def paddle_threshold_weight_sum(decay: float, steps: int) -> list[float]:
    """What PaddleDetection's 'threshold' EMA hands out for a model whose weights are all 1:
    the sum of the weights it gives the models it saw (an average would give 1). float64."""
    v, out = 0.0, []
    for step in range(steps):
        d = min(decay, (1 + step) / (10 + step))
        v = d * v + (1 - d)
        out.append(v / (1 - d ** (step + 1)))
    return out


def test_paddledetection_threshold_is_not_an_average():
    """'threshold' (PaddleDetection's default) starts from zeros with decays ``min(decay, (1 +
    i) / (10 + i))`` and divides by ``1 - d_last ** t`` although the decays varied: the
    weights it gives the models sum to more than one (1.0154 at step 2, 1.0016 at 10,
    1.00013 from 1000 to 10000 for decay 0.9998). No EMA of the weights gives that. The
    closest call, ``RatioRamp(decay)`` from the first step (the same decays, a copy instead
    of zeros), is measured here against the port."""
    sums = paddle_threshold_weight_sum(0.9998, 1000)
    assert sums[0] == pytest.approx(1.0, rel=1e-15)
    assert sums[1] == pytest.approx(1.0154, abs=1e-4)
    assert sums[9] == pytest.approx(1.0016, abs=1e-4)
    assert sums[999] == pytest.approx(1.00013, abs=1e-5)

    model = net(torch.float32)
    names = params_of(model)
    peer = PaddleModelEMA(model, decay=0.9998, ema_decay_type="threshold")
    ema = EMA(model, smoothing=RatioRamp(decay=0.9998), buffers="copy")
    gaps = []
    for _ in training(model, steps=60):
        peer.update(model)
        ema.step()
        gaps.append(relative_gap(ema.ema_state_dict(), peer.apply(model), names))
    assert gaps[0] < 1e-6  # both copy at the first step
    assert 0.005 < gaps[1] < 0.05 and 1e-5 < gaps[-1] < 1e-3, gaps  # 1.5%, then 0.02%
