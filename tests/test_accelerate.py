"""emakit.EMA on models prepared by a real accelerate.Accelerator (CPU)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from torch import nn  # noqa: E402

import emakit  # noqa: E402

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
