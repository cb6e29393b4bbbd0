"""emakit.EMA on models prepared by a real accelerate.Accelerator (CPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from torch import nn  # noqa: E402

import emakit  # noqa: E402
from emakit.checkpoint import read_state  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "accelerate_ddp.py"
spec = importlib.util.spec_from_file_location("accelerate_ddp", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def fresh_accelerator(**kw) -> Accelerator:
    AcceleratorState._reset_state(reset_partial_state=True)  # one test's state must not leak
    return Accelerator(cpu=True, **kw)


def plain_loop() -> tuple:
    """The same loop without Accelerate."""
    model = script.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g)
    y = x.sum(1, keepdim=True).sin()
    ema = emakit.EMA(model, half_life="2ba", start="1ba")
    for _ in range(2):
        for i in range(0, 32, 8):
            nn.functional.mse_loss(model(x[i : i + 8]), y[i : i + 8]).backward()
            opt.step()
            opt.zero_grad()
            ema.step()
        ema.epoch_end()
    return model, ema


def test_prepared_model_and_save_state_round_trip(tmp_path):
    accelerator = fresh_accelerator()
    model, ema = script.train(accelerator)
    ref_model, ref = plain_loop()
    assert ema.num_updates == ref.num_updates == 8
    got, want = ema.ema_state_dict(), ref.ema_state_dict()
    assert list(got) == list(accelerator.unwrap_model(model).state_dict())
    for n in want:
        assert torch.equal(got[n], want[n]), n
    # Accelerate checkpoints the EMA with everything else once it is registered.
    accelerator.register_for_checkpointing(ema)
    accelerator.save_state(str(tmp_path / "state"))
    accelerator2 = fresh_accelerator()
    model2 = accelerator2.prepare(script.make_model())
    ema2 = emakit.EMA(model2, half_life="2ba", start="1ba")
    accelerator2.register_for_checkpointing(ema2)
    accelerator2.load_state(str(tmp_path / "state"))
    assert ema2.num_updates == 8 and ema2.counts == ema.counts
    for n, t in ema2.ema_state_dict().items():
        assert torch.equal(t, got[n]), n
    with ema2.swapped():  # evaluation on the average, through the prepared model
        out = model2(torch.ones(2, 3))
    ref_model.load_state_dict(want)
    assert torch.equal(out, ref_model(torch.ones(2, 3)))
    PartialState._reset_state()


def test_ddp_wrapped_by_accelerate_on_two_processes(tmp_path):
    # CPU ranks (gloo), also on a GPU machine
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["num_processes"] == 2 and r0["wrapper"] == "DistributedDataParallel"
    _, ref = plain_loop()
    want = ref.ema_state_dict()
    assert list(r0["ema"]) == list(want)  # no "module." prefix reached a name
    for n in want:
        assert torch.equal(r0["ema"][n], r1["ema"][n]), n
        torch.testing.assert_close(r0["ema"][n], want[n], rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_steps_the_ema_once_per_optimizer_step():
    """The docs' loop: accumulate() and ema.step() only when gradients were synchronized."""
    accelerator = fresh_accelerator(gradient_accumulation_steps=2)
    model = script.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())
    dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)  # 2 x 4 = one step of 8
    model, opt, dl = accelerator.prepare(model, opt, dl)
    ema = emakit.EMA(model, half_life="2ba", start="1ba")
    for _ in range(2):
        for xb, yb in dl:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.mse_loss(model(xb), yb))
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                ema.step()
        ema.epoch_end()
    _, ref = plain_loop()  # batches of 8, no accumulation
    assert ema.counts["ba"] == 8 and ema.num_updates == ref.num_updates == 8
    want = ref.ema_state_dict()
    for n, t in ema.ema_state_dict().items():
        torch.testing.assert_close(t, want[n], rtol=1e-5, atol=1e-6)
    PartialState._reset_state()


# emakit.integrations.accelerate.register ----------------------------------------------------


def _loop(accelerator, model, opt, helper, xs, ys, done: int = 0) -> list[dict]:
    """Micro-batches of 4 (2 accumulated), helper.step() after each; the weights after
    every optimizer step."""
    weights = []
    for i in range(done, len(xs)):
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.mse_loss(model(xs[i]), ys[i]))
            opt.step()
            opt.zero_grad()
        if helper.step(samples=len(xs[i])):
            weights.append({k: v.clone() for k, v in
                            accelerator.unwrap_model(model).state_dict().items()})
    return weights


def _prepared(config=None, **kw):
    from emakit.integrations.accelerate import register

    accelerator = fresh_accelerator(gradient_accumulation_steps=2, **kw)
    model = script.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    if config is None:
        helper = register(accelerator, emakit.EMA(model, half_life=3, start="20sp"))
    else:
        helper = register(accelerator, model, config=config)
    return accelerator, model, opt, helper


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, generator=g)
    return x.split(4), x.sum(1, keepdim=True).sin().split(4)


def test_register_steps_per_optimizer_step_and_resumes_bitwise(tmp_path):
    """register(accelerator, ema): with 2 accumulated micro-batches the average steps once per
    optimizer step (start="20sp": the samples of the accumulated micro-batches), against a
    float64 EMA of the weights; save_state writes the safe state file (nothing pickled for
    it) and load_state, in fresh objects, resumes bitwise, the step count with it."""
    from multiproc import replay

    xs, ys = _data()
    accelerator, model, opt, helper = _prepared()
    weights = _loop(accelerator, model, opt, helper, xs[:8], ys[:8])
    assert helper.steps == 4 and helper.ema.counts["sp"] == 32
    accelerator.save_state(str(tmp_path / "ckpt"))
    weights += _loop(accelerator, model, opt, helper, xs, ys, done=8)
    assert helper.steps == 8 and len(weights) == 8
    # 20 samples = 5 micro-batches: the start copy at optimizer step 3
    got, want = helper.ema.ema_state_dict(), replay(weights[2:], set(weights[0]), 2 ** (-1 / 3))
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-6, atol=1e-7)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "emakit_ema.safetensors" in files and not any("custom_checkpoint" in f for f in files)
    saved = read_state(tmp_path / "ckpt" / "emakit_ema.safetensors")
    assert saved["extra"] == {"steps": 4} and saved["ema"]["clock"]["ba"] == 4
    straight = helper.ema.state_dict()
    helper.remove()

    accelerator, model, opt, helper = _prepared()
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert helper.steps == 4  # restored, documented
    _loop(accelerator, model, opt, helper, xs, ys, done=8)
    again = helper.ema.state_dict()
    assert again["clock"] == straight["clock"] and again["num_updates"] == 6
    for k, v in straight["average"].items():
        assert torch.equal(again["average"][k], v), k
    helper.remove()
    PartialState._reset_state()


def test_register_logs_through_accelerate_trackers():
    """log_every=2: the statistics go to every tracker through accelerator.log."""
    from accelerate.tracking import GeneralTracker

    class Tracker(GeneralTracker):
        name, requires_logging_directory, main_process_only = "memory", False, True

        def __init__(self):
            super().__init__()
            self.logged = []

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    tracker = Tracker()
    xs, ys = _data()
    from emakit.integrations.accelerate import register

    accelerator = fresh_accelerator(gradient_accumulation_steps=2, log_with=[tracker])
    accelerator.init_trackers("run")
    model = script.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    model, opt = accelerator.prepare(model, opt)
    helper = register(accelerator, emakit.EMA(model, half_life="4ba", start="2ba",
                                              skip_nonfinite=True), log_every=2)
    _loop(accelerator, model, opt, helper, xs[:12], ys[:12])  # 6 optimizer steps
    assert [(s, v["ema/num_updates"], v["ema/skipped_updates"]) for s, v in tracker.logged] \
        == [(2, 1, 0), (4, 3, 0), (6, 5, 0)]
    assert all(v["ema/smoothing"] == pytest.approx(2 ** -0.25) for _, v in tracker.logged)
    assert helper.log(step=99) == tracker.logged[-1][1] and tracker.logged[-1][0] == 99
    helper.remove()
    PartialState._reset_state()


def test_register_drives_a_posthoc_ema_from_its_config(tmp_path):
    """register(accelerator, model, config=PostHocEMAConfig(...)): a PostHocEMA, its
    snapshots synthesizing as those of a plain PostHocEMA of the same weights, resumed
    bitwise through save_state/load_state."""
    def config(folder):
        return emakit.PostHocEMAConfig(sigma_rels=(0.05, 0.10), snapshot_every="2ba",
                                       snapshot_dir=tmp_path / folder, snapshot_dtype=None)

    xs, ys = _data()
    accelerator, model, opt, helper = _prepared(config("snaps"))
    assert isinstance(helper.ema, emakit.PostHocEMA)
    weights = _loop(accelerator, model, opt, helper, xs[:8], ys[:8])
    accelerator.save_state(str(tmp_path / "ckpt"))
    weights += _loop(accelerator, model, opt, helper, xs, ys, done=8)
    plain = script.make_model()
    ref = emakit.PostHocEMA(plain, config=config("plain"))
    for w in weights:
        plain.load_state_dict(w)
        ref.step()
    for sigma in (0.06, 0.09):  # the sweep after training
        got, want = (emakit.synthesize(tmp_path / d, sigma) for d in ("snaps", "plain"))
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    straight = helper.ema.state_dict()
    helper.remove()
    accelerator, model, opt, helper = _prepared(config("snaps-resumed"))
    accelerator.load_state(str(tmp_path / "ckpt"))
    _loop(accelerator, model, opt, helper, xs, ys, done=8)
    again = helper.ema.state_dict()
    assert again["clock"] == straight["clock"] and again["t"] == straight["t"]
    for a, b in zip(straight["averages"], again["averages"], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    helper.remove()
    PartialState._reset_state()


def test_register_refuses_what_it_cannot_do(tmp_path):
    from emakit.integrations.accelerate import register

    accelerator = fresh_accelerator()
    model = accelerator.prepare(script.make_model())
    ema = emakit.EMA(model)
    with pytest.raises(TypeError, match="accelerator"):
        register(object(), ema)
    with pytest.raises(TypeError, match="config"):
        register(accelerator, model)
    with pytest.raises(TypeError, match="config"):
        register(accelerator, ema, config=emakit.EMAConfig())
    with pytest.raises(ValueError, match="log_every"):
        register(accelerator, ema, log_every=0)
    helper = register(accelerator, ema)
    with pytest.raises(ValueError, match="registered on this accelerator already"):
        register(accelerator, emakit.EMA(model))
    other = register(accelerator, emakit.EMA(model), filename="slow_ema.safetensors")
    other.remove()
    accelerator.save_state(str(tmp_path / "a"))
    (tmp_path / "a" / "emakit_ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no state of the average"):
        accelerator.load_state(str(tmp_path / "a"))
    helper.remove()
    PartialState._reset_state()
