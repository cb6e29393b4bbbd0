"""Distributed checkpoints load without running code from the folder (issue 11).

``torch.distributed.checkpoint`` unpickles a folder's ``.metadata`` and every non-tensor value
with ``weights_only=False``; a crafted folder could run anything. Each payload here would create
a marker file when unpickled: the test fails if the marker appears or if loading is not refused
with a ValueError naming the checkpoint. Sharded save on 2 ranks and load on 3 (real gloo
processes) must still reproduce the saved average bitwise.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from ckpt_tools import data_folder, reseal
from multiproc import run_ranks

import emakit
from emakit import checkpoint
from emakit import distributed as edist

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:Detected an existing checkpoint:UserWarning"),
]

WORKER = Path(__file__).with_name("checkpoint_worker.py")


class Payload:
    """Unpickling this creates ``marker`` (as a malicious file would run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _ema(seed: int = 0) -> emakit.EMA:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ema = emakit.EMA(model, half_life="3ba")
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step()
    return ema


def _saved(tmp_path: Path) -> tuple[emakit.EMA, Path]:
    ema = _ema()
    folder = tmp_path / "ckpt"
    checkpoint.save(ema, folder)
    return ema, folder


def test_round_trip_bitwise(tmp_path):
    ema, folder = _saved(tmp_path)
    fresh = _ema(seed=1)
    edist.load(fresh, folder)  # the old import path still works
    want, got = ema.state_dict(), fresh.state_dict()
    assert got["num_updates"] == want["num_updates"]
    for name, t in want["average"].items():
        assert torch.equal(got["average"][name], t), name


def test_metadata_payload_is_refused(tmp_path):
    ema, folder = _saved(tmp_path)
    marker = tmp_path / "MARKER"
    (data_folder(folder) / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"checkpoint_id: .*\.metadata is corrupted"):
        checkpoint.load(ema, folder)  # an accident: the checksum
    reseal(folder)
    with pytest.raises(ValueError, match=r"checkpoint_id: .*\.metadata names .*open"):
        checkpoint.load(ema, folder)  # crafted: the restricted unpickler
    assert not marker.exists()


def _rewrite(folder: Path, edit) -> None:
    """Re-pickle the folder's metadata after ``edit(metadata)`` and reseal it (as an
    attacker could)."""
    data = data_folder(folder)
    md = checkpoint.read_metadata(data / ".metadata")
    edit(md, data)
    (data / ".metadata").write_bytes(pickle.dumps(md))
    reseal(folder)


def test_value_payload_is_refused(tmp_path):
    """A non-tensor value (a counter) replaced by a pickle that runs code."""
    ema, folder = _saved(tmp_path)
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)

    def edit(md, where):
        key = next(k for k in md.storage_data if k.fqn == "ema.num_updates")
        info = md.storage_data[key]
        data = (where / info.relative_path).read_bytes()
        (where / info.relative_path).write_bytes(data + buf.getvalue())
        info.offset, info.length = len(data), len(buf.getvalue())

    _rewrite(folder, edit)
    with pytest.raises(ValueError, match="'ema.num_updates' is not plain data"):
        checkpoint.load(ema, folder)
    assert not marker.exists()


def test_storage_outside_the_folder_is_refused(tmp_path):
    ema, folder = _saved(tmp_path)
    secret = tmp_path / "secret.bin"
    shutil.copy(next(data_folder(folder).glob("*.distcp")), secret)

    def edit(md, where):
        for info in md.storage_data.values():
            info.relative_path = "../secret.bin"

    _rewrite(folder, edit)
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        checkpoint.load(ema, folder)


@pytest.mark.parametrize("content", [b"", b"not a pickle", b"\x80\x04K\x01."])
def test_foreign_metadata_is_a_clear_error(tmp_path, content):
    ema, folder = _saved(tmp_path)
    (data_folder(folder) / ".metadata").write_bytes(content)
    reseal(folder)
    with pytest.raises(ValueError, match="is not checkpoint metadata"):
        checkpoint.load(ema, folder)


def test_missing_folder_and_file_as_folder(tmp_path):
    ema = _ema()
    with pytest.raises(ValueError, match="is not a folder"):
        checkpoint.load(ema, tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        checkpoint.save(ema, tmp_path / "file")


# real processes ------------------------------------------------------------------------


def launch(scenario: str, out: Path, world: int, timeout: float = 120.0) -> None:
    # gloo CPU ranks, also on a GPU machine
    run_ranks(WORKER, scenario, out, world, timeout=timeout, env={"CUDA_VISIBLE_DEVICES": ""})


def test_sharded_save_on_2_ranks_load_on_3_and_hostile_folder(tmp_path):
    launch("save", tmp_path, world=2)
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    launch("load", tmp_path, world=3)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert loaded["num_updates"] == saved["num_updates"] > 0
    assert saved["average"].keys() == loaded["average"].keys()
    for name, t in saved["average"].items():
        assert torch.equal(loaded["average"][name], t), name
    # the same folder with a payload in its metadata: refused on every rank, nothing runs
    hostile = tmp_path / "hostile"
    shutil.copytree(tmp_path / "ckpt", hostile)
    marker = tmp_path / "MARKER"
    (data_folder(hostile) / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(hostile)
    launch("hostile", tmp_path, world=2)
    messages = torch.load(tmp_path / "hostile.pt", weights_only=True)["messages"]
    assert all("refusing to load it" in m for m in messages), messages
    assert not marker.exists()
