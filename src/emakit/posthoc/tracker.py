"""PostHocEMA: power-function EMA profiles tracked during training, with snapshots."""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import StoreConfig, takes_config
from ..distributed import check_same_model, process_group
from ..functional import unwrap_model
from ..io import dtype_from_name, dtype_name, dumps, model_fingerprint
from ..placement import rank
from ..schedules import power_smoothing, sigma_rel_to_gamma
from ..store import Store
from ..time import Clock, Time
from .profiles import check_sigma_rel
from .snapshots import FORMAT, FORMAT_VERSION, scan, write_snapshot

__all__ = ["PostHocEMA"]

_STATE_VERSION = 1
_INTERVAL_UNITS = ("ba", "ep")


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
        start: before it nothing is tracked (posthoc-ema's ``update_after_step``); the
            first update on or after it copies the model, and that copy stands for the
            weights of all of ``(0, t_start]``: time ``t`` still counts from the start of
            training, so the profiles keep their shape.
        config: a :class:`~emakit.StoreConfig`, or its fields as keyword arguments
            (``buffers``, ``dtype``, ``device``, ``compensated``, ``shard``, ``exclude``,
            ``include``; see there), as for :class:`~emakit.EMA`.

    Under ``torch.distributed`` (DDP, FSDP2, ``shard=True``) every rank keeps its part of
    each profile as :class:`~emakit.EMA` does; a snapshot gathers the profiles (a
    collective: every rank calls ``step()``/``snapshot()`` alike) and rank 0 alone writes
    the file, which holds full tensors: synthesis reads it as a one-process snapshot.

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

    @takes_config(StoreConfig)
    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: str | Time | None = "1000ba",
        snapshot_dir: str | os.PathLike = "ema-snapshots",
        snapshot_dtype: torch.dtype | None = torch.float16,
        update_interval: str | Time = "1ba",
        batches_per_epoch: int | None = None,
        start: str | Time = "0ba",
        config: StoreConfig | None = None,
        **kwargs: Any,
    ) -> None:
        self.config = config = StoreConfig.resolve(config, kwargs, "PostHocEMA")
        self.start = Time.parse(start, "start")
        if self.start.unit == "dur":
            raise ValueError(f"start: expected a time in ba, ep, sp or tok (PostHocEMA has no "
                             f"total), got {str(self.start)!r}")
        if isinstance(sigma_rels, (int, float)) or not isinstance(sigma_rels, Sequence):
            raise TypeError(f"sigma_rels: expected a sequence of floats, got {sigma_rels!r}")
        self.sigma_rels = tuple(check_sigma_rel(s, "sigma_rels") for s in sigma_rels)
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
        shard = config.shard
        self._group = process_group(model, shard)
        self.model = unwrap_model(model)
        if self._group is not None:
            check_same_model(self.model, self._group)
        self.stores = [
            Store(self.model, **config.store_arguments(), group=self._group)
            for _ in self.gammas
        ]
        self.clock = Clock(batches_per_epoch)
        self.t = 0  # time of the last update, in update_interval's unit
        self.num_updates = 0
        self.run_id = uuid.uuid4().hex
        self._segment = uuid.uuid4().hex
        self._resumed_at = -1
        self.snapshots: list[Path] = []
        self._dir_checked = False
        self._describe()
        self._check_folder_model()

    def _describe(self) -> None:
        """Fingerprint, layout and order of the model as the stores see it now (global
        shapes), for snapshot headers."""
        infos = self.stores[0].describe()
        self.fingerprint = model_fingerprint(
            (n, torch.Size(i.shape)) for i in infos for n in (i.name, *i.aliases)
        )
        self._layout = [(i.name, i.kind, dtype_name(i.dtype), list(i.aliases)) for i in infos]
        names = {n for i in infos for n in (i.name, *i.aliases)}
        from ..fsdp1 import named_state  # FSDP1's state_dict() would all-gather the model

        self._order = [n for n, _ in named_state(self.model) if n in names]

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
        if not self.clock.reached(self.start):
            return  # before the start nothing is tracked, and no snapshot is due
        count = self.clock.counts[unit]
        if self.update_interval.unit == unit and count % self.update_interval.value == 0:
            self.update()
        every = self.snapshot_every
        if (every is not None and every.unit == unit and count % every.value == 0
                and self.num_updates > 0):
            self.snapshot()

    def update(self) -> None:
        """Update every profile at the current clock time (a no-op if already done at it)."""
        t = self.clock.counts[self.update_interval.unit]
        if t == self.t:
            return
        if t <= 0:
            raise RuntimeError("PostHocEMA.update: the clock is at 0; call step() first")
        dt = t - self.t
        for store, gamma in zip(self.stores, self.gammas, strict=True):
            if self.t == 0:
                store.reset()  # beta = 0: the average starts as an exact copy
            else:
                store.update(1.0 - power_smoothing(t, dt, gamma))
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
        return self.stores[self._index(sigma_rel)].export(started=self.num_updates > 0)

    # snapshots ---------------------------------------------------------------------------

    def _check_folder_model(self) -> None:
        if not self.snapshot_dir.is_dir():
            return
        for s in scan(self.snapshot_dir):
            if s.fingerprint != self.fingerprint:
                raise ValueError(
                    f"snapshot_dir: {str(self.snapshot_dir)!r} holds snapshots of another "
                    f"model ({s.path.name}); use another folder"
                )

    def _check_folder_run(self) -> None:
        if self._dir_checked:
            return
        if self.snapshot_dir.is_dir():
            others = [s for s in scan(self.snapshot_dir) if s.run_id != self.run_id]
            if others:
                raise ValueError(
                    f"snapshot_dir: {str(self.snapshot_dir)!r} holds snapshots of another "
                    f"training run ({others[0].path.name}); a resumed run must call "
                    "load_state_dict() before its first snapshot, a new run needs its own folder"
                )
        self._dir_checked = True

    def _metadata(self) -> dict[str, str]:
        from .. import __version__

        dtype = self.snapshot_dtype or self.config.dtype
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

    def _items(self) -> list[tuple[str, Tensor, torch.dtype]] | None:
        """What a snapshot file holds, gathered to rank 0 (a collective); None elsewhere."""
        self._describe()  # the model may have changed since the last snapshot
        dtypes = {name: dtype for name, _, dtype, _ in self._layout}
        items = []
        for k, store in enumerate(self.stores):
            named = store.named_tensors(("average",), rank0_only=True)
            if named is None:
                continue
            for name, _, t in named:
                items.append((f"p{k}/{name}", t, self.snapshot_dtype or t.dtype))
        rest = self.stores[0].named_tensors(("copy", "live"), rank0_only=True)
        if rest is None:
            return None
        for name, kind, t in rest:
            items.append((f"{kind}/{name}", t, dtype_from_name(dtypes[name])))
        return items

    def snapshot(self) -> Path | None:
        """Write a snapshot of every profile now; returns its path. Never replaces a file.

        Under ``torch.distributed`` every rank calls it (the profiles are gathered where
        they are spread) and only rank 0 writes; other ranks return None."""
        if self.num_updates == 0:
            raise RuntimeError("PostHocEMA.snapshot: no update yet, nothing to store")
        if self.clock.counts["ba"] == 0:
            raise RuntimeError("PostHocEMA.snapshot: snapshots are keyed by step; call step() "
                               "after every optimizer step (also with update_interval in ep)")
        items = self._items()  # a collective where the profiles are spread over ranks
        if items is None or rank() != 0:
            return None
        self._check_folder_run()
        path = write_snapshot(self.snapshot_dir, self.clock.counts["ba"], items,
                              self._metadata(), self.run_id)
        self.snapshots.append(path)
        return path

    # checkpoints -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "sigma_rels": list(self.sigma_rels),
            "update_interval": str(self.update_interval),
            "snapshot_every": None if self.snapshot_every is None else str(self.snapshot_every),
            "start": str(self.start),
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
                {n: t.detach().clone() for n, t in s.tensors().items()} for s in self.stores
            ],
            **({"compensations": [
                {n: t.detach().clone() for n, t in s.compensation_tensors().items()}
                for s in self.stores
            ]} if self.config.compensated else {}),
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
        for key in ("sigma_rels", "update_interval", "start"):
            if cfg.get(key, "0ba" if key == "start" else None) != mine[key]:
                raise ValueError(f"state: saved with {key}={cfg.get(key)!r}, this PostHocEMA "
                                 f"has {key}={mine[key]!r}")
        if len(state["averages"]) != len(self.stores):
            raise ValueError("state: number of profiles differs")
        pairs = list(enumerate(zip(self.stores, state["averages"], strict=True)))
        comps = state.get("compensations") if self.config.compensated else None
        if comps is not None and (not isinstance(comps, Sequence) or len(comps) != len(pairs)):
            raise ValueError("state['compensations']: expected one mapping per profile")
        for k, (store, tensors) in pairs:  # all of them first: a refused state changes nothing
            store.check_load(tensors, what=f"PostHocEMA state_dict['averages'][{k}]")
            if comps is not None:
                store.check_load(comps[k], what=f"PostHocEMA state_dict['compensations'][{k}]")
        Clock(self.clock.batches_per_epoch).load_state_dict(state["clock"])
        for k, (store, tensors) in pairs:
            store.load(tensors, what=f"PostHocEMA state_dict['averages'][{k}]",
                       compensation=None if comps is None else comps[k])
        self.clock.load_state_dict(state["clock"])
        self.t = int(state["t"])
        self.num_updates = int(state["num_updates"])
        self.run_id = str(state["run_id"])
        self._segment = uuid.uuid4().hex
        self._resumed_at = self.clock.counts["ba"]
        self._dir_checked = False
        if self.snapshot_dir.is_dir():
            later = [s.path.name for s in scan(self.snapshot_dir)
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


