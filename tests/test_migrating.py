"""The recipes of docs/migrating.md for timm, AveragedModel, Lightning, diffusers, ema-pytorch
and NeMo (the others are in test_peers.py): the installed peer and emakit side by side, compared
after every optimizer step on the same weights (CPU, a small MLP with BatchNorm).

NeMo is not installed (it is far too heavy for a test environment): its EMA formula is
ported below from NVIDIA/NeMo ``nemo/collections/common/callbacks/ema.py`` (commit
94bd3466f3ce13b975506890d4bff43df105b87c, ``EMAOptimizer.step``/``ema_update``) and used as
the reference. Composer's EMA is compared in tests/composer/ (Composer has its own venv).
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest
import torch
from torch import nn

import emakit
from emakit.schedules import RatioRamp, RunningMean

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


STEPS = 24


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2))


def training(model: nn.Module, steps: int = STEPS):
    """SGD with momentum on random data; yields after each optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        yield


def floats(state: dict, names=None) -> dict:
    return {k: v for k, v in state.items()
            if v.is_floating_point() and (names is None or k in names)}


def assert_same(emakit_state: dict, peer_state: dict, names=None, step=None) -> None:
    """Within float32 rounding: the peers multiply-add or lerp in float32 in their own order."""
    want = floats(peer_state, names)
    assert want, "nothing compared"
    for k, v in want.items():
        torch.testing.assert_close(emakit_state[k], v, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, k=k: f"step {step}, {k}: {m}")


def assert_moved(emakit_state: dict, model: nn.Module) -> None:
    """The average is not the model itself (so the comparisons could have failed)."""
    live = model.state_dict()
    assert any((emakit_state[k] - live[k]).abs().max() > 1e-3 for k in floats(live))


def timm_model_ema():
    """timm's model_ema.py, loaded from the installed file: `import timm` imports
    torchvision, which need not import beside a CPU torch; model_ema.py imports only torch."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "utils", "model_ema.py")
    loader = importlib.util.spec_from_file_location("_timm_model_ema", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


PARAMS = [n for n, _ in net().named_parameters()]


# timm --------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["ModelEmaV2", "ModelEmaV3"])
def test_timm_without_step(version):
    """ModelEmaV2(model, decay) / ModelEmaV3(model, decay), update(model) every step."""
    model = net()
    peer = getattr(timm_model_ema(), version)(model, decay=0.8)
    ema = emakit.EMA(model, smoothing=0.8, copy_at_construction=True)  # timm copies here too
    for i, _ in enumerate(training(model)):
        peer.update(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=i)
    assert_moved(ema.ema_state_dict(), model)


@pytest.mark.parametrize("update_after_step", [0, 5])
def test_timm_v3_with_step_no_warmup(update_after_step):
    """ModelEmaV3(model, decay, update_after_step=N), update(model, step=num_updates) as
    timm's train.py drives it: steps up to N + 1 copy the model."""
    model = net()
    peer = timm_model_ema().ModelEmaV3(model, decay=0.8, update_after_step=update_after_step)
    ema = emakit.EMA(model, smoothing=0.8, start=f"{update_after_step + 1}ba")
    for i, _ in enumerate(training(model)):
        peer.update(model, step=i + 1)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=i)
    assert_moved(ema.ema_state_dict(), model)


@pytest.mark.parametrize("gamma,power,min_decay,after", [
    (1.0, 2 / 3, 0.0, 0), (1.0, 3 / 4, 0.0, 3), (10.0, 2 / 3, 0.3, 0), (1.0, 1.0, 0.0, 0),
])
def test_timm_v3_with_warmup(gamma, power, min_decay, after):
    model = net()
    peer = timm_model_ema().ModelEmaV3(
        model, decay=0.95, min_decay=min_decay, update_after_step=after, use_warmup=True,
        warmup_gamma=gamma, warmup_power=power)
    ema = emakit.EMA(model, smoothing=0.95, start=f"{after + 1}ba", warmup=emakit.PowerWarmup(
        inv_gamma=gamma, power=power, min_smoothing=min_decay))
    for i, _ in enumerate(training(model)):
        peer.update(model, step=i + 1)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=i)
    assert_moved(ema.ema_state_dict(), model)


# torch AveragedModel ------------------------------------------------------------------------

def test_torch_averaged_model_ema():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = net()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    ema = emakit.EMA(model, smoothing=0.8)
    for i, _ in enumerate(training(model)):
        peer.update_parameters(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=i)
    assert_moved(ema.ema_state_dict(), model)


def test_torch_averaged_model_swa_running_mean():
    from torch.optim.swa_utils import AveragedModel

    model = net()
    peer = AveragedModel(model, use_buffers=True)  # equal weights: the running mean
    ema = emakit.EMA(model, smoothing=RunningMean())
    for i, _ in enumerate(training(model)):
        peer.update_parameters(model)
        ema.step()
        assert_same(ema.ema_state_dict(), peer.module.state_dict(), step=i)
        assert ema.num_updates == int(peer.n_averaged)
    assert_moved(ema.ema_state_dict(), model)


# Lightning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("starting_at,every", [(None, 1), (4, 1), (None, 3), (4, 3)])
def test_lightning_ema_weight_averaging(starting_at, every):
    """EMAWeightAveraging(update_starting_at_step=m, update_every_n_steps=n) updates at the
    zero-based step indices ``i >= m`` with ``i % n == 0`` (global steps 1, n + 1, ...), the
    first one copying: the start copy at the first of them, then every n steps after it."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.utils.data import DataLoader, TensorDataset

    from emakit.integrations.lightning import EMACallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    peer = EMAWeightAveraging(decay=0.8, update_starting_at_step=starting_at,
                              update_every_n_steps=every)
    m = starting_at or 0
    first = 1 + every * math.ceil(m / every)  # step_idx is global_step - 1
    ours = EMACallback(smoothing=0.8, start=f"{first}ba", update_interval=f"{every}ba",
                       update_phase="start")
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            averaged = peer._average_model.module.state_dict()  # the peer's own average
            seen.append((ours.ema.ema_state_dict(), {k: v.clone() for k, v in averaged.items()},
                         ours.ema.started))

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(96, 4, generator=g), torch.randn(96, 2, generator=g))
    pl.Trainer(max_epochs=2, callbacks=[peer, ours, Probe()], logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(
        Module(), DataLoader(data, batch_size=8))
    assert len(seen) == STEPS
    for i, (got, want, started) in enumerate(seen):
        if started:  # before its start the peer holds the weights at construction
            assert_same(got, {"net." + k if not k.startswith("net.") else k: v
                              for k, v in want.items()}, step=i)
    assert sum(s for *_, s in seen) == STEPS - first + 1


# diffusers ---------------------------------------------------------------------------------

def _diffusers_ema():
    pytest.importorskip("diffusers")
    from diffusers.training_utils import EMAModel

    return EMAModel


def _diffusers_state(peer, model) -> dict:
    return {n: s for (n, _), s in zip(model.named_parameters(), peer.shadow_params, strict=True)}


@pytest.mark.parametrize("after,min_decay", [(0, 0.0), (3, 0.0), (2, 0.5)])
def test_diffusers_default_decay_schedule(after, min_decay):
    """EMAModel without use_ema_warmup: the decay is max(min_decay, min(decay, (1 + s) /
    (10 + s)))."""
    EMAModel = _diffusers_ema()
    model = net()
    peer = EMAModel(model.parameters(), decay=0.95, min_decay=min_decay,
                    update_after_step=after)
    ema = emakit.EMA(model, smoothing=RatioRamp(decay=0.95, min_smoothing=min_decay),
                     start=f"{after + 1}ba")
    for i, _ in enumerate(training(model)):
        peer.step(model.parameters())
        ema.step()
        assert_same(ema.ema_state_dict(), _diffusers_state(peer, model), PARAMS, step=i)
    assert_moved(ema.ema_state_dict(), model)


@pytest.mark.parametrize("gamma,power,min_decay,after", [
    (1.0, 2 / 3, 0.0, 0), (10.0, 3 / 4, 0.2, 2),
])
def test_diffusers_ema_warmup(gamma, power, min_decay, after):
    EMAModel = _diffusers_ema()
    model = net()
    peer = EMAModel(model.parameters(), decay=0.95, min_decay=min_decay, update_after_step=after,
                    use_ema_warmup=True, inv_gamma=gamma, power=power)
    ema = emakit.EMA(model, smoothing=0.95, start=f"{after + 1}ba", warmup=emakit.PowerWarmup(
        inv_gamma=gamma, power=power, min_smoothing=min_decay))
    for i, _ in enumerate(training(model)):
        peer.step(model.parameters())
        ema.step()
        assert_same(ema.ema_state_dict(), _diffusers_state(peer, model), PARAMS, step=i)
    assert_moved(ema.ema_state_dict(), model)


# ema-pytorch -------------------------------------------------------------------------------

@pytest.mark.parametrize("after,gamma,power,min_value", [
    (0, 1.0, 2 / 3, 0.0), (4, 1.0, 3 / 4, 0.0), (2, 10.0, 2 / 3, 0.3),
])
def test_ema_pytorch_ema(after, gamma, power, min_value):
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = net()
    peer = ema_pytorch.EMA(model, beta=0.95, update_after_step=after, update_every=1,
                           inv_gamma=gamma, power=power, min_value=min_value)
    ema = emakit.EMA(model, smoothing=0.95, start=f"{after + 1}ba", warmup=emakit.PowerWarmup(
        inv_gamma=gamma, power=power, min_smoothing=min_value))
    for i, _ in enumerate(training(model)):
        peer.update()
        ema.step()
        assert_same(ema.ema_state_dict(), peer.ema_model.state_dict(), step=i)
    assert_moved(ema.ema_state_dict(), model)


def test_ema_pytorch_post_hoc_profiles(tmp_path):
    """ema-pytorch's KarrasEMA evaluates beta at its step t + 1: the paper's power EMA over
    the weights with the first one counted twice. emakit's PostHocEMA, with step() called
    twice after the first optimizer step, gives its profiles step for step."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = net()
    sigma_rels = (0.05, 0.28)
    peer = ema_pytorch.PostHocEMA(model, sigma_rels=sigma_rels, update_every=1,
                                  checkpoint_every_num_steps=10 ** 9,
                                  checkpoint_folder=str(tmp_path / "peer"))
    ph = emakit.PostHocEMA(model, sigma_rels=sigma_rels, snapshot_every=None,
                           snapshot_dir=tmp_path / "ours")
    for i, _ in enumerate(training(model)):
        peer.update()
        ph.step()
        if i == 0:
            ph.step()  # the first weights count twice, as in ema-pytorch
        for j, sigma_rel in enumerate(sigma_rels):
            assert_same(ph.ema_state_dict(sigma_rel), peer.ema_models[j].ema_model.state_dict(),
                        step=i)
    assert_moved(ph.ema_state_dict(sigma_rels[0]), model)


# NeMo (formula ported from its source; see the module docstring) ---------------------------

class NeMoEMAReference:
    """NeMo's EMAOptimizer: at the first optimizer step it copies the parameters *before* the
    step; after each step with ``current_step % every_n_steps == 0`` (current_step counting
    from 0) it runs ``ema *= decay; ema += (1 - decay) * param`` (``torch._foreach_mul_`` and
    ``torch._foreach_add_``). Parameters only."""

    def __init__(self, model: nn.Module, decay: float, every_n_steps: int = 1) -> None:
        self.model, self.decay, self.every_n_steps = model, decay, every_n_steps
        self.current_step, self.ema_params = 0, None

    def before_optimizer_step(self) -> None:
        if self.ema_params is None:
            self.ema_params = tuple(p.detach().clone() for p in self.model.parameters())

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.current_step % self.every_n_steps == 0:
            params = tuple(p.detach() for p in self.model.parameters())
            torch._foreach_mul_(self.ema_params, self.decay)
            torch._foreach_add_(self.ema_params, params, alpha=1.0 - self.decay)
        self.current_step += 1

    def state(self) -> dict:
        names = [n for n, _ in self.model.named_parameters()]
        return dict(zip(names, self.ema_params, strict=True))


def test_nemo_ema():
    model = net()
    peer = NeMoEMAReference(model, decay=0.8)
    # NeMo copies the weights before the first optimizer step
    ema = emakit.EMA(model, smoothing=0.8, buffers="copy", copy_at_construction=True)
    peer.before_optimizer_step()
    for i, _ in enumerate(training(model)):
        peer.after_optimizer_step()
        ema.step()
        assert_same(ema.ema_state_dict(), peer.state(), PARAMS, step=i)
    assert_moved(ema.ema_state_dict(), model)


# the table of docs/migrating.md ------------------------------------------------------------

def test_every_recipe_in_the_table_names_a_test_that_exists():
    """Each row of the "At a glance" table names its tests (``test_x``, ``test_x_*`` or a
    folder): each must exist, so that the table never points at a test that was renamed."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "migrating.md").read_text()
    table = text.split("## At a glance", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    tests = set()
    for path in (root / "tests").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        tests |= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert len(rows) > 20
    for row in rows[1:]:  # the header first
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        names = re.findall(r"`([^`]+)`", cell)
        assert names, row
        for name in names:
            if name.endswith("/"):
                assert (root / name).is_dir(), row
            elif name.endswith("*"):
                assert any(t.startswith(name[:-1]) for t in tests), row
            else:
                assert name in tests, row
