"""Fault injection for every file emakit writes (issue 20), driven by tests/test_faults.py:

    python tests/fault_worker.py SCENARIO OUTDIR SEED TIER        (TIER: fast | full)

Prints one JSON line of counts: kills, flips, truncations, refused (a ValueError or
FileExistsError naming the file), loaded (equal to a completely saved state), silent
(loaded, but equal to no completely saved state: must be 0) and failures (anything else).

Kills. A writer runs in a forked process group (one process, or two gloo ranks) and dies by
SIGKILL, the whole group at once as a killed job would, either

- at a chosen point: every file operation of the writer (open for writing, write, fsync,
  rename, replace, link, unlink, mkdir, rmdir) is a point before it and one after it, a
  write cut in the middle before it (the bytes so far flushed to the OS); the points are
  counted in a dry run, then each case kills at one of them; or
- after a random delay within the dry run's duration.

Then, in this process: every load must return a state equal, tensor by tensor bitwise, to
one the writer or the setup completely saved (the old one or the new one), or raise a
ValueError naming the file; the next write must succeed and leave no temporaries behind.

Corruption. A copy of each file kind (state file, snapshot, checkpoint pointer, DCP
metadata, DCP data files of 1 and 2 ranks) gets one random bit flipped or is cut at a random
length; loading must raise a ValueError naming the file, or return the saved state exactly
(only bytes no load reads may change without an error: the copied tensors of snapshots
before the target).

The references are what the writers held in memory (full tensors, gathered with
``DTensor.full_tensor()`` under FSDP2), saved with ``torch.save``, never what emakit's
loaders return.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import io
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import emakit
from emakit import checkpoint
from emakit.io import is_temporary
from emakit.posthoc import list_snapshots

warnings.simplefilter("ignore")
torch.set_num_threads(1)  # forked children: no OpenMP pool to inherit

POINTER = "emakit-checkpoint.json"  # the checkpoint's pointer file
FAST = {"kills": 6, "delays": 1, "flips": 16, "cuts": 6}
FULL = {"kills": 400, "delays": 100, "flips": 400, "cuts": 100}


# kill points ------------------------------------------------------------------------------


class Faults:
    """Counts the file operations of a writer; SIGKILLs its process group at point
    ``kill_at`` (1-based). Installed only in forked writer processes."""

    def __init__(self, kill_at: int | None, seed: int) -> None:
        self.kill_at = kill_at
        self.points = 0
        self.labels: list[str] = []
        self.on = False
        self.rng = random.Random(seed)

    def point(self, label: str, cut=None) -> None:
        if not self.on:
            return
        self.points += 1
        self.labels.append(label)
        if self.points == self.kill_at:
            if cut is not None:
                cut()
            os.killpg(os.getpgrp(), signal.SIGKILL)


FAULTS: Faults | None = None
_open, _io_open = builtins.open, io.open


class _Writer:
    """A file opened for writing, each write a kill point (cut in the middle) before and
    one after."""

    def __init__(self, f: Any, name: str) -> None:
        self._f, self._name = f, name

    def write(self, data: Any) -> int:
        view = data if isinstance(data, str) else memoryview(data).cast("B")

        def cut() -> None:
            self._f.write(view[: FAULTS.rng.randrange(len(view))] if len(view) else view)
            self._f.flush()

        FAULTS.point(f"write-cut:{self._name}", cut)
        n = self._f.write(data)
        FAULTS.point(f"write:{self._name}")
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)


def _opener(real):
    def open_(file, mode="r", *args, **kwargs):
        if not any(c in mode for c in "wax+"):
            return real(file, mode, *args, **kwargs)
        name = os.path.basename(str(file))
        FAULTS.point(f"open:{name}")
        f = real(file, mode, *args, **kwargs)
        FAULTS.point(f"opened:{name}")
        return _Writer(f, name)

    return open_


def _op(name: str, real):
    def call(*args, **kwargs):
        label = f"{name}:{os.path.basename(str(args[0])) if args else ''}"
        FAULTS.point(label)
        out = real(*args, **kwargs)
        FAULTS.point(label + "+")
        return out

    return call


def install(kill_at: int | None, seed: int) -> None:
    global FAULTS
    FAULTS = Faults(kill_at, seed)
    builtins.open = _opener(_open)
    io.open = _opener(_io_open)
    for name in ("fsync", "replace", "rename", "link", "unlink", "remove", "mkdir", "rmdir"):
        setattr(os, name, _op(name, getattr(os, name)))
    real_os_open = os.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            FAULTS.point(f"os.open:{os.path.basename(str(path))}")
        return real_os_open(path, flags, *args, **kwargs)

    os.open = os_open


@contextlib.contextmanager
def armed():
    FAULTS.on = True
    try:
        yield
    finally:
        FAULTS.on = False


# jobs: forked process groups ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(writer, world: int, out: Path, kill_at: tuple[int, int] | None, delay: float | None,
            seed: int) -> str:
    """Run ``writer(rank, world, out)`` on ``world`` forked ranks in a new process group;
    ``kill_at = (rank, point)``. Returns "done", "killed" or "error: ..."."""
    port = free_port()
    job = os.fork()
    if job == 0:  # the job: its own process group, the ranks inside it
        os.setpgid(0, 0)
        code = 0
        try:
            pids = []
            for r in range(world):
                pid = os.fork()
                if pid == 0:
                    _rank_main(writer, r, world, port, out, kill_at, seed)
                pids.append(pid)
            for pid in pids:
                _, status = os.waitpid(pid, 0)
                code = code or os.waitstatus_to_exitcode(status)
        finally:
            os._exit(1 if code else 0)
    if delay is not None:
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job, signal.SIGKILL)
    _, status = os.waitpid(job, 0)
    _wait_gone(out)
    if os.WIFSIGNALED(status):
        return "killed"
    if os.waitstatus_to_exitcode(status) != 0:
        log = (out / "error.txt").read_text() if (out / "error.txt").exists() else "?"
        return f"error: {log[-3000:]}"
    return "done"


def _wait_gone(out: Path) -> None:
    """Wait until the ranks of a killed job have died (the kernel takes a moment)."""
    with contextlib.suppress(OSError, ValueError):
        pids = [int(p.read_text()) for p in out.glob("pid.*")]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.01)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _rank_main(writer, rank: int, world: int, port: int, out: Path, kill_at, seed: int) -> None:
    code = 0
    try:
        (out / f"pid.{rank}").write_text(str(os.getpid()))  # before any kill point
        target = kill_at[1] if kill_at is not None and kill_at[0] == rank else None
        install(target, seed * 7919 + rank)
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world, timeout=datetime.timedelta(seconds=60))
        writer(rank, world, out)
        (out / f"points.{rank}.json").write_text(json.dumps(FAULTS.labels))
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        code = 1
        with contextlib.suppress(Exception):
            (out / "error.txt").write_text(traceback.format_exc())
    finally:
        sys.stdout.flush()
        os._exit(code)


# states -------------------------------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 5))


def train(model: nn.Module, ema: Any, steps: int, scale: float) -> None:
    """Elementwise changes only: the same numbers on FSDP2 shards as on whole tensors."""
    for step in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(scale * (step + 1))
        ema.step()


def full(value: Any) -> Any:
    """A state with every DTensor gathered (a collective under FSDP2)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value.clone() if isinstance(value, torch.Tensor) else value


def same(a: Any, b: Any) -> bool:
    """Equal trees, tensors bitwise (dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(torch.uint8) if a.numel() else a,
                                b.view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b, strict=True)))
    return a == b


def ema_state(steps: int, scale: float) -> dict:
    model = make_model()
    ema = emakit.EMA(model, half_life="3ba")
    train(model, ema, steps, scale)
    return full(ema.state_dict())


def loaded_ema_state(folder: Path) -> dict:
    ema = emakit.EMA(make_model(), half_life="3ba")
    checkpoint.load(ema, folder)
    return full(ema.state_dict())


# scenarios ----------------------------------------------------------------------------------


class Tally:
    def __init__(self, scenario: str) -> None:
        self.counts = {"scenario": scenario, "kills": 0, "delay_kills": 0, "flips": 0,
                       "truncations": 0, "refused": 0, "loaded": 0, "silent": 0,
                       "cases": 0, "failures": []}

    def fail(self, case: str, why: str) -> None:
        self.counts["failures"].append(f"{case}: {why}"[:2000])

    def judge(self, case: str, load, refs: list[Any], names: list[str],
              must_load: bool = False) -> None:
        """``load()`` must equal one of ``refs`` or raise a ValueError / FileExistsError
        naming one of ``names`` (not allowed when ``must_load``)."""
        self.counts["cases"] += 1
        try:
            got = load()
        except (ValueError, FileExistsError) as err:
            if must_load:
                self.fail(case, f"no checkpoint loads after the kill: {err}")
            elif not any(n in str(err) for n in names):
                self.fail(case, f"the error names none of {names}: {err}")
            else:
                self.counts["refused"] += 1
            return
        except Exception:
            self.fail(case, traceback.format_exc()[-1500:])
            return
        if any(same(got, r) for r in refs):
            self.counts["loaded"] += 1
        else:
            self.counts["silent"] += 1
            self.fail(case, "SILENT: loaded a state equal to none that was saved")


def temporaries(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.rglob("*") if is_temporary(p))


def kill_plan(dry: Path, world: int, tier: dict, rng: random.Random,
              must: tuple[str, ...]) -> list[tuple[int, int]]:
    """(rank, point) to kill at: a random sample, plus the first point of each label
    prefix in ``must`` (the windows the issue measured)."""
    labels = {r: json.loads((dry / f"points.{r}.json").read_text()) for r in range(world)}
    every = [(r, i + 1) for r in labels for i in range(len(labels[r]))]
    if len(every) <= tier["kills"]:
        return every
    chosen = set(rng.sample(every, tier["kills"]))
    for prefix in must:
        hit = next(((r, i + 1) for r in labels for i, lab in enumerate(labels[r])
                    if lab.startswith(prefix)), None)
        if hit is not None:
            chosen.add(hit)
    return sorted(chosen)


def run_kills(tally: Tally, name: str, writer, world: int, out: Path, seed: int, tier: dict,
              prepare, check, must: tuple[str, ...] = ()) -> None:
    """Dry run, then kills at chosen points and after random delays."""
    rng = random.Random(seed)
    dry = out / "dry"
    prepare(dry)
    t0 = time.perf_counter()
    result = run_job(writer, world, dry, None, None, seed)
    duration = time.perf_counter() - t0
    if result != "done":
        tally.fail(f"{name} dry run", result)
        return
    cases = [("point", k) for k in kill_plan(dry, world, tier, rng, must)]
    cases += [("delay", rng.uniform(0, duration * 1.2)) for _ in range(tier["delays"])]
    for i, (kind, arg) in enumerate(cases):
        case = out / f"case{i}"
        prepare(case)
        kill_at, delay = (arg, None) if kind == "point" else (None, arg)
        result = run_job(writer, world, case, kill_at, delay, seed + i)
        label = f"{name} kill {kind} {arg!r} ({result})"
        if result.startswith("error"):
            tally.fail(label, result)
            continue
        if result == "killed":
            tally.counts["kills" if kind == "point" else "delay_kills"] += 1
        try:
            check(tally, label, case, dry)
        except Exception:
            tally.fail(label, traceback.format_exc()[-1500:])
        shutil.rmtree(case, ignore_errors=True)


def state_scenario(tally: Tally, out: Path, seed: int, tier: dict) -> None:
    from emakit.checkpoint import read_state, write_state

    def state(k: int) -> dict:
        g = torch.Generator().manual_seed(k)
        return {"version": 2, "k": 12 + k, "clock": {"ba": 10 * k, "ep": k},
                "average": {"w": torch.randn(64, 32, generator=g),
                            "h": torch.randn(40, generator=g).to(torch.bfloat16)},
                "steps": torch.arange(5) * k, "pair": (k, [None, "x"]), "f": float("inf")}

    for over in (True, False):
        def prepare(case: Path, over=over) -> None:
            case.mkdir(parents=True, exist_ok=True)
            if over:
                write_state(state(1), case / "ema.safetensors")

        def writer(rank: int, world: int, case: Path) -> None:
            with armed():
                write_state(state(2), case / "ema.safetensors", overwrite=True)

        def check(tally: Tally, label: str, case: Path, dry: Path, over=over) -> None:
            path = case / "ema.safetensors"
            tally.judge(label, lambda: read_state(path), [state(1), state(2)] if over
                        else [state(2)], [path.name, str(path)], must_load=over)
            write_state(state(3), path)  # the next write: complete, and no temporaries left
            left = temporaries(case)
            if left or not same(read_state(path), state(3)):
                tally.fail(label, f"after the next write: temporaries {left}")

        run_kills(tally, f"write_state overwrite={over}", writer, 1, out / f"s{int(over)}",
                  seed + int(over), tier, prepare, check, must=("write-cut:.ema",))


def snapshot_scenario(tally: Tally, out: Path, seed: int, tier: dict) -> None:
    def run(folder: Path, steps: range, ph=None, model=None):
        model = model or make_model()
        ph = ph or emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=folder,
                                     snapshot_dtype=torch.float32)
        ph.run_id = "fault-run"  # the same run in every case, so a resumed run may continue
        for step in steps:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(0.9).add_(0.01 * (step + 1))
            ph.step()
            if step + 1 == 25:
                torch.save({"ph": ph.state_dict(), "model": model.state_dict()},
                           folder.parent / "state25.pt")
        return model, ph

    def prepare(case: Path) -> None:
        case.mkdir(parents=True, exist_ok=True)

    def writer(rank: int, world: int, case: Path) -> None:
        with armed():
            run(case / "snaps", range(30))

    refs: dict[int, dict] = {}

    def check(tally: Tally, label: str, case: Path, dry: Path) -> None:
        folder = case / "snaps"
        if not refs:
            for at in (10, 20, 30):
                refs[at] = emakit.synthesize(dry / "snaps", 0.1, at=at, max_error=None)

        def load():
            last = list_snapshots(folder)[-1].step
            got = emakit.synthesize(folder, 0.1, max_error=None)
            return got if same(got, refs[last]) else {"wrong": last}

        tally.judge(label, load, list(refs.values()), ["snaps"])
        # the next writer (a run resumed at step 25) takes the lock over, removes temporaries
        saved = torch.load(dry / "state25.pt", weights_only=True)
        model = make_model()
        model.load_state_dict(saved["model"])
        ph = emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=folder,
                               snapshot_dtype=torch.float32)
        ph.load_state_dict(saved["ph"])
        run(folder, range(25, 30), ph, model)
        left = temporaries(folder)
        got = emakit.synthesize(folder, 0.1, max_error=None)
        if left or not same(got, refs[30]):
            tally.fail(label, f"after the resumed run: temporaries {left}, "
                              f"equal {same(got, refs[30])}")

    run_kills(tally, "snapshots", writer, 1, out / "snap", seed, tier, prepare, check,
              must=("write-cut:.phema", "link:.phema"))


def dcp_scenario(tally: Tally, out: Path, seed: int, tier: dict, world: int,
                 over: bool) -> None:
    old = ema_state(2, 0.01)
    new_state = ema_state(3, 0.02)

    def prepare(case: Path) -> None:
        case.mkdir(parents=True, exist_ok=True)
        if over:
            model = make_model()
            ema = emakit.EMA(model, half_life="3ba")
            train(model, ema, 2, 0.01)
            checkpoint.save(ema, case / "ckpt")

    def writer(rank: int, world: int, case: Path) -> None:
        model = make_model()
        if world > 1:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model[0])
            fully_shard(model[2])
            fully_shard(model)
        ema = emakit.EMA(model, half_life="3ba")
        train(model, ema, 4, 0.03)
        with armed():
            checkpoint.save(ema, case / "ckpt", overwrite=over)
        ref = full(ema.state_dict())
        if rank == 0:
            torch.save(ref, case / "written.pt")

    def check(tally: Tally, label: str, case: Path, dry: Path) -> None:
        written = torch.load(dry / "written.pt", weights_only=True)
        folder = case / "ckpt"
        refs = [old, written] if over else [written]
        tally.judge(label, lambda: loaded_ema_state(folder), refs,
                    [str(folder), "ckpt"], must_load=over)
        # the next save: complete, and nothing left of the killed one
        model = make_model()
        ema = emakit.EMA(model, half_life="3ba")
        train(model, ema, 3, 0.02)
        try:
            checkpoint.save(ema, folder, overwrite=False)
        except FileExistsError:  # the killed save had switched the pointer: it is complete
            checkpoint.save(ema, folder, overwrite=True)
        names = sorted(p.name for p in folder.iterdir())
        if len(names) != 2 or names[1] != POINTER or not names[0].startswith("dcp-"):
            tally.fail(label, f"after the next save the folder holds {names}")
        if temporaries(folder) or not same(loaded_ema_state(folder), new_state):
            tally.fail(label, "after the next save: temporaries, or another state")

    kind = "overwrite" if over else "new folder"
    run_kills(tally, f"distributed.save {kind}, {world} process(es)", writer, world,
              out / f"d{world}{int(over)}", seed + 10 * world + int(over), tier, prepare,
              check, must=("write-cut:__0_0.distcp", "replace:.emakit", "link:.emakit",
                           "rmdir:dcp-", "unlink:__0_0.distcp"))


# corruption ---------------------------------------------------------------------------------


def flip_scenario(tally: Tally, out: Path, seed: int, tier: dict) -> None:
    from emakit.checkpoint import read_state, write_state

    rng = random.Random(seed)
    pristine = out / "pristine"
    pristine.mkdir(parents=True)
    kinds: list[tuple[str, Path, Any, Any]] = []  # (kind, file, load, reference)

    # a state file
    model = make_model()
    ema = emakit.EMA(model, half_life="3ba")
    train(model, ema, 3, 0.01)
    sd = full(ema.state_dict())
    write_state(ema.state_dict(), pristine / "ema.safetensors")
    kinds.append(("state", Path("ema.safetensors"),
                  lambda root: read_state(root / "ema.safetensors"), sd))

    # snapshots
    model = make_model()
    ph = emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=pristine / "snaps",
                           snapshot_dtype=torch.float32)
    train(model, ph, 30, 0.01)
    ref = emakit.synthesize(pristine / "snaps", 0.1, max_error=None)
    for p in sorted((pristine / "snaps").glob("phema-*")):
        kinds.append(("snapshot", p.relative_to(pristine),
                      lambda root: emakit.synthesize(root / "snaps", 0.1, max_error=None), ref))

    # checkpoints of 1 and 2 processes
    checkpoint.save(ema, pristine / "ck1")
    (pristine / "ck2").mkdir()

    def writer(rank: int, world: int, case: Path) -> None:
        from torch.distributed.fsdp import fully_shard

        model = make_model()
        for m in (model[0], model[2], model):
            fully_shard(m)
        e = emakit.EMA(model, half_life="3ba")
        train(model, e, 4, 0.03)
        checkpoint.save(e, case / "ck2")
        ref = full(e.state_dict())
        if rank == 0:
            torch.save(ref, case / "written2.pt")

    result = run_job(writer, 2, pristine, None, None, seed)
    if result != "done":
        tally.fail("2-process checkpoint for flips", result)
        return
    ck2 = torch.load(pristine / "written2.pt", weights_only=True)
    for ck, want in (("ck1", sd), ("ck2", ck2)):
        for p in sorted((pristine / ck).rglob("*")):
            if p.is_file():
                kinds.append((f"checkpoint {p.name}", p.relative_to(pristine),
                              lambda root, ck=ck: loaded_ema_state(root / ck), want))

    case = out / "case"
    for i in range(tier["flips"] + tier["cuts"]):
        kind, rel, load, want = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(pristine, case)
        target = case / rel
        data = bytearray(target.read_bytes())
        if i < tier["flips"]:
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
            what = f"flip of bit {bit}"
            tally.counts["flips"] += 1
        else:
            cut = rng.randrange(len(data))
            data = data[:cut]
            what = f"cut at {cut} of {target.stat().st_size} bytes"
            tally.counts["truncations"] += 1
        target.write_bytes(bytes(data))
        tally.judge(f"{kind} ({rel}): {what}", lambda load=load: load(case), [want],
                    [target.name])


def main() -> None:
    scenario, out, seed, tier = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    sizes = FULL if tier == "full" else FAST
    out.mkdir(parents=True, exist_ok=True)
    tally = Tally(scenario)
    t0 = time.perf_counter()
    if scenario == "state":
        state_scenario(tally, out, seed, sizes)
    elif scenario == "snapshot":
        snapshot_scenario(tally, out, seed, sizes)
    elif scenario.startswith("dcp-"):
        _, kind, world = scenario.split("-")
        dcp_scenario(tally, out, seed, sizes, int(world), kind == "over")
    elif scenario == "flips":
        flip_scenario(tally, out, seed, sizes)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    tally.counts["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(tally.counts), flush=True)


if __name__ == "__main__":
    main()
    # The work is done and checked: leave without the interpreter's teardown, where gloo's
    # threads can abort the process ("terminate called without an active exception").
    import os as _os
    import sys as _sys

    _sys.stdout.flush()
    _sys.stderr.flush()
    _os._exit(0)
