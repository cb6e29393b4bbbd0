"""Post-hoc snapshot files: one safetensors file per snapshot, its header, and the checks
that find a folder's usable snapshots (one model, one run, the latest history)."""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..io import (
    CHECKSUMS_KEY,
    DTYPE_CODES,
    HEADER_CHECKSUM_KEY,
    dtype_from_name,
    is_temporary,
    model_fingerprint,
    owner_tag,
    pid_alive,
    read_header,
    reclaim_temporaries,
    write_safetensors,
)
from ..schedules import sigma_rel_to_gamma
from .profiles import check_sigma_rel

__all__ = ["SnapshotInfo", "read_snapshot_info", "scan", "list_snapshots", "write_snapshot",
           "FORMAT", "FORMAT_VERSION", "PREFIX", "SUFFIX", "LOCK_NAME"]

FORMAT = "emakit.posthoc-snapshot"
FORMAT_VERSION = "3"  # 3: sealed header; 2 (read only): per-tensor checksums; 1: none
_READABLE_VERSIONS = ("1", "2", "3")
_KINDS = ("average", "copy", "live")
_FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
PREFIX = "phema-"
SUFFIX = ".safetensors"
#: the lock file a writing run holds in its snapshot folder
LOCK_NAME = ".emakit-writer.lock"


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot file's header says (read without touching the tensors)."""

    path: Path
    step: int  # batches seen when it was written
    samples: int
    t: float  # time of the last update, in time_unit
    time_unit: str
    sigma_rels: tuple[float, ...]
    gammas: tuple[float, ...]
    dtype: str
    fingerprint: str
    run_id: str
    segment: str  # changes at each resume: snapshots of one continuation share it
    resumed_at: int  # step the continuation resumed from (-1: none)
    written_ns: int
    emakit_version: str
    layout: tuple[tuple[str, str, str, tuple[str, ...]], ...] = field(repr=False)
    # layout rows: (name, kind, model dtype, tied aliases); kind in average|copy|live
    order: tuple[str, ...] = field(repr=False, default=())  # the model's state-dict order
    checksums: Mapping[str, str] = field(repr=False, default_factory=dict)  # tensor -> crc32
    # tensor -> (safetensors dtype code, shape), as the checked header gives them
    tensors: Mapping[str, tuple[str, tuple[int, ...]]] = field(repr=False, default_factory=dict)
    epoch: int = -1  # epochs seen when it was written (-1: not recorded)


def _not_snapshot(path: Path, why: str) -> ValueError:
    return ValueError(f"snapshot_dir: {path} is not an emakit post-hoc snapshot ({why})")


def _whole(meta: Mapping[str, str], key: str, low: int) -> int:
    value = int(meta[key])
    if value < low:
        raise ValueError(f"{key}={value} is below {low}")
    return value


def _check_format(meta: Mapping[str, str], path: Path) -> str:
    """The file's format version, after checking it is a snapshot and, from format 3 on, that
    its header is sealed (:func:`read_header` verified the seal when present)."""
    if meta.get("format") != FORMAT:
        raise _not_snapshot(path, f"format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise _not_snapshot(path, f"format_version {version!r} is not one of "
                                  f"{_READABLE_VERSIONS}")
    if version not in ("1", "2") and HEADER_CHECKSUM_KEY not in meta:
        raise _not_snapshot(path, f"its header checksum is missing (format {version} seals "
                                  "its header)")
    return version


def _parse(path: Path, meta: Mapping[str, str], version: str,
           tensors: Mapping[str, tuple[str, tuple[int, ...]]]) -> SnapshotInfo:
    """The header's fields, typed (KeyError, ValueError or TypeError when malformed)."""
    checksums = json.loads(meta[CHECKSUMS_KEY]) if version != "1" else {}
    if not isinstance(checksums, dict):
        raise TypeError("checksums is not a mapping")
    return SnapshotInfo(
        path=path,
        step=_whole(meta, "step", 1),
        samples=_whole(meta, "samples", 0),
        t=float(meta["t"]),
        time_unit=meta["time_unit"],
        sigma_rels=tuple(float(x) for x in json.loads(meta["sigma_rels"])),
        gammas=tuple(float(x) for x in json.loads(meta["gammas"])),
        dtype=meta["dtype"],
        fingerprint=meta["fingerprint"],
        run_id=meta["run_id"],
        segment=meta["segment"],
        resumed_at=_whole(meta, "resumed_at", -1),
        written_ns=_whole(meta, "written_ns", 0),
        emakit_version=meta.get("emakit_version", "?"),
        layout=tuple(
            (str(n), str(k), str(d), tuple(str(a) for a in al))
            for n, k, d, al in json.loads(meta["layout"])
        ),
        order=tuple(str(n) for n in json.loads(meta["order"])),
        checksums={str(k): str(v) for k, v in checksums.items()},
        tensors=dict(tensors),
        epoch=_whole(meta, "epoch", 0) if "epoch" in meta else -1,
    )


def _check_time(info: SnapshotInfo) -> None:
    """The time of the last update: a whole number of time units, at least 1 and at most
    what the clock had counted when the snapshot was written."""
    path = info.path
    if not (math.isfinite(info.t) and info.t >= 1 and info.t == math.floor(info.t)):
        raise _not_snapshot(path, f"its time t={info.t!r} is not a whole number >= 1")
    if info.time_unit not in ("ba", "ep"):
        raise _not_snapshot(path, f"its time unit {info.time_unit!r} is not 'ba' or 'ep'")
    count = info.step if info.time_unit == "ba" else info.epoch
    if count >= 0 and info.t > count:
        raise _not_snapshot(path, f"its time t={info.t:g} {info.time_unit} is later than the "
                                  f"{count} {info.time_unit} it was written at")


def _check_profiles(info: SnapshotInfo) -> None:
    path = info.path
    if len(info.gammas) != len(info.sigma_rels) or not info.gammas:
        raise _not_snapshot(path, "inconsistent metadata: one gamma per sigma_rel expected")
    for s, g in zip(info.sigma_rels, info.gammas, strict=True):
        try:
            want = sigma_rel_to_gamma(check_sigma_rel(s))
        except (TypeError, ValueError) as err:
            raise _not_snapshot(path, f"its {err}") from None
        if not math.isclose(g, want, rel_tol=1e-6):
            raise _not_snapshot(path, f"its gamma {g!r} is not that of sigma_rel {s!r} "
                                      f"({want:.6g})")


def _check_layout(info: SnapshotInfo) -> None:
    """Tensor names as the layout says, and the layout's names as the model's order says."""
    path, layout = info.path, info.layout
    if any(kind not in _KINDS for _, kind, _, _ in layout):
        raise _not_snapshot(path, f"its layout has a kind outside {_KINDS}")
    expected = {f"p{k}/{n}" for k in range(len(info.gammas)) for n, kind, _, _ in layout
                if kind == "average"}
    expected |= {f"{kind}/{n}" for n, kind, _, _ in layout if kind in ("copy", "live")}
    if set(info.tensors) != expected:
        raise _not_snapshot(path, "its tensors do not match its layout")
    names = [n for row in layout for n in (row[0], *row[3])]
    if sorted(names) != sorted(info.order) or len(set(names)) != len(names):
        raise _not_snapshot(path, "its name order does not match its layout")


def read_snapshot_info(path: str | os.PathLike) -> SnapshotInfo:
    """Parse and check a snapshot's header; a truncated, foreign, corrupted or inconsistent
    file is a ValueError naming it. Checks: the header's own checksum (format 3), numbers
    finite and in range, the time a whole number no later than the step (or epoch) it was
    written at, each gamma the one its sigma_rel gives, tensor names, dtypes and shapes as
    the layout, the storage dtype and the model fingerprint say, and a checksum for every
    tensor (format 2 on)."""
    path = Path(path)
    meta, tensors = read_header(path, what="snapshot_dir")  # verifies a sealed header
    version = _check_format(meta, path)
    try:
        info = _parse(path, meta, version, tensors)
    except (KeyError, ValueError, TypeError) as err:
        raise _not_snapshot(path, f"bad or missing metadata: {err!r}") from None
    _check_time(info)
    _check_profiles(info)
    _check_layout(info)
    _check_tensors(info, require_checksums=version != "1")
    return info


def _stored_code(info: SnapshotInfo) -> str | None:
    """The dtype code every averaged tensor must have (None: any floating one)."""
    if info.dtype == "model":
        return None
    try:
        return DTYPE_CODES[dtype_from_name(info.dtype, "dtype")]
    except (KeyError, ValueError):
        raise _not_snapshot(info.path, f"its dtype {info.dtype!r} is unknown") from None


def _row_shape(info: SnapshotInfo, name: str, kind: str, model_dtype: str,
               stored: str | None) -> tuple[int, ...]:
    """The shape of one layout row's tensors, after checking their dtypes: averages in the
    storage dtype (a floating one), copied and live tensors in the model's own dtype."""
    path = info.path
    keys = ([f"p{k}/{name}" for k in range(len(info.gammas))] if kind == "average"
            else [f"{kind}/{name}"])
    found = {info.tensors[k] for k in keys}
    if len({shape for _, shape in found}) != 1:
        raise _not_snapshot(path, f"tensor {name!r} has different shapes in its profiles: "
                                  f"{sorted(s for _, s in found)}")
    codes = {code for code, _ in found}
    if kind == "average":
        ok = codes == {stored} if stored is not None else codes <= _FLOAT_CODES
        want = info.dtype if stored is not None else "a floating dtype"
    else:
        try:
            want = model_dtype
            ok = codes == {DTYPE_CODES[dtype_from_name(model_dtype, "layout")]}
        except (KeyError, ValueError):
            raise _not_snapshot(path, f"tensor {name!r} has an unknown model dtype "
                                      f"{model_dtype!r}") from None
    if not ok:
        raise _not_snapshot(path, f"{kind} tensor {name!r} is stored as {sorted(codes)}, "
                                  f"expected {want}")
    return next(iter(found))[1]


def _check_tensors(info: SnapshotInfo, require_checksums: bool) -> None:
    """Dtypes, shapes (against the fingerprint) and checksum coverage of a snapshot."""
    path = info.path
    stored = _stored_code(info)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for name, kind, model_dtype, aliases in info.layout:
        shape = _row_shape(info, name, kind, model_dtype, stored)
        shapes.extend((n, shape) for n in (name, *aliases))
    if model_fingerprint(shapes) != info.fingerprint:
        raise _not_snapshot(path, "its tensor shapes are not those of its model (fingerprint "
                                  f"{info.fingerprint}): a tensor has the wrong shape")
    if require_checksums:
        missing = sorted(set(info.tensors) - set(info.checksums))
        if missing:
            raise _not_snapshot(path, f"no checksum for tensors {missing[:3]}")


def scan(directory: str | os.PathLike) -> list[SnapshotInfo]:
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"snapshot_dir: {str(d)!r} is not a folder")
    paths = sorted(p for p in d.iterdir() if p.name.startswith(PREFIX)
                   and p.name.endswith(SUFFIX) and p.is_file())
    return [read_snapshot_info(p) for p in paths]


def _lineage(infos: list[SnapshotInfo]) -> list[SnapshotInfo]:
    """The snapshots of the latest training history, in step order.

    Taken in the order they were written: a snapshot written by a run resumed at step R (a
    new segment) ends the earlier segments' snapshots past R, which belong to the abandoned
    continuation; within a segment, steps only increase."""
    live: list[SnapshotInfo] = []
    for s in sorted(infos, key=lambda s: (s.written_ns, s.step)):
        live = [x for x in live if x.step < s.step
                and (x.segment == s.segment or x.step <= s.resumed_at)]
        live.append(s)
    return live


def _one(directory: str | os.PathLike, infos: list[SnapshotInfo], key: str, what: str,
         hint: str = "") -> None:
    """A ValueError naming up to 3 files per group unless every snapshot has the same
    ``key``."""
    values = sorted({getattr(s, key) for s in infos}, key=repr)
    if len(values) > 1:
        groups = {v: [s.path.name for s in infos if getattr(s, key) == v][:3] for v in values}
        raise ValueError(f"snapshot_dir: {str(directory)!r} mixes snapshots of {len(values)} "
                         f"{what}: {groups}{hint}")


def _check_times(infos: list[SnapshotInfo]) -> None:
    """Along one history, a later step never has an earlier update time."""
    for a, b in zip(infos, infos[1:], strict=False):
        if b.t < a.t:
            raise _not_snapshot(b.path, f"its time t={b.t:g} is earlier than t={a.t:g} of "
                                        f"{a.path.name}, written at an earlier step")


def list_snapshots(directory: str | os.PathLike) -> list[SnapshotInfo]:
    """The usable snapshots in ``directory``, in step order, after checks: every
    ``phema-*.safetensors`` file must be complete, of one model and one training run, and
    their times must increase with their steps. Snapshots superseded by a resumed run are
    left out. Reads headers only."""
    infos = scan(directory)
    if not infos:
        raise ValueError(f"snapshot_dir: {str(directory)!r} holds no snapshots "
                         f"({PREFIX}*{SUFFIX} files)")
    _one(directory, infos, "fingerprint", "different models (names/shapes differ)")
    _one(directory, infos, "run_id", "training runs",
         "; move all but one run's snapshots elsewhere")
    if len({s.layout for s in infos}) > 1 or len({s.time_unit for s in infos}) > 1:
        raise ValueError(f"snapshot_dir: {str(directory)!r} mixes snapshots with different "
                         "layouts or time units")
    live = _lineage(infos)
    _check_times(live)
    return live


# writing -----------------------------------------------------------------------------------

_HELD: dict[Path, Path] = {}  # folder -> lock file this process holds


def _host() -> str:
    return socket.gethostname()


def _release_all() -> None:
    for lock in list(_HELD.values()):
        with contextlib.suppress(OSError, ValueError):
            owner = json.loads(lock.read_text())
            if owner.get("pid") == os.getpid() and owner.get("host") == _host():
                lock.unlink()
    _HELD.clear()


atexit.register(_release_all)


def _owner(lock: Path) -> tuple[int, str, str] | None:
    """(pid, host, run) written in a lock file; None if it is gone; (-1, host, "?") if it
    cannot be read as a lock (garbage: treated as left by a dead process)."""
    try:
        owner = json.loads(lock.read_text())
        return int(owner["pid"]), str(owner["host"]), str(owner.get("run_id", "?"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return -1, _host(), "?"


def _lock(directory: Path, run_id: str) -> bool:
    """Hold ``directory``'s writer lock for this process (until it exits), or raise; True
    when this call took it.

    The lock file holds pid, host and run. It is published complete and exclusively: written
    under a unique temporary name, then hard-linked to :data:`LOCK_NAME`, which fails if the
    name exists (the same exclusivity as ``O_EXCL``, without a moment where a reader sees an
    empty lock). A lock whose process is gone (same host) is taken over."""
    key = directory.resolve()
    if key in _HELD and _HELD[key].exists():
        return False
    lock = directory / LOCK_NAME
    me = {"pid": os.getpid(), "host": _host(), "run_id": run_id, "since": time.time()}
    tmp = directory / f"{LOCK_NAME}.{owner_tag()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        for _ in range(100):
            try:
                os.link(tmp, lock)
            except FileExistsError:
                pass
            else:
                _HELD[key] = lock
                return True
            owner = _owner(lock)
            if owner is None:
                continue  # released meanwhile
            pid, host, run = owner
            if host == _host() and pid == os.getpid():
                _HELD[key] = lock
                return True
            if host == _host() and not pid_alive(pid):
                stale = lock.with_name(f"{LOCK_NAME}.{owner_tag()}.{uuid.uuid4().hex[:8]}.tmp")
                try:
                    os.rename(lock, stale)
                except FileNotFoundError:
                    continue  # another process took it over first
                if _owner(stale) != owner:  # a newer lock was renamed meanwhile: put it back
                    with contextlib.suppress(OSError):
                        os.link(stale, lock)
                with contextlib.suppress(OSError):
                    stale.unlink()
                continue
            raise ValueError(
                f"snapshot_dir: {str(directory)!r} is being written by another process "
                f"(pid {pid} on {host}, run {run[:12]}); two runs writing one folder would "
                "mix their histories. Give this run its own folder, or stop the other (a lock "
                f"left by a process that died on another machine: delete {str(lock)!r})"
            )
        raise ValueError(f"snapshot_dir: could not take the writer lock {str(lock)!r}")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _reclaim(directory: Path) -> None:
    """Remove the snapshot temporaries other writers left: this process holds the folder's
    writer lock, so whoever wrote them has stopped writing (killed mid-write). Temporaries
    of the lock itself go only when their process is gone (another may be taking it)."""
    reclaim_temporaries(directory, LOCK_NAME[1:])
    mine = owner_tag()
    for p in directory.iterdir():
        if p.name.startswith(f".{PREFIX}") and is_temporary(p) and mine not in p.name:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def write_snapshot(
    directory: str | os.PathLike,
    step: int,
    items: Iterable[tuple[str, Tensor, torch.dtype]],
    metadata: Mapping[str, str],
    run_id: str,
) -> Path:
    """Write one snapshot file ``phema-<step>[.r<n>].safetensors`` into ``directory`` and
    return its path; never replaces a file.

    The folder is created if needed; a path that exists and is not a folder is a ValueError at
    once. The first write takes the folder's writer lock (:data:`LOCK_NAME`, held until this
    process exits): a second process writing the same folder gets a ValueError instead of
    mixing two histories. Every tensor's checksum goes into the header and is verified when
    the tensor is read.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"snapshot_dir: {str(directory)!r} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    if _lock(directory, run_id):
        _reclaim(directory)
    items = list(items)
    for revision in range(1000):
        tag = "" if revision == 0 else f".r{revision}"
        path = directory / f"{PREFIX}{step:010d}{tag}{SUFFIX}"
        if path.exists():
            continue
        try:
            write_safetensors(path, items, metadata, checksums=True)
        except FileExistsError:  # another writer took the name meanwhile
            continue
        return path
    raise ValueError(f"snapshot_dir: {str(directory)!r} already holds 1000 snapshots of step "
                     f"{step}")
