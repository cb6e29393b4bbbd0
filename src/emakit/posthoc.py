r"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2): track power-function EMAs while training, store snapshots of them,
and after training synthesize an EMA of any length from the snapshots.

Conventions (the same as EDM2's ``training/phema.py``):

- Time ``t`` counts updates' clock units from the start of training: batches when
  ``update_interval`` is in ``ba``, epochs when it is in ``ep``. The k-th update happens at
  ``t_k`` (``t_0 = 0``) and the weights it reads, ``theta_k``, stand for the whole interval
  ``(t_{k-1}, t_k]``.
- A power-function EMA of exponent ``gamma`` has the continuous profile
  ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``(0, t]``; its relative width is
  ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``.
- Each update uses ``beta = (1 - dt / t) ** (gamma + 1)`` with ``dt = t_k - t_{k-1}``, so
  ``update_interval > 1`` stays exact. By induction the average after the update at ``t`` is

  .. math:: \bar\theta_t = \sum_k w_k \theta_k, \quad
            w_k = \frac{t_k^{\gamma+1} - t_{k-1}^{\gamma+1}}{t^{\gamma+1}}
                = \int_{t_{k-1}}^{t_k} p_t(\tau)\, d\tau,

  the continuous profile applied exactly to the piecewise-constant weight trajectory. The
  first update (``t_{k-1} = 0``) has ``beta = 0``: the average starts as a copy.
- Synthesis therefore uses the continuous inner product of profiles (EDM2 eq. 151),

  .. math:: \langle p_a, p_b \rangle = \frac{(\gamma_a+1)(\gamma_b+1)}{\gamma_a+\gamma_b+1}
            \frac{\min(t_a,t_b)^{\gamma_a+\gamma_b+1}}{t_a^{\gamma_a+1}\, t_b^{\gamma_b+1}},

  and solves, in float64, ``min_c ||sum_i c_i p_i - p_target||^2`` subject to
  ``sum_i c_i = 1`` (so a constant weight sequence is reproduced exactly; EDM2 instead
  rescales an unconstrained solution) over the snapshots taken at or before the target.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import torch
from torch import Tensor, nn

from .functional import unwrap_model
from .io import (
    dtype_from_name,
    dtype_name,
    dumps,
    model_fingerprint,
    read_metadata,
    read_tensors,
    write_safetensors,
)
from .schedules import power_smoothing, sigma_rel_to_gamma
from .shadow import Shadow
from .time import Clock, Time

__all__ = [
    "PostHocEMA",
    "SnapshotInfo",
    "synthesize",
    "solve_coefficients",
    "profile_dot",
    "list_snapshots",
    "supported_sigma_rels",
    "DEFAULT_MAX_ERROR",
    "plan_synthesis",
    "SynthesisPlan",
    "read_snapshot_info",
]

FORMAT = "emakit.posthoc-snapshot"
FORMAT_VERSION = "1"
PREFIX = "phema-"
SUFFIX = ".safetensors"
#: Largest relative L2 error of the synthesized profile that synthesize() accepts by default.
DEFAULT_MAX_ERROR = 0.05
_STATE_VERSION = 1
_INTERVAL_UNITS = ("ba", "ep")
_MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)


# --------------------------------------------------------------------------------------
# the math


def profile_dot(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """Inner products ``<p_a, p_b> = integral of p_a(tau) p_b(tau) dtau`` of power-function
    profiles ending at ``t_a`` and ``t_b`` (broadcast, float64, computed in log space)."""
    t_a, gamma_a, t_b, gamma_b = (torch.as_tensor(x, dtype=torch.float64)
                                  for x in (t_a, gamma_a, t_b, gamma_b))
    m = torch.minimum(t_a, t_b)
    log = (
        torch.log((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1))
        + (gamma_a + gamma_b + 1) * torch.log(m)
        - (gamma_a + 1) * torch.log(t_a)
        - (gamma_b + 1) * torch.log(t_b)
    )
    return torch.exp(log)


def solve_coefficients(
    ts: Sequence[float] | Tensor,
    gammas: Sequence[float] | Tensor,
    t_target: float,
    gamma_targets: Sequence[float] | Tensor,
) -> tuple[Tensor, Tensor]:
    """Coefficients ``c`` (shape ``[n, m]``, float64) with ``sum_i c[i, j] p_i ~ p_target_j``
    and ``sum_i c[i, j] = 1``, and the relative L2 error ``||sum_i c_i p_i - p_j|| / ||p_j||``
    of each target's profile (shape ``[m]``).

    ``ts[i]``, ``gammas[i]``: end time and exponent of the i-th stored profile; ``t_target``
    the target's end time (same unit); ``gamma_targets`` the targets' exponents. The
    constrained least squares is solved through its KKT system with ``torch.linalg.lstsq``
    (SVD driver, float64), robust to the near-collinear profiles of dense snapshots.
    """
    f64 = torch.float64
    ts = torch.as_tensor(ts, dtype=f64).reshape(-1) / float(t_target)  # scale: t_target = 1
    gammas = torch.as_tensor(gammas, dtype=f64).reshape(-1)
    g_out = torch.as_tensor(gamma_targets, dtype=f64).reshape(-1)
    n, m = ts.numel(), g_out.numel()
    if n == 0:
        raise ValueError("solve_coefficients: no stored profiles")
    one = torch.ones((), dtype=f64)
    gram = profile_dot(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    rhs = profile_dot(ts[:, None], gammas[:, None], one, g_out[None, :])  # [n, m]
    kkt = torch.zeros(n + 1, n + 1, dtype=f64)
    kkt[:n, :n] = gram
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    b = torch.cat([rhs, torch.ones(1, m, dtype=f64)])
    coefs = torch.linalg.lstsq(kkt, b, driver="gelsd").solution[:n]
    target = profile_dot(one, g_out, one, g_out)
    sq = target - 2 * (coefs * rhs).sum(0) + (coefs * (gram @ coefs)).sum(0)
    error = sq.clamp_min(0).sqrt() / target.sqrt()
    return coefs, error


# --------------------------------------------------------------------------------------
# snapshot files


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


def _scan(directory: str | os.PathLike) -> list[SnapshotInfo]:
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
    infos = _scan(directory)
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


def _check_sigma_rel(value: Any, name: str = "sigma_rel") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float in (0, {_MAX_SIGMA_REL:.4f}), "
                        f"got {type(value).__name__}")
    value = float(value)
    if not 0.0 < value < _MAX_SIGMA_REL:
        raise ValueError(f"{name}: expected a float in (0, sqrt(1/12) = {_MAX_SIGMA_REL:.4f}), "
                         f"got {value!r}")
    return value


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


def supported_sigma_rels(
    snapshots: list[SnapshotInfo], max_error: float = DEFAULT_MAX_ERROR, points: int = 400
) -> tuple[float, float] | None:
    """The range of sigma_rel whose profile at the last snapshot's time the snapshots
    reproduce with a relative L2 error at most ``max_error`` (scanned on a log grid), or None.
    """
    _, ts, gammas = _rows(snapshots)
    grid = torch.logspace(math.log10(0.002), math.log10(_MAX_SIGMA_REL * 0.999), points,
                          dtype=torch.float64)
    g_out = [sigma_rel_to_gamma(float(s)) for s in grid]
    _, err = solve_coefficients(ts, gammas, snapshots[-1].t, g_out)
    ok = grid[err <= max_error]
    if ok.numel() == 0:
        return None
    return float(ok.min()), float(ok.max())


# --------------------------------------------------------------------------------------
# synthesis


@dataclass
class SynthesisPlan:
    """Which snapshots enter a synthesis and with which coefficients."""

    snapshots: list[SnapshotInfo]
    sigma_rels: list[float]
    coefficients: Tensor  # [rows, targets], float64; row r is (snapshot, profile) rows[r]
    rows: list[tuple[int, int]]
    errors: Tensor  # [targets], relative L2 error of each synthesized profile


def plan_synthesis(
    directory: str | os.PathLike,
    sigma_rels: Sequence[float],
    at: int | None = None,
    max_error: float | None = DEFAULT_MAX_ERROR,
) -> SynthesisPlan:
    """Pass 1 of :func:`synthesize`: headers only, the Gram system and its solution."""
    sigma_rels = [_check_sigma_rel(s) for s in sigma_rels]
    if max_error is not None and (isinstance(max_error, bool)
                                  or not isinstance(max_error, (int, float))
                                  or not max_error > 0):
        raise ValueError(f"max_error: expected a number > 0 or None, got {max_error!r}")
    snaps = _select(list_snapshots(directory), at)
    rows, ts, gammas = _rows(snaps)
    g_out = [sigma_rel_to_gamma(s) for s in sigma_rels]
    coefs, errors = solve_coefficients(ts, gammas, snaps[-1].t, g_out)
    if max_error is not None:
        bad = [(s, float(e)) for s, e in zip(sigma_rels, errors, strict=True) if not e <= max_error]
        if bad:
            rng = supported_sigma_rels(snaps, max_error)
            where = (f"between {rng[0]:.4f} and {rng[1]:.4f}" if rng else "nowhere")
            raise ValueError(
                f"sigma_rel: {', '.join(f'{s:g} (profile error {e:.3f})' for s, e in bad)} "
                f"cannot be represented by the {len(snaps)} snapshots up to step "
                f"{snaps[-1].step} within max_error={max_error:g}; they support sigma_rel "
                f"{where}. Take snapshots more often, or pass a larger max_error"
            )
    return SynthesisPlan(snaps, sigma_rels, coefs, rows, errors)


@overload
def synthesize(
    directory: str | os.PathLike, sigma_rel: float, at: int | None = None, **kw: Any
) -> dict[str, Tensor]: ...
@overload
def synthesize(
    directory: str | os.PathLike, sigma_rel: Sequence[float], at: int | None = None, **kw: Any
) -> list[dict[str, Tensor]]: ...


def synthesize(
    directory: str | os.PathLike,
    sigma_rel: float | Sequence[float],
    at: int | None = None,
    *,
    max_error: float | None = DEFAULT_MAX_ERROR,
    dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor] | list[dict[str, Tensor]]:
    r"""The post-hoc EMA of relative width ``sigma_rel`` at step ``at``, as a model state dict.

    .. math:: \hat\theta = \sum_i c_i \bar\theta_i, \quad
              c = \arg\min_{\sum c_i = 1} \|\textstyle\sum_i c_i p_i - p_{target}\|_2

    over every stored profile ``p_i`` of every snapshot at or before ``at`` (a snapshot
    step; default the last). Pass 1 reads headers only and solves in float64; pass 2 reads
    one tensor at a time and accumulates in float32, so the peak memory is about one fp32
    model per target plus one snapshot tensor, whatever the number of snapshots. Buffers that
    are copied, not averaged, and frozen tensors come from the snapshot at ``at``.

    Args:
        directory: the ``snapshot_dir`` of a :class:`PostHocEMA`.
        sigma_rel: target relative width in (0, sqrt(1/12)), or a sequence of them (one pass
            over the files; a list of state dicts is returned).
        at: the step to synthesize at; must be the step of a snapshot.
        max_error: largest accepted relative L2 error of the synthesized profile
            (``None``: accept any).
        dtype: dtype of the returned tensors (default: the model's own, per tensor).
        progress: called as ``progress(files_done, files_total)`` after each file.

    Raises:
        ValueError: empty folder, truncated or foreign file, snapshots of different models
            or runs, ``at`` not a snapshot step, or a target the snapshots cannot represent.
    """
    single = not isinstance(sigma_rel, Sequence)
    targets = [sigma_rel] if single else list(sigma_rel)
    if not targets:
        raise ValueError("sigma_rel: expected at least one value")
    plan = plan_synthesis(directory, targets, at, max_error)
    layout = plan.snapshots[-1].layout
    averaged = [n for n, kind, _, _ in layout if kind == "average"]
    f32 = torch.float32
    acc: list[dict[str, Tensor]] = [{} for _ in targets]
    total = len(plan.snapshots)
    for i, snap in enumerate(plan.snapshots):
        rows = [(r, k) for r, (j, k) in enumerate(plan.rows) if j == i]
        with read_tensors(snap.path, what="snapshot_dir") as f:
            for name in averaged:
                for r, k in rows:
                    x = f.get_tensor(f"p{k}/{name}").to(f32)
                    for j in range(len(targets)):
                        c = float(plan.coefficients[r, j])
                        if name not in acc[j]:
                            acc[j][name] = x * c
                        else:
                            acc[j][name].add_(x, alpha=c)
                    del x
            if i == total - 1:  # copied and live tensors from the target snapshot
                rest = {n: f.get_tensor(f"{kind}/{n}") for n, kind, _, _ in layout
                        if kind in ("copy", "live")}
        if progress is not None:
            progress(i + 1, total)
    results = []
    for j in range(len(targets)):
        out: dict[str, Tensor] = {}
        for name, kind, model_dtype, aliases in layout:
            t = acc[j].pop(name) if kind == "average" else rest[name].clone()
            want = dtype or dtype_from_name(model_dtype, "layout")
            if t.is_floating_point():
                t = t.to(want)
            for n in (name, *aliases):
                out[n] = t
        results.append({n: out[n] for n in plan.snapshots[-1].order})
    return results[0] if single else results


# --------------------------------------------------------------------------------------
# tracking during training


def _interval(value: str | Time | None, name: str) -> Time | None:
    if value is None:
        return None
    t = Time.parse(value, name)
    if t.unit not in _INTERVAL_UNITS or not isinstance(t.value, int) or t.value < 1:
        raise ValueError(f"{name}: expected a whole number >= 1 of ba or ep, got {str(t)!r}")
    return t


class PostHocEMA:
    r"""Power-function EMAs of a model's weights, one per ``sigma_rel``, with periodic
    snapshots from which :func:`synthesize` builds an EMA of any length after training.

    At each update at time ``t`` (batches or epochs since the start; the previous update at
    ``t - dt``) every profile runs

    .. math:: \bar\theta \leftarrow \beta\,\bar\theta + (1 - \beta)\,\theta, \quad
              \beta = (1 - dt / t)^{\gamma + 1}

    in the storage ``dtype`` with emakit's kernels, so the average is exactly
    ``sum_k w_k theta_k`` with ``w_k = (t_k^(gamma+1) - t_{k-1}^(gamma+1)) / t^(gamma+1)``.
    ``gamma = sigma_rel_to_gamma(sigma_rel)``.

    Snapshots: every ``snapshot_every`` (and at each :meth:`snapshot` call) one safetensors
    file ``phema-<step>.safetensors`` in ``snapshot_dir`` holds every profile in
    ``snapshot_dtype``, with the metadata synthesis needs. Files are written to a temporary
    name, flushed and renamed; an existing file is never replaced (a resumed run that
    reaches a step again writes ``phema-<step>.r1.safetensors``, and synthesis follows the
    latest history).

    Args:
        model: the model being trained (DDP and ``torch.compile`` wrappers are seen through).
        sigma_rels: relative widths of the tracked profiles, each in (0, sqrt(1/12)).
            EDM2 tracks 0.05 and 0.10 and synthesizes 0.01 to 0.25 from them.
        snapshot_every: ``"1000ba"``, ``"1ep"``, or None (snapshots only on request).
            Synthesis resolution: with N snapshots over training, widths well below 0.05
            need N in the tens.
        snapshot_dir: folder for the snapshots, created when the first one is written.
        snapshot_dtype: dtype of the stored profiles (None: the storage ``dtype``). fp16
            halves the files; a stored profile then comes back to ~2e-4 (relative).
        update_interval: time between updates, ``"1ba"`` by default; in ba or ep.
        batches_per_epoch: unused by the math; kept for symmetry with :class:`~emakit.EMA`.
        buffers, dtype, device: as for :class:`~emakit.EMA`.

    Example:
        >>> import torch, emakit, tempfile
        >>> model = torch.nn.Linear(4, 2)
        >>> folder = tempfile.mkdtemp()
        >>> ph = emakit.PostHocEMA(model, snapshot_every="10ba", snapshot_dir=folder)
        >>> for _ in range(40):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(0.01 * torch.randn(2, 4))
        ...     ph.step()
        >>> len(ph.snapshots)
        4
        >>> sd = emakit.synthesize(folder, sigma_rel=0.08)
        >>> model.load_state_dict(sd)
        <All keys matched successfully>
        >>> import shutil; shutil.rmtree(folder)
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: str | Time | None = "1000ba",
        snapshot_dir: str | os.PathLike = "ema-snapshots",
        snapshot_dtype: torch.dtype | None = torch.float16,
        update_interval: str | Time = "1ba",
        batches_per_epoch: int | None = None,
        buffers: str = "average",
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(sigma_rels, (int, float)) or not isinstance(sigma_rels, Sequence):
            raise TypeError(f"sigma_rels: expected a sequence of floats, got {sigma_rels!r}")
        self.sigma_rels = tuple(_check_sigma_rel(s, "sigma_rels") for s in sigma_rels)
        if not self.sigma_rels or len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"sigma_rels: expected distinct values, got {sigma_rels!r}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.update_interval = _interval(update_interval, "update_interval")
        if self.update_interval is None:
            raise ValueError("update_interval: expected a time such as '1ba', got None")
        self.snapshot_every = _interval(snapshot_every, "snapshot_every")
        if not isinstance(snapshot_dir, (str, os.PathLike)):
            raise TypeError(f"snapshot_dir: expected a path, got {type(snapshot_dir).__name__}")
        self.snapshot_dir = Path(snapshot_dir)
        if snapshot_dtype is not None and (
            not isinstance(snapshot_dtype, torch.dtype) or not snapshot_dtype.is_floating_point
        ):
            raise TypeError(f"snapshot_dtype: expected a floating torch.dtype or None, "
                            f"got {snapshot_dtype!r}")
        self.snapshot_dtype = snapshot_dtype
        self.model = unwrap_model(model)
        self.shadows = [Shadow(self.model, dtype=dtype, device=device, buffers=buffers)
                        for _ in self.gammas]
        self.clock = Clock(batches_per_epoch)
        self.t = 0  # time of the last update, in update_interval's unit
        self.num_updates = 0
        self.run_id = uuid.uuid4().hex
        self._segment = uuid.uuid4().hex
        self._resumed_at = -1
        self.snapshots: list[Path] = []
        self._dir_checked = False
        entries = self.shadows[0].entries
        self.fingerprint = model_fingerprint(
            (n, e.source().shape) for e in entries for n in e.names
        )
        self._layout = [
            (e.names[0], e.kind, dtype_name(e.source().dtype), e.names[1:]) for e in entries
        ]
        names = {n for e in entries for n in e.names}
        self._order = [n for n in self.model.state_dict(keep_vars=True) if n in names]
        self._check_folder_model()

    # the loop's side ---------------------------------------------------------------------

    def step(self, samples: int | None = None, tokens: int | None = None) -> None:
        """Call once per optimizer step: advances the clock, updates and snapshots when due."""
        self.clock.advance_batch(samples, tokens)
        self._on_event("ba")

    def epoch_end(self) -> None:
        """Call once at the end of each epoch."""
        self.clock.advance_epoch()
        self._on_event("ep")

    def _on_event(self, unit: str) -> None:
        count = self.clock.counts[unit]
        if self.update_interval.unit == unit and count % self.update_interval.value == 0:
            self.update()
        every = self.snapshot_every
        if every is not None and every.unit == unit and count % every.value == 0:
            self.snapshot()

    def update(self) -> None:
        """Update every profile at the current clock time (a no-op if already done at it)."""
        t = self.clock.counts[self.update_interval.unit]
        if t == self.t:
            return
        if t <= 0:
            raise RuntimeError("PostHocEMA.update: the clock is at 0; call step() first")
        dt = t - self.t
        for shadow, gamma in zip(self.shadows, self.gammas, strict=True):
            if self.t == 0:
                shadow.reset()  # beta = 0: the average starts as an exact copy
            else:
                shadow.update(1.0 - power_smoothing(t, dt, gamma))
        self.t = t
        self.num_updates += 1

    # the averages ------------------------------------------------------------------------

    def _index(self, sigma_rel: float | None) -> int:
        if sigma_rel is None:
            return 0
        for i, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel, rel_tol=1e-9):
                return i
        raise ValueError(f"sigma_rel: {sigma_rel!r} is not tracked; tracked: {self.sigma_rels}")

    def ema_state_dict(self, sigma_rel: float | None = None) -> dict[str, Tensor]:
        """A plain model state dict of one tracked profile (default: the first)."""
        return self.shadows[self._index(sigma_rel)].export(started=self.num_updates > 0)

    # snapshots ---------------------------------------------------------------------------

    def _check_folder_model(self) -> None:
        if not self.snapshot_dir.is_dir():
            return
        for s in _scan(self.snapshot_dir):
            if s.fingerprint != self.fingerprint:
                raise ValueError(
                    f"snapshot_dir: {str(self.snapshot_dir)!r} holds snapshots of another "
                    f"model ({s.path.name}); use another folder"
                )

    def _check_folder_run(self) -> None:
        if self._dir_checked:
            return
        if self.snapshot_dir.is_dir():
            others = [s for s in _scan(self.snapshot_dir) if s.run_id != self.run_id]
            if others:
                raise ValueError(
                    f"snapshot_dir: {str(self.snapshot_dir)!r} holds snapshots of another "
                    f"training run ({others[0].path.name}); a resumed run must call "
                    "load_state_dict() before its first snapshot, a new run needs its own folder"
                )
        self._dir_checked = True

    def _metadata(self) -> dict[str, str]:
        from . import __version__

        dtype = self.snapshot_dtype or self.shadows[0].dtype
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "emakit_version": __version__,
            "step": str(self.clock.counts["ba"]),
            "samples": str(self.clock.counts["sp"]),
            "tokens": str(self.clock.counts["tok"]),
            "epoch": str(self.clock.counts["ep"]),
            "t": repr(float(self.t)),
            "time_unit": self.update_interval.unit,
            "num_updates": str(self.num_updates),
            "sigma_rels": dumps(list(self.sigma_rels)),
            "gammas": dumps(list(self.gammas)),
            "dtype": dtype_name(dtype) if dtype is not None else "model",
            "fingerprint": self.fingerprint,
            "layout": dumps(self._layout),
            "order": dumps(self._order),
            "run_id": self.run_id,
            "segment": self._segment,
            "resumed_at": str(self._resumed_at),
            "written_ns": str(time.time_ns()),
        }

    def _items(self) -> list[tuple[str, Tensor, torch.dtype]]:
        items = []
        for k, shadow in enumerate(self.shadows):
            for e in shadow.stored:
                if e.kind == "average":
                    dtype = self.snapshot_dtype or e.view.dtype
                    items.append((f"p{k}/{e.names[0]}", e.view, dtype))
        for e in self.shadows[0].entries:
            if e.kind == "copy":
                items.append((f"copy/{e.names[0]}", e.view, e.source().dtype))
            elif e.kind == "live":
                items.append((f"live/{e.names[0]}", e.source(), e.source().dtype))
        return items

    def snapshot(self) -> Path | None:
        """Write a snapshot of every profile now; returns its path. Never replaces a file.

        Under ``torch.distributed`` only rank 0 writes (the averages are the same on every
        rank with DDP); other ranks return None."""
        if self.num_updates == 0:
            raise RuntimeError("PostHocEMA.snapshot: no update yet, nothing to store")
        if self.clock.counts["ba"] == 0:
            raise RuntimeError("PostHocEMA.snapshot: snapshots are keyed by step; call step() "
                               "after every optimizer step (also with update_interval in ep)")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return None
        self._check_folder_run()
        step = self.clock.counts["ba"]
        items = self._items()
        for revision in range(10_000):
            tag = "" if revision == 0 else f".r{revision}"
            path = self.snapshot_dir / f"{PREFIX}{step:010d}{tag}{SUFFIX}"
            if path.exists():
                continue
            try:
                write_safetensors(path, items, self._metadata())
            except FileExistsError:  # another writer took the name meanwhile
                continue
            self.snapshots.append(path)
            return path
        raise RuntimeError(f"snapshot_dir: too many snapshots of step {step}")

    # checkpoints -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "sigma_rels": list(self.sigma_rels),
            "update_interval": str(self.update_interval),
            "snapshot_every": None if self.snapshot_every is None else str(self.snapshot_every),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loads with ``torch.load(weights_only=True)``."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "clock": self.clock.state_dict(),
            "t": self.t,
            "num_updates": self.num_updates,
            "run_id": self.run_id,
            "fingerprint": self.fingerprint,
            "averages": [
                {n: t.detach().clone() for n, t in s.tensors().items()} for s in self.shadows
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (same sigma_rels and update_interval)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping from PostHocEMA.state_dict(), "
                            f"got {type(state).__name__}")
        keys = ("version", "config", "clock", "t", "num_updates", "run_id", "averages")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"state: not a PostHocEMA.state_dict(); missing keys {missing}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"state: version {state['version']!r} is not {_STATE_VERSION}")
        cfg = state["config"]
        mine = self._config()
        for key in ("sigma_rels", "update_interval"):
            if cfg.get(key) != mine[key]:
                raise ValueError(f"state: saved with {key}={cfg.get(key)!r}, this PostHocEMA "
                                 f"has {key}={mine[key]!r}")
        if len(state["averages"]) != len(self.shadows):
            raise ValueError("state: number of profiles differs")
        for k, (shadow, tensors) in enumerate(zip(self.shadows, state["averages"], strict=True)):
            shadow.load(tensors, what=f"PostHocEMA state_dict['averages'][{k}]")
        self.clock.load_state_dict(state["clock"])
        self.t = int(state["t"])
        self.num_updates = int(state["num_updates"])
        self.run_id = str(state["run_id"])
        self._segment = uuid.uuid4().hex
        self._resumed_at = self.clock.counts["ba"]
        self._dir_checked = False
        if self.snapshot_dir.is_dir():
            later = [s.path.name for s in _scan(self.snapshot_dir)
                     if s.run_id == self.run_id and s.step > self.clock.counts["ba"]]
            if later:
                warnings.warn(
                    f"emakit: {str(self.snapshot_dir)!r} holds {len(later)} snapshots past the "
                    f"resumed step {self.clock.counts['ba']} ({later[0]}, ...); they are kept, "
                    "and left out of synthesis once this run writes its first snapshot",
                    UserWarning,
                    stacklevel=2,
                )

    def __repr__(self) -> str:
        sig = ", ".join(f"{s:g}" for s in self.sigma_rels)
        return (f"PostHocEMA(sigma_rels=({sig}), snapshot_every={self.snapshot_every}, "
                f"snapshot_dir={str(self.snapshot_dir)!r}, num_updates={self.num_updates})")


