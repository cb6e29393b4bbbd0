"""PostHocEMA: power-function EMA profiles tracked during training, with snapshots; a face of
the :class:`~emakit.averager.Averager` with one :class:`~emakit.laws.PowerFunction` law per
profile."""

from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..averager import Averager
from ..config import PostHocEMAConfig, PostHocEMAOptions, Unpack
from ..io import dtype_from_name, dtype_name, dumps, model_fingerprint
from ..laws import PowerFunction
from ..schedules import sigma_rel_to_gamma
from .snapshots import FORMAT, FORMAT_VERSION, scan, write_snapshot

__all__ = ["PostHocEMA"]


class PostHocEMA(Averager):
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
        config: a :class:`~emakit.PostHocEMAConfig`, or its fields as keyword arguments:
            ``sigma_rels`` (relative widths of the tracked profiles, each in (0, sqrt(1/12));
            EDM2 tracks 0.05 and 0.10 and synthesizes 0.01 to 0.25 from them),
            ``snapshot_every`` (``"1000ba"``, ``"1ep"``, or None: snapshots only on request;
            with N snapshots over training, widths well below 0.05 need N in the tens),
            ``snapshot_dir`` (created when the first snapshot is written),
            ``snapshot_dtype`` (dtype of the stored profiles, None: the storage ``dtype``;
            fp16 halves the files, a stored profile then comes back to ~2e-4 relative),
            ``update_interval`` (``"1ba"`` by default; in ba or ep), ``start`` (before it
            nothing is tracked, as posthoc-ema's ``update_after_step``; the first update on
            or after it copies the model, and that copy stands for the weights of all of
            ``(0, t_start]``: time ``t`` still counts from the start of training, so the
            profiles keep their shape), and the timing and storage every average shares
            (``dtype``, ``device``, ``compensated``, ``shard``, ``exclude``, ``include``,
            ``skip_nonfinite``, ``grad_scaler``, ...; see :class:`~emakit.EMAConfig`).

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

    STATE_KIND = "posthoc"

    def __init__(
        self,
        model: nn.Module,
        config: PostHocEMAConfig | None = None,
        **kwargs: Unpack[PostHocEMAOptions],
    ) -> None:
        config = PostHocEMAConfig.resolve(config, dict(kwargs), "PostHocEMA")
        config.require_total()
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in config.sigma_rels)
        cadence = config.cadence(snapshot_every=config.snapshot_every, start_on_interval=True)
        super().__init__(model, config, [PowerFunction(g) for g in self.gammas], cadence)
        self.config: PostHocEMAConfig = config
        self.run_id = uuid.uuid4().hex
        self._segment = uuid.uuid4().hex
        self._resumed_at = -1
        self.snapshots: list[Any] = []
        self._dir_checked = False
        self._describe()
        self._check_folder_model()
        self._constructed()

    sigma_rels = property(lambda self: self.config.sigma_rels)
    snapshot_every = property(lambda self: self.config.snapshot_every)
    snapshot_dir = property(lambda self: self.config.snapshot_dir)
    snapshot_dtype = property(lambda self: self.config.snapshot_dtype)
    start = property(lambda self: self.config.start)

    @property
    def t(self) -> int:
        """Time of the last update, in counts of the interval's unit since training began."""
        s = self._state
        return s.origin + s.k - 1 if s.started else 0

    def _describe(self) -> None:
        """Fingerprint, layout and order of the model as the stores see it now (global
        shapes), for snapshot headers."""
        infos = self._entries()
        self.fingerprint = model_fingerprint(
            (n, torch.Size(i.shape)) for i in infos for n in (i.name, *i.aliases)
        )
        self._layout = [(i.name, i.kind.value, dtype_name(i.dtype), list(i.aliases))
                        for i in infos]
        names = {n for i in infos for n in (i.name, *i.aliases)}
        self._order = [n for n in self._state_names() if n in names]

    # the loop's side ---------------------------------------------------------------------

    def update(self) -> None:
        """Update every profile at the current clock time (a no-op if already done at it)."""
        count = self.counts[self.update_interval.unit]
        if count == self.t:
            return
        super().update()

    def _snapshot_due(self) -> None:
        self.snapshot()

    # the averages ------------------------------------------------------------------------

    def _index(self, sigma_rel: float | None) -> int:
        if sigma_rel is None:
            return 0
        if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)):
            raise TypeError(f"sigma_rel: expected a float (one of {self.sigma_rels}) or None, "
                            f"got {sigma_rel!r}")
        for i, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel, rel_tol=1e-9):
                return i
        raise ValueError(f"sigma_rel: {sigma_rel!r} is not tracked; tracked: {self.sigma_rels}")

    def ema_state_dict(
        self, sigma_rel: float | None = None, *, rank0_only: bool = False
    ) -> dict[str, Tensor]:
        """A plain model state dict of one tracked profile (default: the first)."""
        return self._export(self._stores[self._index(sigma_rel)], rank0_only)

    def save_pretrained(self, save_directory: str | os.PathLike, sigma_rel: float | None = None,
                        **kwargs: Any) -> None:
        """One tracked profile (default: the first) as a ``from_pretrained`` folder, through
        the model's own ``save_pretrained``; see :meth:`emakit.EMA.save_pretrained`. For a
        width that is not tracked, synthesize it (:func:`emakit.synthesize`, or ``emakit
        synthesize --pretrained``)."""
        self._save_pretrained(self._stores[self._index(sigma_rel)], save_directory, kwargs)

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
        dtype = self.snapshot_dtype or self.config.dtype
        counts = self.counts
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "emakit_version": __version__,
            "step": str(counts["ba"]),
            "samples": str(counts["sp"]),
            "tokens": str(counts["tok"]),
            "epoch": str(counts["ep"]),
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
        for k in range(len(self.sigma_rels)):
            named = self._gathered(k, averaged=True)
            if named is None:
                continue
            for name, _, t in named:
                items.append((f"p{k}/{name}", t, self.snapshot_dtype or t.dtype))
        rest = self._gathered(0, averaged=False)
        if rest is None:
            return None
        for name, kind, t in rest:
            items.append((f"{kind}/{name}", t, dtype_from_name(dtypes[name])))
        return items

    def snapshot(self) -> Any:
        """Write a snapshot of every profile now; returns its path. Never replaces a file.

        Under ``torch.distributed`` every rank calls it (the profiles are gathered where
        they are spread) and only rank 0 writes; other ranks return None."""
        if self.num_updates == 0:
            raise RuntimeError("PostHocEMA.snapshot: no update yet, nothing to store")
        if self.counts["ba"] == 0:
            raise RuntimeError("PostHocEMA.snapshot: snapshots are keyed by step; call step() "
                               "after every optimizer step (also with update_interval in ep)")
        items = self._items()  # a collective where the profiles are spread over ranks
        if items is None or self._rank() != 0:
            return None
        self._check_folder_run()
        path = write_snapshot(self.snapshot_dir, self.counts["ba"], items,
                              self._metadata(), self.run_id)
        self.snapshots.append(path)
        return path

    # checkpoints -------------------------------------------------------------------------

    def _config_record(self) -> dict[str, Any]:
        return {
            "sigma_rels": list(self.sigma_rels),
            "update_interval": str(self.update_interval),
            "snapshot_every": None if self.snapshot_every is None else str(self.snapshot_every),
            "start": str(self.start),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loads with ``torch.load(weights_only=True)``.

        Format (version 2): the keys of :meth:`emakit.EMA.state_dict` but for the tensors,
        plus ``t`` (the time of the last update), ``run_id``, ``fingerprint``, ``averages``
        (one name -> tensor mapping per profile) and, with ``compensated=True``,
        ``compensations``. Version 1 states load too."""
        return {**super().state_dict(), "t": self.t, "run_id": self.run_id,
                "fingerprint": self.fingerprint}

    def _check_extra(self, state: Mapping[str, Any]) -> None:
        missing = [k for k in ("config", "run_id") if k not in state]
        if missing:
            raise ValueError(f"state: not a PostHocEMA.state_dict(); missing keys {missing}")
        cfg, mine = state["config"], self._config_record()
        if not isinstance(cfg, Mapping):
            raise ValueError(f"state['config']: expected a mapping, got {cfg!r}")
        for key in ("sigma_rels", "update_interval", "start"):
            if cfg.get(key, "0ba" if key == "start" else None) != mine[key]:
                raise ValueError(f"state: saved with {key}={cfg.get(key)!r}, this PostHocEMA "
                                 f"has {key}={mine[key]!r}")
        if not isinstance(state["run_id"], str):
            raise ValueError(f"state['run_id']: expected a string, got {state['run_id']!r}")
        self._check_times(state)

    def _check_times(self, state: Mapping[str, Any]) -> None:
        """The last update's time: where origin and k put it, no later than the saved clock
        (a post-hoc update happens at a clock time), and as ``t`` says."""
        unit = self.update_interval.unit
        clock = state["clock"][unit]
        last = state["origin"] + state["k"] - 1 if state["started"] else 0
        if last > clock or (state["started"] and state["origin"] < 1):
            raise ValueError(f"state: the last update at {unit} {last} (origin "
                             f"{state['origin']}, k {state['k']}) does not fit the clock at "
                             f"{unit} {clock}")
        if "t" in state and state["t"] != last:
            raise ValueError(f"state['t']: expected {last} (the last update's time), got "
                             f"{state['t']!r}")

    def _compare_config(self, saved: Any) -> None:
        """Checked (and refused) in :meth:`_check_extra`: the profiles must match."""

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        self.run_id = state["run_id"]
        self._segment = uuid.uuid4().hex
        step = self.counts["ba"]
        self._resumed_at = step
        self._dir_checked = False
        if self.snapshot_dir.is_dir():
            later = [s.path.name for s in scan(self.snapshot_dir)
                     if s.run_id == self.run_id and s.step > step]
            if later:
                warnings.warn(
                    f"emakit: {str(self.snapshot_dir)!r} holds {len(later)} snapshots past the "
                    f"resumed step {step} ({later[0]}, ...); they are kept, "
                    "and left out of synthesis once this run writes its first snapshot",
                    UserWarning,
                    stacklevel=3,
                )

    def __repr__(self) -> str:
        sig = ", ".join(f"{s:g}" for s in self.sigma_rels)
        return (f"PostHocEMA(sigma_rels=({sig}), snapshot_every={self.snapshot_every}, "
                f"snapshot_dir={str(self.snapshot_dir)!r}, num_updates={self.num_updates})")
