"""Post-hoc EMA files: atomic writes, checks on load, resume, no unpickling."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import emakit
from emakit.io import read_metadata, write_safetensors
from emakit.posthoc import list_snapshots
from emakit.posthoc.snapshots import LOCK_NAME

F64 = torch.float64


def walk(model: nn.Module, scale: float = 0.01) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def flat(sd: dict) -> torch.Tensor:
    return torch.cat([t.to(F64).flatten() for t in sd.values() if t.is_floating_point()])


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` but the writer lock (which holds a pid)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != LOCK_NAME}


def small_run(folder, steps=40, every=10, model=None, **kw):
    model = model or nn.Linear(4, 3)
    ph = emakit.PostHocEMA(model, snapshot_every=f"{every}ba", snapshot_dir=folder, **kw)
    for _ in range(steps):
        walk(model)
        ph.step()
    return model, ph


# clear errors -----------------------------------------------------------------------------


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="holds no snapshots"):
        emakit.synthesize(tmp_path, sigma_rel=0.1)
    with pytest.raises(ValueError, match="is not a folder"):
        emakit.synthesize(tmp_path / "nope", sigma_rel=0.1)


def test_truncated_and_foreign_files(tmp_path):
    small_run(tmp_path)
    good = sorted(tmp_path.glob("phema-*.safetensors"))
    data = good[-1].read_bytes()
    good[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{good[-1].name}.*not a complete safetensors"):
        emakit.synthesize(tmp_path, sigma_rel=0.1)
    good[-1].unlink()
    assert emakit.synthesize(tmp_path, sigma_rel=0.1)  # the rest still works
    write_safetensors(tmp_path / "phema-9999999999.safetensors", {"w": torch.ones(2)}, {})
    with pytest.raises(ValueError, match="not an emakit post-hoc snapshot"):
        emakit.synthesize(tmp_path, sigma_rel=0.1)


def test_snapshots_of_different_models(tmp_path):
    small_run(tmp_path / "a", model=nn.Linear(4, 3))
    small_run(tmp_path / "b", model=nn.Linear(4, 5))
    foreign = next((tmp_path / "b").glob("phema-*"))
    shutil.copy(foreign, tmp_path / "a" / "phema-0000000005.safetensors")
    with pytest.raises(ValueError, match="mixes snapshots of 2 different models"):
        emakit.synthesize(tmp_path / "a", sigma_rel=0.1)
    with pytest.raises(ValueError, match="snapshot_dir.*another model"):
        emakit.PostHocEMA(nn.Linear(2, 2), snapshot_dir=tmp_path / "b")


def test_snapshots_of_two_runs(tmp_path):
    model, _ = small_run(tmp_path)
    ph = emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=tmp_path)  # a new run
    walk(model)
    ph.step()
    with pytest.raises(ValueError, match="another training run"):
        ph.snapshot()
    shutil.copytree(tmp_path, tmp_path / "x")
    other = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=tmp_path / "y")
    other.step()
    p = other.snapshot()
    shutil.copy(p, tmp_path / "x" / "phema-0000000001.safetensors")
    with pytest.raises(ValueError, match="mixes snapshots of 2 training runs"):
        emakit.synthesize(tmp_path / "x", sigma_rel=0.1)


def test_target_outside_what_snapshots_represent(tmp_path):
    small_run(tmp_path, steps=20, every=10)  # two snapshots: a narrow range
    with pytest.raises(ValueError, match=r"sigma_rel: 0.01 \(profile error .*cannot be"):
        emakit.synthesize(tmp_path, sigma_rel=0.01)
    with pytest.raises(ValueError, match="sigma_rel"):
        emakit.synthesize(tmp_path, sigma_rel=0.3)
    assert emakit.synthesize(tmp_path, sigma_rel=0.01, max_error=None)  # forced
    with pytest.raises(ValueError, match="max_error"):
        emakit.synthesize(tmp_path, sigma_rel=0.1, max_error=-1)
    with pytest.raises(ValueError, match="sigma_rel: expected at least one"):
        emakit.synthesize(tmp_path, sigma_rel=[])
    with pytest.raises(TypeError, match="at"):
        emakit.synthesize(tmp_path, sigma_rel=0.1, at="10")


def test_bad_arguments(tmp_path):
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="snapshot_every"):
        emakit.PostHocEMA(m, snapshot_every="10sp")
    with pytest.raises(ValueError, match="sigma_rels"):
        emakit.PostHocEMA(m, sigma_rels=(0.1, 0.1))
    with pytest.raises(TypeError, match="sigma_rels"):
        emakit.PostHocEMA(m, sigma_rels=0.1)
    with pytest.raises(TypeError, match="snapshot_dtype"):
        emakit.PostHocEMA(m, snapshot_dtype=torch.int8)
    with pytest.raises(ValueError, match="update_interval"):
        emakit.PostHocEMA(m, update_interval="0ba")
    ph = emakit.PostHocEMA(m, snapshot_dir=tmp_path)
    with pytest.raises(RuntimeError, match="no update yet"):
        ph.snapshot()


# never unpickle ----------------------------------------------------------------------------


class _Bomb:
    def __reduce__(self):
        return (os.system, (f"touch {_Bomb.marker}",))


def test_loading_never_unpickles(tmp_path):
    _Bomb.marker = tmp_path / "pwned"
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / "phema-0000000010.safetensors").write_bytes(pickle.dumps({"w": _Bomb()}))
    with pytest.raises(ValueError, match="not a complete safetensors"):
        emakit.synthesize(snaps, sigma_rel=0.1)
    with pytest.raises(ValueError, match="not a complete safetensors"):
        emakit.PostHocEMA(nn.Linear(2, 2), snapshot_dir=snaps)
    assert not _Bomb.marker.exists()
    # a torch checkpoint holding the bomb is refused by the loader PostHocEMA's state needs
    buf = io.BytesIO()
    torch.save({"averages": _Bomb()}, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)
    assert not _Bomb.marker.exists()


# atomic writes -----------------------------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, torch, emakit
    torch.set_num_threads(1)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    ph = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=sys.argv[1],
                           snapshot_dtype=torch.float32)
    ph.step()
    ph.snapshot()
    print("ready", flush=True)
    while True:
        ph.step()
        ph.snapshot()
    """
)


def test_killed_writer_leaves_no_readable_partial_file(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for delay in (0.1, 0.3):
        folder = tmp_path / f"k{delay}"
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for p in folder.iterdir():
            if p.name.startswith("phema-"):
                read_metadata(p)  # every file under a final name is complete
            elif p.name != LOCK_NAME:  # the dead writer's lock, taken over by the next
                assert p.name.startswith(".") and p.name.endswith(".tmp")
        assert list_snapshots(folder)
        assert emakit.synthesize(folder, sigma_rel=0.1, max_error=None)
        shutil.rmtree(folder)  # tens of MB


def test_write_refuses_to_replace(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"a": torch.ones(3)}, {"k": "1"})
    before = p.read_bytes()
    with pytest.raises(FileExistsError):
        write_safetensors(p, {"a": torch.zeros(3)}, {"k": "2"})
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["x.safetensors"]


# resume ------------------------------------------------------------------------------------


def test_resume_is_exact_and_never_overwrites(tmp_path):
    torch.manual_seed(1)
    seq = [torch.randn(3, 4) for _ in range(40)]
    alt = [torch.randn(3, 4) for _ in range(40)]

    def drive(ph, model, weights):
        for w in weights:
            with torch.no_grad():
                model.weight.copy_(w)
            ph.step()

    # run A: 40 steps in one go (snapshots 10..40), state saved at 20
    model = nn.Linear(4, 3)
    folder = tmp_path / "snaps"
    a = emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=folder,
                          snapshot_dtype=torch.float32)
    drive(a, model, seq[:20])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    drive(a, model, seq[20:])
    full = a.ema_state_dict(0.05)
    before = digest(folder)
    assert len(before) == 4

    # run B: resumed from step 20 into the same folder, same weights: identical averages
    model_b = copy.deepcopy(model)
    b = emakit.PostHocEMA(model_b, snapshot_every="10ba", snapshot_dir=folder,
                          snapshot_dtype=torch.float32)
    buf.seek(0)
    with pytest.warns(UserWarning, match="2 snapshots past the resumed step 20"):
        b.load_state_dict(torch.load(buf, weights_only=True))
    drive(b, model_b, seq[20:])
    assert all(torch.equal(full[k], v) for k, v in b.ema_state_dict(0.05).items())
    after = digest(folder)
    assert {k: after[k] for k in before} == before  # nothing overwritten
    assert sorted(set(after) - set(before)) == ["phema-0000000030.r1.safetensors",
                                               "phema-0000000040.r1.safetensors"]

    # run C: resumed from 20 again, a different history, stopped at 30
    model_c = copy.deepcopy(model)
    c = emakit.PostHocEMA(model_c, snapshot_every="10ba", snapshot_dir=folder,
                          snapshot_dtype=torch.float32)
    buf.seek(0)
    with pytest.warns(UserWarning):
        c.load_state_dict(torch.load(buf, weights_only=True))
    drive(c, model_c, alt[20:30])
    used = list_snapshots(folder)
    assert [s.path.name for s in used] == ["phema-0000000010.safetensors",
                                          "phema-0000000020.safetensors",
                                          "phema-0000000030.r2.safetensors"]
    out = emakit.synthesize(folder, sigma_rel=0.05)
    assert torch.allclose(flat(out), flat(c.ema_state_dict(0.05)), rtol=0, atol=1e-6)


def test_state_dict_checks(tmp_path):
    model, ph = small_run(tmp_path / "a", steps=10)
    sd = ph.state_dict()
    other = emakit.PostHocEMA(model, sigma_rels=(0.05, 0.2), snapshot_dir=tmp_path / "b")
    with pytest.raises(ValueError, match="sigma_rels"):
        other.load_state_dict(sd)
    wrong = emakit.PostHocEMA(nn.Linear(4, 5), snapshot_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="does not match the model"):
        wrong.load_state_dict(sd)


# layout: tied weights, buffers, frozen tensors -------------------------------------------


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("buffers", ["average", "copy"])
def test_synthesized_state_dict_loads_strict(tmp_path, buffers):
    model = Tied()
    ph = emakit.PostHocEMA(model, snapshot_every="5ba", snapshot_dir=tmp_path, buffers=buffers)
    for _ in range(10):
        walk(model)
        with torch.no_grad():
            model.norm.running_mean.add_(1.0)
            model.norm.num_batches_tracked += 1
        ph.step()
    out = emakit.synthesize(tmp_path, sigma_rel=0.08, max_error=None)
    assert list(out) == list(model.state_dict())
    assert out["head.weight"] is out["emb.weight"]
    assert torch.equal(out["frozen.weight"], model.frozen.weight)
    assert int(out["norm.num_batches_tracked"]) == 10
    if buffers == "copy":
        assert torch.equal(out["norm.running_mean"], model.norm.running_mean)
    fresh = Tied()
    fresh.load_state_dict(out, strict=True)


# streaming synthesis: memory does not grow with the snapshot count -------------------------

_MEASURE = textwrap.dedent(
    """
    import os, sys, threading, time, torch, emakit
    torch.set_num_threads(1)
    page = os.sysconf("SC_PAGE_SIZE")
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    emakit.synthesize(sys.argv[1], sigma_rel=0.08, max_error=None)  # warm up: libraries
    peak, done = [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)
    base = rss()
    thread = threading.Thread(target=sample)
    thread.start()
    emakit.synthesize(sys.argv[2], sigma_rel=0.08, max_error=None)
    done.set()
    thread.join()
    print(max(peak[0], rss()) - base)
    """
)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
def test_synthesis_streams(tmp_path):
    """Peak resident memory of synthesize() over 10 fp16 snapshots (2 profiles each, i.e.
    10 fp32 model copies of data) stays under 3.5 fp32 model copies. glibc's dynamic mmap
    threshold is pinned so freed memory is returned and RSS tracks live memory."""
    model = nn.Sequential(nn.Linear(768, 768), nn.Linear(768, 768))
    nbytes = sum(p.numel() for p in model.parameters()) * 4
    ph = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=tmp_path / "big")
    for _ in range(10):
        ph.step()
        ph.snapshot()
    _, small = small_run(tmp_path / "small", steps=10)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "small"),
                          str(tmp_path / "big")], capture_output=True, text=True, env=env,
                         check=True)
    shutil.rmtree(tmp_path / "big")
    copies = int(out.stdout.split()[-1]) / nbytes
    print(f"synthesis peak: {copies:.2f} fp32 model copies over 10 snapshots")
    assert copies < 3.5


# hostile and unlucky folders (issue 11) ------------------------------------------------------


def _rewrite(path: Path, edit_meta=None, edit_tensors=None) -> None:
    """Rewrite a snapshot with its header or tensors changed (as a crafted file would be)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    sums = meta.pop("checksums", None) is not None  # recomputed for the new tensors
    meta.pop("header_checksum", None)  # and the header sealed again
    write_safetensors(path, tensors, meta, overwrite=True, checksums=sums)


def test_snapshot_dir_that_is_a_file_is_refused_at_once(tmp_path):
    blocker = tmp_path / "snaps"
    blocker.write_text("not a folder")
    model = nn.Linear(3, 2)
    ph = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=blocker)
    ph.step()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="snapshot_dir: .*snaps' exists and is not a folder"):
        ph.snapshot()  # 10,000 retries, then "too many snapshots of step 1" before
    assert time.perf_counter() - t0 < 1.0
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [("t", "1e400", "time t=inf"), ("t", "nan", "time t=nan"), ("gammas", "[NaN, 6.9]", "gamma"),
     ("gammas", f"[{emakit.sigma_rel_to_gamma(0.05)!r}, 6.0]",
      "gamma 6.0 is not that of sigma_rel 0.1"),
     ("sigma_rels", "[0.05, 1e-200]", "sigma_rel"), ("step", "-3", "step=-3"),
     ("time_unit", "tok", "time unit")],
)
def test_crafted_metadata_names_the_file(tmp_path, key, value, pattern):
    small_run(tmp_path, steps=20)
    victim = sorted(tmp_path.glob("phema-*"))[-1]
    _rewrite(victim, edit_meta=lambda m: m.__setitem__(key, value))
    for call in (lambda: list_snapshots(tmp_path), lambda: emakit.synthesize(tmp_path, 0.08)):
        with pytest.raises(ValueError, match=pattern) as err:  # INTERNAL ASSERT FAILED before
            call()
        assert victim.name in str(err.value)


def test_tensor_of_the_wrong_shape_names_the_file(tmp_path):
    small_run(tmp_path, steps=20)
    victim = sorted(tmp_path.glob("phema-*"))[0]

    def edit(tensors):
        for k in ("p0/weight", "p1/weight"):
            tensors[k] = torch.zeros(2, 4, dtype=tensors[k].dtype)

    _rewrite(victim, edit_tensors=edit)
    with pytest.raises(ValueError, match="wrong shape") as err:  # named no file before
        emakit.synthesize(tmp_path, 0.08)
    assert victim.name in str(err.value)


def test_corrupted_tensor_bytes_are_caught_by_the_checksum(tmp_path):
    small_run(tmp_path, steps=20, snapshot_dtype=torch.float32)
    good = emakit.synthesize(tmp_path, 0.08)
    victim = sorted(tmp_path.glob("phema-*"))[0]
    data = bytearray(victim.read_bytes())
    data[-6:-2] = b"\xff\xff\xff\x7f"  # a NaN in the last tensor's data; header intact
    victim.write_bytes(bytes(data))
    list_snapshots(tmp_path)  # headers are fine
    with pytest.raises(ValueError, match="is corrupted") as err:  # NaN weights before
        emakit.synthesize(tmp_path, 0.08)
    assert victim.name in str(err.value)
    # checksums are those of the bytes (zlib.crc32, independent of emakit) of each tensor
    import json
    import zlib

    from safetensors import safe_open

    other = sorted(tmp_path.glob("phema-*"))[1]
    with safe_open(str(other), framework="pt") as f:
        sums = json.loads(f.metadata()["checksums"])
        for k in f.keys():
            raw = f.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes()
            assert sums[k] == f"crc32:{zlib.crc32(raw):08x}", k
    assert all(torch.isfinite(t).all() for t in good.values() if t.is_floating_point())


def test_format_1_without_checksums_still_reads(tmp_path):
    small_run(tmp_path, steps=20)
    want = emakit.synthesize(tmp_path, 0.08)

    def v1(meta):
        meta["format_version"] = "1"
        del meta["checksums"]

    for p in tmp_path.glob("phema-*"):
        _rewrite(p, edit_meta=v1)
    got = emakit.synthesize(tmp_path, 0.08)
    assert all(torch.equal(got[k], want[k]) for k in want)


_HOLDER = textwrap.dedent(
    """
    import sys, torch, emakit
    model = torch.nn.Linear(3, 2)
    ph = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=sys.argv[1])
    ph.load_state_dict(torch.load(sys.argv[2], weights_only=True))
    ph.step()
    ph.snapshot()
    print("ready", flush=True)
    sys.stdin.readline()  # hold the folder until told to exit
    """
)


@pytest.mark.filterwarnings("ignore:emakit.*snapshots past the resumed step:UserWarning")
def test_two_runs_writing_one_folder_are_refused(tmp_path):
    folder, state = tmp_path / "snaps", tmp_path / "state.pt"
    model = nn.Linear(3, 2)
    ph = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=folder)
    ph.step()
    torch.save(ph.state_dict(), state)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def holder():
        proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(state)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        return proc

    def resumed():
        again = emakit.PostHocEMA(model, snapshot_every=None, snapshot_dir=folder)
        again.load_state_dict(torch.load(state, weights_only=True))
        again.step()
        again.step()
        return again

    proc = holder()
    try:
        with pytest.raises(ValueError, match=rf"being written by another process \(pid "
                                             rf"{proc.pid}"):  # silently mixed before
            resumed().snapshot()
    finally:
        proc.communicate(b"\n", timeout=60)  # a clean exit releases the lock
    assert not (folder / LOCK_NAME).exists()
    proc = holder()
    proc.send_signal(signal.SIGKILL)  # a dead writer's lock is taken over
    proc.wait()
    assert (folder / LOCK_NAME).exists()
    writer = resumed()
    assert writer.snapshot().exists()
    import json

    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_garbage_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text("not json")
    ph = emakit.PostHocEMA(nn.Linear(3, 2), snapshot_every=None, snapshot_dir=tmp_path)
    ph.step()
    assert ph.snapshot().exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [LOCK_NAME]
