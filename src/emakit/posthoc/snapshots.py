"""Post-hoc snapshot files: one safetensors file per snapshot, its header, and the checks
that find a folder's usable snapshots (one model, one run, the latest history)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import read_metadata

__all__ = ["SnapshotInfo", "read_snapshot_info", "scan", "list_snapshots", "FORMAT",
           "FORMAT_VERSION", "PREFIX", "SUFFIX"]

FORMAT = "emakit.posthoc-snapshot"
FORMAT_VERSION = "1"
PREFIX = "phema-"
SUFFIX = ".safetensors"


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


def _not_snapshot(path: Path, why: str) -> ValueError:
    return ValueError(f"snapshot_dir: {path} is not an emakit post-hoc snapshot ({why})")


def read_snapshot_info(path: str | os.PathLike) -> SnapshotInfo:
    """Parse and check a snapshot's header; a truncated or foreign file is a ValueError."""
    path = Path(path)
    meta, keys = read_metadata(path, what="snapshot_dir")
    if meta.get("format") != FORMAT:
        raise _not_snapshot(path, f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise _not_snapshot(path, f"format_version {meta.get('format_version')!r} is not "
                                  f"{FORMAT_VERSION!r}")
    try:
        layout = tuple(
            (str(n), str(k), str(d), tuple(str(a) for a in al))
            for n, k, d, al in json.loads(meta["layout"])
        )
        info = SnapshotInfo(
            path=path,
            step=int(meta["step"]),
            samples=int(meta["samples"]),
            t=float(meta["t"]),
            time_unit=meta["time_unit"],
            sigma_rels=tuple(float(x) for x in json.loads(meta["sigma_rels"])),
            gammas=tuple(float(x) for x in json.loads(meta["gammas"])),
            dtype=meta["dtype"],
            fingerprint=meta["fingerprint"],
            run_id=meta["run_id"],
            segment=meta["segment"],
            resumed_at=int(meta["resumed_at"]),
            written_ns=int(meta["written_ns"]),
            emakit_version=meta.get("emakit_version", "?"),
            layout=layout,
            order=tuple(str(n) for n in json.loads(meta["order"])),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise _not_snapshot(path, f"bad or missing metadata: {err!r}") from None
    if not info.t > 0 or len(info.gammas) != len(info.sigma_rels) or not info.gammas:
        raise _not_snapshot(path, "inconsistent metadata")
    expected = {f"p{k}/{n}" for k in range(len(info.gammas)) for n, kind, _, _ in layout
                if kind == "average"}
    expected |= {f"{kind}/{n}" for n, kind, _, _ in layout if kind in ("copy", "live")}
    if set(keys) != expected:
        raise _not_snapshot(path, "its tensors do not match its layout")
    names = [n for row in layout for n in (row[0], *row[3])]
    if sorted(names) != sorted(info.order) or len(set(names)) != len(names):
        raise _not_snapshot(path, "its name order does not match its layout")
    return info


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


def list_snapshots(directory: str | os.PathLike) -> list[SnapshotInfo]:
    """The usable snapshots in ``directory``, in step order, after checks: every
    ``phema-*.safetensors`` file must be complete, of one model and one training run.
    Snapshots superseded by a resumed run are left out. Reads headers only."""
    infos = scan(directory)
    if not infos:
        raise ValueError(f"snapshot_dir: {str(directory)!r} holds no snapshots "
                         f"({PREFIX}*{SUFFIX} files)")
    fps = sorted({s.fingerprint for s in infos})
    if len(fps) > 1:
        groups = {fp: [s.path.name for s in infos if s.fingerprint == fp][:3] for fp in fps}
        raise ValueError(
            f"snapshot_dir: {str(directory)!r} mixes snapshots of {len(fps)} different models "
            f"(names/shapes differ): {groups}"
        )
    runs = sorted({s.run_id for s in infos})
    if len(runs) > 1:
        groups = {r: [s.path.name for s in infos if s.run_id == r][:3] for r in runs}
        raise ValueError(
            f"snapshot_dir: {str(directory)!r} mixes snapshots of {len(runs)} training runs: "
            f"{groups}; move all but one run's snapshots elsewhere"
        )
    layouts = {s.layout for s in infos}
    units = {s.time_unit for s in infos}
    if len(layouts) > 1 or len(units) > 1:
        raise ValueError(f"snapshot_dir: {str(directory)!r} mixes snapshots with different "
                         "layouts or time units")
    return _lineage(infos)

