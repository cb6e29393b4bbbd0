"""Post-hoc synthesis: an EMA of any width from the snapshots, after training."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import Tensor

from ..io import DTYPE_CODES, dtype_from_name, read_tensors, verify_checksum
from ..schedules import sigma_rel_to_gamma
from .profiles import MAX_SIGMA_REL, check_sigma_rel, solve_coefficients
from .snapshots import SnapshotInfo, list_snapshots

__all__ = ["synthesize", "plan_synthesis", "SynthesisPlan", "supported_sigma_rels",
           "format_intervals", "DEFAULT_MAX_ERROR"]

#: Largest relative L2 error of the synthesized profile that synthesize() accepts by default.
DEFAULT_MAX_ERROR = 0.05


def _select(infos: list[SnapshotInfo], at: int | None) -> list[SnapshotInfo]:
    """The snapshots at or before ``at`` (default: the last); ``at`` must be a snapshot step."""
    if at is None:
        return infos
    if isinstance(at, bool) or not isinstance(at, int):
        raise TypeError(f"at: expected a step (int) or None, got {type(at).__name__}")
    chosen = [s for s in infos if s.step <= at]
    if not chosen or chosen[-1].step != at:
        before = chosen[-1].step if chosen else None
        after = next((s.step for s in infos if s.step > at), None)
        raise ValueError(
            f"at: no snapshot at step {at}; the nearest are {before} (before) and {after} "
            f"(after). Synthesis needs a snapshot at the target step, since later weights "
            f"are in no earlier snapshot"
        )
    return chosen


def _rows(snaps: list[SnapshotInfo]) -> tuple[list[tuple[int, int]], list[float], list[float]]:
    rows = [(i, k) for i, s in enumerate(snaps) for k in range(len(s.gammas))]
    ts = [snaps[i].t for i, _ in rows]
    gammas = [snaps[i].gammas[k] for i, k in rows]
    return rows, ts, gammas


def _errors(ts: list[float], gammas: list[float], t: float, sigma_rels: list[float]) -> list[float]:
    g_out = [sigma_rel_to_gamma(float(x)) for x in sigma_rels]
    return solve_coefficients(ts, gammas, t, g_out)[1].tolist()


def supported_sigma_rels(
    snapshots: str | os.PathLike | Sequence[SnapshotInfo],
    max_error: float = DEFAULT_MAX_ERROR,
    points: int = 400,
    refused: Sequence[float] = (),
) -> list[tuple[float, float]]:
    """The sigma_rel the snapshots reproduce at the last snapshot's time with a relative L2
    profile error at most ``max_error``, as disjoint intervals ``[(lo, hi), ...]`` in
    increasing order (empty when there is none). ``snapshots``: a snapshot folder (its
    headers are read and checked, see :func:`~emakit.posthoc.list_snapshots`) or the
    :class:`SnapshotInfo` list of one.

    The error is scanned on a log grid of ``points`` values from 0.001 to sqrt(1/12), plus the
    ``refused`` values (known to fail: they split any interval they fall in); each edge next
    to a failing grid value is then bisected to 1e-6 relative. Snapshots of two profiles far
    apart support two islands, not the range between them.
    """
    if isinstance(snapshots, (str, os.PathLike)):
        snaps = list_snapshots(_folder(snapshots))
    elif isinstance(snapshots, Sequence) and snapshots and all(
            isinstance(s, SnapshotInfo) for s in snapshots):
        snaps = [s for s in snapshots if isinstance(s, SnapshotInfo)]
    else:
        raise TypeError(f"snapshots: expected a snapshot folder or a non-empty list of "
                        f"SnapshotInfo, got {type(snapshots).__name__}")
    _check_max_error(max_error)
    _, ts, gammas = _rows(snaps)
    t = snaps[-1].t
    top = MAX_SIGMA_REL * 0.999
    logs = torch.logspace(math.log10(0.001), math.log10(top), points, dtype=torch.float64)
    known_bad = {float(x) for x in refused if 0.001 < x < top}
    grid: list[float] = sorted(set(logs.tolist()) | known_bad)
    ok = [e <= max_error and x not in known_bad
          for x, e in zip(grid, _errors(ts, gammas, t, grid), strict=True)]

    def edge(inside: float, outside: float) -> float:
        """The last supported value from ``inside`` towards ``outside`` (log bisection)."""
        if outside in known_bad:
            return inside
        a, b = math.log(inside), math.log(outside)
        while abs(b - a) > 1e-6:
            mid = 0.5 * (a + b)
            good = _errors(ts, gammas, t, [math.exp(mid)])[0] <= max_error
            a, b = (mid, b) if good else (a, mid)
        return math.exp(a)

    out: list[tuple[float, float]] = []
    i, n = 0, len(ok)
    while i < n:
        if not ok[i]:
            i += 1
            continue
        j = i
        while j + 1 < n and ok[j + 1]:
            j += 1
        lo = grid[i] if i == 0 else edge(grid[i], grid[i - 1])
        hi = grid[j] if j == n - 1 else edge(grid[j], grid[j + 1])
        out.append((lo, hi))
        i = j + 1
    return out


def format_intervals(intervals: Sequence[tuple[float, float]], digits: int = 4) -> str:
    """``"0.04562 to 0.05512, 0.2741 to 0.2848"``: each end rounded inwards to ``digits``
    significant digits, so a printed interval holds only supported values; ``"none"`` when
    empty.

    >>> format_intervals([(0.045612, 0.055129), (0.27409, 0.28481)])
    '0.04562 to 0.05512, 0.2741 to 0.2848'
    """
    def inward(x: float, up: bool) -> str:
        q = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
        k = math.ceil(x / q) if up else math.floor(x / q)
        return f"{k * q:.{digits}g}"

    parts = [f"{inward(lo, True)} to {inward(hi, False)}" for lo, hi in intervals]
    return ", ".join(parts) if parts else "none"


# --------------------------------------------------------------------------------------
# synthesis


@dataclass
class SynthesisPlan:
    """Which snapshots enter a synthesis and with which coefficients (what
    :func:`plan_synthesis` computes from the headers; :func:`synthesize` takes it)."""

    snapshots: list[SnapshotInfo]
    sigma_rels: list[float]
    coefficients: Tensor  # [rows, targets], float64; row r is (snapshot, profile) rows[r]
    rows: list[tuple[int, int]]
    errors: Tensor  # [targets], relative L2 error of each synthesized profile
    max_error: float | None = DEFAULT_MAX_ERROR  # what the errors were accepted against


def _folder(directory: Any) -> str:
    """A snapshot folder argument: a path (TypeError naming ``directory`` otherwise)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a snapshot folder (str or os.PathLike) or a "
                        f"SynthesisPlan, got {type(directory).__name__} {directory!r}")
    return os.fspath(directory)


def _check_max_error(max_error: Any) -> None:
    if max_error is not None and (isinstance(max_error, bool)
                                  or not isinstance(max_error, (int, float))
                                  or not max_error > 0):
        raise ValueError(f"max_error: expected a number > 0 or None, got {max_error!r}")


def _refuse(snaps: list[SnapshotInfo], sigma_rels: list[float], errors: Tensor,
            max_error: float) -> None:
    """A ValueError naming the targets whose profile error exceeds ``max_error`` and the
    sigma_rel the snapshots do support."""
    bad = [(s, float(e)) for s, e in zip(sigma_rels, errors, strict=True) if not e <= max_error]
    if bad:
        ranges = supported_sigma_rels(snaps, max_error, refused=[s for s, _ in bad])
        where = format_intervals(ranges) if ranges else "nowhere"
        raise ValueError(
            f"sigma_rel: {', '.join(f'{s:g} (profile error {e:.3f})' for s, e in bad)} "
            f"cannot be represented by the {len(snaps)} snapshots up to step "
            f"{snaps[-1].step} within max_error={max_error:g}; they support sigma_rel "
            f"{where}. Take snapshots more often, or pass a larger max_error"
        )


def plan_synthesis(
    directory: str | os.PathLike,
    sigma_rels: Sequence[float],
    at: int | None = None,
    max_error: float | None = DEFAULT_MAX_ERROR,
) -> SynthesisPlan:
    """Pass 1 of :func:`synthesize`: headers only, the Gram system and its solution. Every
    header is checked (see :func:`~emakit.posthoc.snapshots.read_snapshot_info`); a target the
    snapshots cannot represent within ``max_error`` is a ValueError."""
    folder = _folder(directory)
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence):
        raise TypeError(f"sigma_rels: expected a sequence of numbers, got "
                        f"{type(sigma_rels).__name__} {sigma_rels!r}")
    sigma_rels = [check_sigma_rel(s) for s in sigma_rels]
    if not sigma_rels:
        raise ValueError("sigma_rel: expected at least one value")
    _check_max_error(max_error)
    snaps = _select(list_snapshots(folder), at)
    rows, ts, gammas = _rows(snaps)
    g_out = [sigma_rel_to_gamma(s) for s in sigma_rels]
    coefs, errors = solve_coefficients(ts, gammas, snaps[-1].t, g_out)
    if max_error is not None:
        _refuse(snaps, sigma_rels, errors, max_error)
    return SynthesisPlan(snaps, sigma_rels, coefs, rows, errors, max_error)


def _out_dtype(dtype: Any) -> torch.dtype | None:
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype, "dtype")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype: expected a floating torch.dtype (or its name) or None, got "
                        f"{dtype!r}: an average is not a whole number")
    return dtype


def _read(f: Any, snap: SnapshotInfo, key: str) -> Tensor:
    """One tensor of a snapshot, as its checked header described it and with the bytes its
    checksum vouches for (the file may have changed since the plan read it)."""
    t = f.get_tensor(key)
    code, shape = snap.tensors[key]
    if DTYPE_CODES.get(t.dtype) != code or tuple(t.shape) != shape:
        raise ValueError(f"snapshot_dir: {snap.path}: tensor {key!r} is {t.dtype} "
                         f"{list(t.shape)}, its header said {code} {list(shape)} (the file "
                         "changed while it was read?)")
    verify_checksum(t, key, snap.checksums, snap.path, "snapshot_dir")
    return t


def _accumulate(plan: SynthesisPlan, acc: list[dict[str, Tensor]], f: Any, i: int) -> None:
    """Add snapshot ``i``'s profiles, times their coefficients, to every target's sum."""
    snap = plan.snapshots[i]
    rows = [(r, k) for r, (j, k) in enumerate(plan.rows) if j == i]
    for name, kind, _, _ in plan.snapshots[-1].layout:
        if kind != "average":
            continue
        for r, k in rows:
            x = _read(f, snap, f"p{k}/{name}").to(torch.float32)
            for j, target in enumerate(acc):
                c = float(plan.coefficients[r, j])
                if name not in target:
                    target[name] = x * c
                else:
                    target[name].add_(x, alpha=c)
            del x


def _assemble(plan: SynthesisPlan, acc: dict[str, Tensor], rest: dict[str, Tensor],
              dtype: torch.dtype | None) -> dict[str, Tensor]:
    """One target's model state dict, in the model's order, tied names sharing a tensor."""
    last = plan.snapshots[-1]
    out: dict[str, Tensor] = {}
    for name, kind, model_dtype, aliases in last.layout:
        t = acc.pop(name) if kind == "average" else rest[name].clone()
        if t.is_floating_point():
            t = t.to(dtype or dtype_from_name(model_dtype, "layout"))
        for n in (name, *aliases):
            out[n] = t
    return {n: out[n] for n in last.order}


def _run(plan: SynthesisPlan, dtype: torch.dtype | None,
         progress: Callable[[int, int], None] | None) -> list[dict[str, Tensor]]:
    """Pass 2: one tensor at a time, accumulated in float32 per target."""
    acc: list[dict[str, Tensor]] = [{} for _ in plan.sigma_rels]
    rest: dict[str, Tensor] = {}
    total = len(plan.snapshots)
    for i, snap in enumerate(plan.snapshots):
        with read_tensors(snap.path, what="snapshot_dir") as f:
            _accumulate(plan, acc, f, i)
            if i == total - 1:  # copied and live tensors from the target snapshot
                rest = {n: _read(f, snap, f"{kind}/{n}") for n, kind, _, _ in snap.layout
                        if kind != "average"}
        if progress is not None:
            progress(i + 1, total)
    return [_assemble(plan, a, rest, dtype) for a in acc]


def _print_progress(done: int, total: int) -> None:
    print(f"synthesize: {done}/{total} snapshot files", file=sys.stderr, flush=True)


def _progress(progress: Any) -> Callable[[int, int], None] | None:
    """``synthesize``'s ``progress``: a callable, ``True`` (print to stderr), ``False`` or
    ``None`` (nothing); anything else is a TypeError naming it."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return _print_progress
    if not callable(progress) or isinstance(progress, bool):
        raise TypeError(f"progress: expected a callable progress(done, total), True, False or "
                        f"None, got {type(progress).__name__} {progress!r}")
    return progress


@overload
def synthesize(
    directory: str | os.PathLike, sigma_rel: float, at: int | None = None, *,
    max_error: float | None = ..., dtype: torch.dtype | str | None = ...,
    progress: Callable[[int, int], None] | bool | None = ...,
) -> dict[str, Tensor]: ...
@overload
def synthesize(
    directory: str | os.PathLike, sigma_rel: Sequence[float], at: int | None = None, *,
    max_error: float | None = ..., dtype: torch.dtype | str | None = ...,
    progress: Callable[[int, int], None] | bool | None = ...,
) -> list[dict[str, Tensor]]: ...
@overload
def synthesize(
    directory: SynthesisPlan, *, dtype: torch.dtype | str | None = ...,
    progress: Callable[[int, int], None] | bool | None = ...,
) -> list[dict[str, Tensor]]: ...


def synthesize(
    directory: str | os.PathLike | SynthesisPlan,
    sigma_rel: float | Sequence[float] | None = None,
    at: int | None = None,
    *,
    max_error: float | None = DEFAULT_MAX_ERROR,
    dtype: torch.dtype | str | None = None,
    progress: Callable[[int, int], None] | bool | None = None,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    r"""The post-hoc EMA of relative width ``sigma_rel`` at step ``at``, as a model state dict.

    .. math:: \hat\theta = \sum_i c_i \bar\theta_i, \quad
              c = \arg\min_{\sum c_i = 1} \|\textstyle\sum_i c_i p_i - p_{target}\|_2

    over every stored profile ``p_i`` of every snapshot at or before ``at`` (a snapshot
    step; default the last). Pass 1 (:func:`plan_synthesis`) reads headers only and solves in
    float64; pass 2 reads one tensor at a time and accumulates in float32, so the peak memory
    is about one fp32 model per target plus one snapshot tensor, whatever the number of
    snapshots. Buffers that are copied, not averaged, and frozen tensors come from the
    snapshot at ``at``. Every tensor read is checked against its checksum, dtype and shape.

    Args:
        directory: the ``snapshot_dir`` of a :class:`PostHocEMA`, or a :class:`SynthesisPlan`
            from :func:`plan_synthesis` (then ``sigma_rel`` and ``at`` are the plan's, and a
            list with one state dict per target is returned).
        sigma_rel: target relative width in (0, sqrt(1/12)), or a sequence of them (one pass
            over the files; a list of state dicts is returned).
        at: the step to synthesize at; must be the step of a snapshot.
        max_error: largest accepted relative L2 error of the synthesized profile
            (``None``: accept any).
        dtype: floating dtype of the returned floating tensors, a ``torch.dtype`` or its name
            (``"float16"``); default: the model's own, per tensor. Integer tensors keep theirs.
        progress: called as ``progress(files_done, files_total)`` after each file;
            ``True`` prints that count to stderr, ``False`` or ``None``: nothing.

    Raises:
        ValueError: empty folder, truncated, corrupted or foreign file, snapshots of
            different models or runs, ``at`` not a snapshot step, or a target the snapshots
            cannot represent.
        TypeError: ``directory`` neither a path nor a plan, or a malformed argument.
    """
    dtype = _out_dtype(dtype)
    progress = _progress(progress)
    if isinstance(directory, SynthesisPlan):
        if sigma_rel is not None or at is not None or max_error not in (DEFAULT_MAX_ERROR,
                                                                        directory.max_error):
            raise TypeError("sigma_rel, at, max_error: a SynthesisPlan fixes them; pass the "
                            "plan alone")
        return _run(directory, dtype, progress)
    folder = _folder(directory)
    if sigma_rel is None:
        raise TypeError("sigma_rel: required (a number in (0, sqrt(1/12)) or a sequence)")
    single = not isinstance(sigma_rel, Sequence)
    targets: list[float] = [sigma_rel] if not isinstance(sigma_rel, Sequence) else list(sigma_rel)
    results = _run(plan_synthesis(folder, targets, at, max_error), dtype, progress)
    return results[0] if single else results
