"""The safe Accelerate recipe (issue 11): the EMA state goes through emakit's own
pickle-free file in ``save_state``/``load_state`` hooks, not ``register_for_checkpointing``
(whose ``load_state`` unpickles the object's state with ``weights_only=False``).

Real ``accelerate.Accelerator`` on the CPU; the resumed run must be bitwise the one that
never stopped, and a crafted file in the checkpoint folder must run nothing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch import nn  # noqa: E402

import emakit  # noqa: E402
from emakit.checkpoint import read_state, write_state  # noqa: E402


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def setup(seed: int = 0):
    AcceleratorState._reset_state(reset_partial_state=True)  # one test's state must not leak
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    ema = emakit.EMA(model, half_life="3ba")

    # the recipe of the README: the EMA state in ema.safetensors beside Accelerate's files
    def save_ema(models, weights, output_dir):
        state = ema.state_dict()  # on every process (a collective with shard=True)
        if accelerator.is_main_process:
            write_state(state, os.path.join(output_dir, "ema.safetensors"))

    def load_ema(models, input_dir):
        ema.load_state_dict(read_state(os.path.join(input_dir, "ema.safetensors")))

    accelerator.register_save_state_pre_hook(save_ema)
    accelerator.register_load_state_pre_hook(load_ema)
    return accelerator, model, opt, ema


def train(accelerator, model, opt, ema, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 3, generator=g)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True).sin())
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        ema.step()


def test_save_state_and_load_state_resume_the_ema_exactly(tmp_path):
    accelerator, model, opt, ema = setup()
    train(accelerator, model, opt, ema, range(4))
    accelerator.save_state(str(tmp_path / "ckpt"))
    train(accelerator, model, opt, ema, range(4, 8))
    want = ema.state_dict()
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "ema.safetensors" in files and not any(f.startswith("custom_checkpoint") for f in files)

    accelerator, model, opt, ema = setup(seed=1)  # other initial weights: all must be loaded
    accelerator.load_state(str(tmp_path / "ckpt"))
    train(accelerator, model, opt, ema, range(4, 8))
    got = ema.state_dict()
    assert got["num_updates"] == want["num_updates"] and got["clock"] == want["clock"]
    for name, t in want["average"].items():
        assert torch.equal(got["average"][name], t), name


def test_a_crafted_ema_file_runs_nothing(tmp_path):
    accelerator, model, opt, ema = setup()
    train(accelerator, model, opt, ema, range(2))
    accelerator.save_state(str(tmp_path / "ckpt"))
    marker = tmp_path / "MARKER"
    (tmp_path / "ckpt" / "ema.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="ema.safetensors is not a complete (safetensors|torch)"):
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert not marker.exists()


def test_register_for_checkpointing_unpickles_which_is_why(tmp_path):
    """What the recipe avoids: Accelerate's own path runs a crafted custom_checkpoint file
    (if a future Accelerate refuses it, this test says so and the docs can relax)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(nn.Linear(3, 1))
    ema = emakit.EMA(model, half_life="3ba")
    accelerator.register_for_checkpointing(ema)
    ema.step()
    accelerator.save_state(str(tmp_path / "ckpt"))
    pkl = next((tmp_path / "ckpt").glob("custom_checkpoint_0.pkl"))
    marker = tmp_path / "MARKER"
    torch.save(Payload(marker), pkl)
    with pytest.raises(Exception):  # noqa: B017 - the payload returns a file, not a state
        accelerator.load_state(str(tmp_path / "ckpt"))
    assert marker.exists(), "Accelerate no longer unpickles custom objects with code"


def test_state_file_refuses_what_it_cannot_store_and_corruption(tmp_path):
    with pytest.raises(TypeError, match=r"state\['x'\]: a object cannot be stored"):
        write_state({"x": object()}, tmp_path / "a.safetensors")
    state = {"w": torch.arange(6.0).reshape(2, 3), "n": 3, "s": "x", "f": float("nan"),
             "t": (1, [2, None]), "nested": {"b": torch.ones(2, dtype=torch.bfloat16)}}
    path = write_state(state, tmp_path / "s.safetensors")
    back = read_state(path)
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["nested"]["b"],
                                                              state["nested"]["b"])
    assert back["n"] == 3 and back["s"] == "x" and back["t"] == (1, [2, None])
    assert back["f"] != back["f"]  # NaN survives
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted"):
        read_state(path)
