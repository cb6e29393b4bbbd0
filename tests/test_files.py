"""Files that cannot lie (issue 20): each case the issue measured on 22b934d, as a test.

Changed bytes are found (checksums over every byte, headers included), a header that agrees
with its checksum but not with what the state expects is refused, a killed writer's
temporaries are removed by the next write, two saves into one folder cannot both win, and
every argument is checked with an error that names it.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import emakit
from emakit import checkpoint
from emakit import distributed as edist
from emakit.checkpoint import read_state, write_state
from emakit.io import is_temporary, write_safetensors
from emakit.posthoc import list_snapshots

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
]


def same(a, b) -> bool:
    """Equal trees, tensors bitwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def trained_ema(steps: int = 3, seed: int = 0) -> emakit.EMA:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    ema = emakit.EMA(model, half_life="3ba")
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step()
    return ema


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if is_temporary(p))


# distributed checkpoints: checksums ------------------------------------------------------


def test_checkpoint_bit_flips_are_refused_never_loaded(tmp_path):
    """40 random single-bit flips over every file of a checkpoint (37 of 61 loaded with other
    averages before): each load raises a ValueError naming the flipped file."""
    ema = trained_ema()
    want = ema.state_dict()
    pristine = tmp_path / "pristine"
    checkpoint.save(ema, pristine)
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file())
    assert len(files) >= 2  # .metadata, a data file (and the pointer)
    rng = random.Random(20)
    for i in range(40):
        case = tmp_path / f"case{i}"
        shutil.copytree(pristine, case)
        victim = case / files[i % len(files)]
        data = bytearray(victim.read_bytes())
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        victim.write_bytes(bytes(data))
        fresh = trained_ema(seed=1)
        with pytest.raises(ValueError, match="checkpoint_id") as err:
            checkpoint.load(fresh, case)
        assert victim.name in str(err.value), (bit, str(err.value))
        assert same(fresh.state_dict()["average"], trained_ema(seed=1).state_dict()["average"])
        shutil.rmtree(case)
    fresh = trained_ema(seed=1)
    checkpoint.load(fresh, pristine)
    assert same(fresh.state_dict(), want)


def test_a_changed_tensor_is_named(tmp_path):
    ema = trained_ema()
    checkpoint.save(ema, tmp_path / "ck")
    data = next((tmp_path / "ck").rglob(".metadata")).parent
    md = checkpoint.read_metadata(data / ".metadata")
    key = next(k for k in md.storage_data if k.fqn == "ema.average.1.weight")
    info = md.storage_data[key]
    path = data / info.relative_path
    raw = bytearray(path.read_bytes())
    raw[info.offset + info.length - 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"__0_0.distcp: tensor or value 'ema.average.1.weight'"
                                         r" .*is corrupted"):
        checkpoint.load(trained_ema(seed=1), tmp_path / "ck")


def test_the_data_folder_alone_is_refused(tmp_path):
    """Loading a checkpoint's data folder directly would skip its checksums."""
    checkpoint.save(trained_ema(), tmp_path / "ck")
    data = next((tmp_path / "ck").glob("dcp-*"))
    with pytest.raises(ValueError, match="is the data folder of the checkpoint in"):
        checkpoint.load(trained_ema(seed=1), data)


_RACERS = textwrap.dedent(
    """
    import json, os, sys, time, warnings, torch, emakit
    from emakit import checkpoint
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out, rounds = sys.argv[1], int(sys.argv[2])
    emas = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        emas[seed] = emakit.EMA(torch.nn.Linear(512, 512), half_life="3ba")
        for _ in range(seed + 1):
            emas[seed].step()
    results = []
    for r in range(rounds):
        folder, go = f"{out}/ck{r}", f"{out}/go{r}"
        pids = []
        for seed in (1, 2):  # two processes, released together
            pid = os.fork()
            if pid == 0:
                while not os.path.exists(go):
                    pass
                try:
                    checkpoint.save(emas[seed], folder)
                    text = "ok"
                except FileExistsError as err:
                    text = f"exists {err}"
                with open(f"{out}/r{r}.{seed}", "w") as f:
                    f.write(text)
                os._exit(0)
            pids.append(pid)
        time.sleep(0.05)
        open(go, "w").close()
        for pid in pids:
            os.waitpid(pid, 0)
        results.append({s: open(f"{out}/r{r}.{s}").read() for s in (1, 2)})
    print(json.dumps(results))
    """
)


def test_two_saves_into_one_new_folder_exactly_one_wins(tmp_path):
    """Both reported success (one state lost) or one died with DCP's raw error before."""
    import json

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _RACERS, str(tmp_path), "4"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for r, result in enumerate(json.loads(out.stdout.strip().splitlines()[-1])):
        folder = tmp_path / f"ck{r}"
        winners = [int(s) for s, text in result.items() if text == "ok"]
        losers = [text for text in result.values() if text.startswith("exists")]
        assert len(winners) == 1 and len(losers) == 1, result
        assert f"checkpoint_id: {str(folder)!r}" in losers[0]
        loaded = emakit.EMA(nn.Linear(512, 512), half_life="3ba")
        checkpoint.load(loaded, folder)
        assert loaded.num_updates == winners[0] + 1  # the winner's state, whole
        names = sorted(p.name for p in folder.iterdir())
        assert len(names) == 2 and names[1] == "emakit-checkpoint.json", names  # loser gone


def test_save_over_an_old_layout_checkpoint(tmp_path):
    """emakit 0.1 folders (DCP files directly in the folder) still load; saving over one
    replaces it with the checksummed layout."""
    import torch.distributed.checkpoint as dcp

    old, new = trained_ema(2), trained_ema(4)
    folder = tmp_path / "ck"
    dcp.save({"ema": old.state_dict()}, storage_writer=dcp.FileSystemWriter(str(folder)))
    fresh = trained_ema(seed=1)
    checkpoint.load(fresh, folder)
    assert same(fresh.state_dict(), old.state_dict())
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        checkpoint.save(new, folder)
    checkpoint.save(new, folder, overwrite=True)
    assert not (folder / ".metadata").exists() and not list(folder.glob("*.distcp"))
    checkpoint.load(fresh, folder)
    assert same(fresh.state_dict(), new.state_dict())


# single-file states --------------------------------------------------------------------------


def test_state_header_flip_is_refused(tmp_path):
    """One bit turned a saved state's "k":12 into 13, silently, before."""
    path = write_state({"k": 12, "w": torch.arange(4.0)}, tmp_path / "s.safetensors")
    data = bytearray(path.read_bytes())
    at = data.index(b'\\"k\\":12') + len(b'\\"k\\":1')
    data[at] ^= 0x01  # '2' -> '3'
    assert b'\\"k\\":13' in data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"path: .*s.safetensors: its header is corrupted"):
        read_state(path)


def test_state_file_every_flip_and_cut_is_refused(tmp_path):
    state = trained_ema().state_dict()
    pristine = write_state(state, tmp_path / "p.safetensors")
    raw = pristine.read_bytes()
    rng = random.Random(3)
    victim = tmp_path / "v.safetensors"
    for i in range(60):
        data = bytearray(raw)
        if i < 45:
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        else:
            data = data[: rng.randrange(len(data))]
        victim.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="v.safetensors"):
            read_state(victim)
    assert same(read_state(pristine), state)


_KILLED_WRITE = textwrap.dedent(
    """
    import os, signal, sys, torch
    from emakit.checkpoint import write_state
    def die(fd):  # killed when the temporary is written, before it is synced and renamed
        os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = die
    write_state({"w": torch.zeros(1 << 20)}, sys.argv[1])
    """
)


def test_a_killed_write_state_leaves_nothing_after_the_next_write(tmp_path):
    """A killed write_state left a hidden 20-100 MB temporary that nothing removed."""
    path = tmp_path / "ema.safetensors"
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(path)])
    assert proc.returncode == -9
    assert len(temporaries(tmp_path)) == 1 and not path.exists()
    write_state({"w": torch.ones(3)}, path)
    assert temporaries(tmp_path) == []
    assert torch.equal(read_state(path)["w"], torch.ones(3))


def test_old_torch_save_state_files_still_load(tmp_path):
    """The Transformers callback wrote torch.save files: read_state reads them with
    weights_only=True, and refuses one that would run code."""
    ema = trained_ema()
    torch.save({"ema": ema.state_dict(), "global_step": 3}, tmp_path / "emakit_ema.pt")
    back = read_state(tmp_path / "emakit_ema.pt")
    assert back["global_step"] == 3 and same(back["ema"], ema.state_dict())
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"ema": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt holds objects that are not plain data"):
        read_state(tmp_path / "bad.pt")
    assert not marker.exists()


# post-hoc snapshots ---------------------------------------------------------------------------


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def snapshot_run(folder: Path, steps: int = 50) -> nn.Module:
    torch.manual_seed(0)
    model = Frozen()
    ph = emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=folder,
                           snapshot_dtype=torch.float32)
    for _ in range(steps):
        with torch.no_grad():
            model.lin.weight.add_(0.01 * torch.randn(3, 4))
        ph.step()
    return model


def rewrite(path: Path, edit_meta=None, edit_tensors=None) -> None:
    """A snapshot rewritten with its header or tensors changed and every checksum (the
    header's too) recomputed, as a crafted file would be."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    meta.pop("checksums"), meta.pop("header_checksum", None)
    write_safetensors(path, tensors, meta, overwrite=True, checksums=True)


def test_snapshot_time_flip_is_refused(tmp_path):
    """One bit turned a snapshot's time 50 into 10, silently, before."""
    snapshot_run(tmp_path)
    victim = tmp_path / "phema-0000000050.safetensors"
    data = bytearray(victim.read_bytes())
    at = data.index(b'"t":"50.0"') + len(b'"t":"')
    data[at] ^= 0x04  # '5' -> '1'
    assert b'"t":"10.0"' in data
    victim.write_bytes(bytes(data))
    for call in (lambda: list_snapshots(tmp_path), lambda: emakit.synthesize(tmp_path, 0.1)):
        with pytest.raises(ValueError, match="phema-0000000050.safetensors: its header is "
                                             "corrupted"):
            call()


def test_snapshot_times_are_checked_against_the_history(tmp_path):
    """A crafted time 10 (checksums recomputed) at step 50 is refused: earlier than the
    snapshot at step 40's; a time past the step it was written at too."""
    snapshot_run(tmp_path)
    victim = tmp_path / "phema-0000000050.safetensors"
    rewrite(victim, edit_meta=lambda m: m.__setitem__("t", "10.0"))
    with pytest.raises(ValueError, match=r"phema-0000000050.*t=10 is earlier than t=40"):
        emakit.synthesize(tmp_path, 0.1)
    rewrite(victim, edit_meta=lambda m: m.__setitem__("t", "60.0"))
    with pytest.raises(ValueError, match=r"phema-0000000050.*t=60 ba is later than the 50"):
        emakit.synthesize(tmp_path, 0.1)


@pytest.mark.parametrize("key", ["live/frozen.weight", "p0/lin.weight"])
def test_a_retyped_snapshot_tensor_is_refused(tmp_path, key):
    """A frozen tensor retyped F32 -> I32 (same bytes, checksums matching) made synthesize
    return int32 bit patterns for a float parameter."""
    model = snapshot_run(tmp_path)
    want = emakit.synthesize(tmp_path, 0.1)
    assert torch.equal(want["frozen.weight"], model.frozen.weight)
    victim = tmp_path / "phema-0000000050.safetensors"

    def retype(tensors):
        tensors[key] = tensors[key].view(torch.int32)

    rewrite(victim, edit_tensors=retype)
    name = key.split("/")[1]
    with pytest.raises(ValueError, match=rf"phema-0000000050.safetensors .*tensor {name!r} is "
                                         r"stored as \[.*'I32'\]"):
        emakit.synthesize(tmp_path, 0.1)


# strict arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, 1.0])
def test_flag_refuses_all_but_true_and_false(value):
    from emakit._args import flag

    with pytest.raises(TypeError, match=r"^overwrite: expected True or False, got"):
        flag(value, "overwrite")
    assert flag(True, "x") is True and flag(False, "x") is False


def test_checkpoint_arguments_are_named(tmp_path):
    ema = trained_ema()
    with pytest.raises(TypeError, match=r"^overwrite: expected True or False, got str 'no'"):
        edist.save(ema, tmp_path / "a", overwrite="no")  # acted as True before
    assert not (tmp_path / "a").exists()
    with pytest.raises(TypeError, match=r"^checkpoint_id: expected a path .*got int 5"):
        edist.save(ema, 5)
    with pytest.raises(TypeError, match=r"^ema: expected an object with state_dict\(\)"):
        edist.save(None, tmp_path / "b")
    with pytest.raises(TypeError, match=r"^ema: expected"):
        edist.load(None, tmp_path / "b")
    with pytest.raises(TypeError, match=r"^checkpoint_id: expected a path"):
        edist.load(ema, None)


def test_state_file_arguments_are_named(tmp_path):
    state = {"w": torch.ones(2)}
    with pytest.raises(TypeError, match=r"^path: expected a path .*got NoneType None"):
        write_state(state, None)
    with pytest.raises(ValueError, match=r"^path: .* is a folder; expected a file name"):
        write_state(state, tmp_path)
    path = write_state(state, tmp_path / "s.safetensors")
    with pytest.raises(TypeError, match=r"^overwrite: expected True or False, got str 'False'"):
        write_state({"w": torch.zeros(2)}, path, overwrite="False")  # acted as True before
    assert torch.equal(read_state(path)["w"], torch.ones(2))
    with pytest.raises(FileExistsError):
        write_state(state, path, overwrite=False)
    with pytest.raises(ValueError, match=r"^device: expected a torch.device .*'xyz'"):
        read_state(path, device="xyz")
    with pytest.raises(TypeError, match=r"^path: expected a path"):
        read_state(3)


def test_synthesize_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"^directory: expected a snapshot folder .*got int 5"):
        emakit.synthesize(5, 0.08)
    snapshot_run(tmp_path, steps=30)
    with pytest.raises(TypeError, match=r"^sigma_rel: required"):
        emakit.synthesize(tmp_path)
    plan = emakit.posthoc.plan_synthesis(tmp_path, [0.1])
    with pytest.raises(TypeError, match="a SynthesisPlan fixes them"):
        emakit.synthesize(plan, 0.2)
    assert same(emakit.synthesize(plan)[0], emakit.synthesize(tmp_path, 0.1))


def test_old_pickled_arguments_never_reach_a_loader(tmp_path):
    """A pickle saved under a .safetensors name is refused as a state, not unpickled."""
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "x.safetensors").write_bytes(pickle.dumps(Payload()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="x.safetensors"):
            read_state(tmp_path / "x.safetensors")
    assert not marker.exists()


def test_plain_safetensors_files_still_read(tmp_path):
    """A safetensors file without emakit's metadata (no seal to verify) still reads."""
    from safetensors.torch import save_file

    from emakit.io import read_header

    save_file({"a": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    assert read_header(tmp_path / "plain.safetensors") == ({}, {"a": ("F32", (2,))})
