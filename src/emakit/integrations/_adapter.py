"""What every trainer adapter shares: the configuration and the average it builds, the
``evaluate_with`` check, which units the trainer must count, the swap of the averaged weights,
the statistics it logs, and the state file it checkpoints the average in.

Public hooks only, and no trainer imported here: each adapter (``lightning``,
``transformers``, ``composer``, ``accelerate``) imports its own trainer and this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..bema import BEMA
from ..config import BEMAConfig, EMAConfig, PostHocEMAConfig
from ..ema import EMA
from ..posthoc.tracker import PostHocEMA
from ..statefile import read_state, write_state

__all__ = [
    "AdapterConfig",
    "Average",
    "EVALUATE_WITH",
    "STATE_FILE",
    "LEGACY_STATE_FILE",
    "adapter_config",
    "build_average",
    "check_evaluate_with",
    "counted_units",
    "find_state_file",
    "is_sharded",
    "portable_state",
    "process_rank",
    "read_average",
    "stats",
    "Swap",
    "with_total",
    "write_average",
]

#: What ``evaluate_with`` accepts in every adapter (the Transformers callback adds "both").
EVALUATE_WITH = ("ema", "model")

#: The configurations an adapter drives: an EMA's, a BEMA's or a PostHocEMA's.
AdapterConfig = EMAConfig | BEMAConfig | PostHocEMAConfig
#: The averages an adapter drives.
Average = EMA | BEMA | PostHocEMA

#: The file an adapter checkpoints its average in (:func:`emakit.checkpoint.write_state`).
STATE_FILE = "emakit_ema.safetensors"
#: What the Transformers callback of emakit 0.1 wrote (``torch.save``); still read, with
#: ``weights_only=True``.
LEGACY_STATE_FILE = "emakit_ema.pt"


def check_evaluate_with(value: Any, allowed: tuple[str, ...] = EVALUATE_WITH,
                        hint: str = "") -> str:
    """``value`` if it is one of ``allowed``; a ValueError naming ``evaluate_with`` (and
    ``hint``) otherwise."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"evaluate_with: expected one of {allowed}, got {value!r}{hint}")
    return value


def adapter_config(
    trainer: str,
    config: AdapterConfig | None,
    kwargs: dict[str, Any],
    counts: tuple[str, ...] = ("ba", "ep"),
) -> AdapterConfig:
    """The configuration of a trainer adapter, checked at the adapter's construction rather
    than when training starts: ``config`` (an :class:`~emakit.EMAConfig`,
    :class:`~emakit.BEMAConfig` or :class:`~emakit.PostHocEMAConfig`) or an
    :class:`~emakit.EMAConfig` of ``kwargs``. ``dur`` times may lack ``total`` here (see
    :func:`with_total`). ``counts``: the units the adapter can count; a ``start`` (or a
    ``total`` for ``dur`` times) in another unit is refused, naming ``trainer``."""
    if config is None:
        config = EMAConfig(**kwargs)
    elif kwargs:
        raise TypeError(f"{trainer} adapter: pass either config or keyword arguments, not "
                        f"both (got config and {sorted(kwargs)})")
    elif not isinstance(config, (EMAConfig, BEMAConfig, PostHocEMAConfig)):
        raise TypeError(f"config: expected an emakit.EMAConfig, emakit.BEMAConfig or "
                        f"emakit.PostHocEMAConfig, got {type(config).__name__}")
    for name in ("start", "total"):
        t = getattr(config, name)
        if t is not None and t.unit in ("sp", "tok") and t.unit not in counts:
            raise ValueError(
                f"{name}={str(t)!r}: the {trainer} adapter counts "
                f"{' and '.join(counts)}, not {'samples' if t.unit == 'sp' else 'tokens'}"
            )
    return config


def counted_units(config: AdapterConfig) -> set[str]:
    """Which of ``"sp"`` and ``"tok"`` the trainer must count for ``config`` (its start, or
    the training length behind a ``dur`` time): the adapters count them only then."""
    units = {config.start.unit}
    if config.total is not None and config.uses_dur():
        units.add(config.total.unit)
    return units & {"sp", "tok"}


def with_total(config: AdapterConfig, total: str) -> AdapterConfig:
    """``config`` with ``total`` set to the trainer's planned length ``total`` when a ``dur``
    time needs it and none was given; then checked as :class:`emakit.EMA` checks it."""
    if config.total is None and config.uses_dur():
        config = dataclasses.replace(config, total=total)
    config.require_total()
    return config


def build_average(model: Any, config: AdapterConfig) -> Average:
    """The average an adapter drives: a :class:`~emakit.BEMA` for a
    :class:`~emakit.BEMAConfig`, a :class:`~emakit.PostHocEMA` (handing out its first
    profile) for a :class:`~emakit.PostHocEMAConfig`, else an :class:`~emakit.EMA`."""
    if isinstance(config, BEMAConfig):
        return BEMA(model, config=config)
    if isinstance(config, PostHocEMAConfig):
        return PostHocEMA(model, config=config)
    return EMA(model, config=config)


def stats(ema: Average) -> dict[str, float]:
    """What the adapters log after an optimizer step: the smoothing of the next update, the
    updates done (the start copy counted) and the updates skipped (``skip_nonfinite``,
    ``grad_scaler``; reading it synchronizes with the device when a scaler is watched)."""
    return {"smoothing": float(ema.smoothing), "num_updates": float(ema.num_updates),
            "skipped_updates": float(ema.skipped_updates)}


class Swap:
    """The averaged weights in the model between :meth:`enter` and :meth:`close` (the
    training weights back bitwise, also when the block between raised); entering twice is a
    no-op, so hooks that may both announce one evaluation can both call it."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.active = False

    def enter(self, ema: Average) -> None:
        if not self.active:
            self._stack.enter_context(ema.swapped())
            self.active = True

    def close(self) -> None:
        self._stack.close()
        self.active = False


def process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_sharded(model: nn.Module) -> bool:
    """Whether each rank holds only part of ``model``'s weights (FSDP1, FSDP2 and other
    DTensor meshes, DeepSpeed ZeRO-3), so that no rank can fingerprint them alone."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return True
    return any(hasattr(p, "to_local") or hasattr(p, "ds_tensor") for p in model.parameters())


def _full(value: Any) -> Any:
    if hasattr(value, "full_tensor"):  # a DTensor (FSDP2): every rank gathers it
        return value.full_tensor()
    if isinstance(value, Mapping):
        return {k: _full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_full(v) for v in value)
    return value


def portable_state(ema: Average) -> dict[str, Any]:
    """``ema.state_dict()`` with full tensors only: FSDP2's DTensors are gathered (FSDP1,
    ZeRO-3 and ``shard=True`` states are full already), so one rank can write it to a file
    that loads on any number of ranks. A collective where the average is spread: every rank
    calls it."""
    state: dict[str, Any] = _full(ema.state_dict())
    return state


def write_average(ema: Average, path: str | os.PathLike,
                  extra: Mapping[str, Any] | None = None) -> Path | None:
    """Write :func:`portable_state` (and ``extra`` beside it, under ``"extra"``) to
    ``path`` with :func:`emakit.checkpoint.write_state`: every rank gathers, rank 0 writes.
    Returns the path on rank 0, None elsewhere."""
    state = portable_state(ema)
    if process_rank() != 0:
        return None
    return write_state({"ema": state, "extra": dict(extra or {})}, path)


def find_state_file(folder: str | os.PathLike) -> Path | None:
    """The adapter state file in ``folder``: :data:`STATE_FILE`, else the
    :data:`LEGACY_STATE_FILE` of emakit 0.1, else None."""
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def read_average(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(ema state, extra)`` from a file :func:`write_average` wrote (or the legacy
    ``torch.save`` file of the Transformers callback, read with ``weights_only=True``,
    whose other keys become ``extra``). A file of another kind is a ValueError naming it."""
    saved = read_state(path)
    if not isinstance(saved.get("ema"), Mapping):
        raise ValueError(f"path: {path} holds no EMA state (keys {sorted(saved)})")
    extra = saved.get("extra", {k: v for k, v in saved.items() if k != "ema"})
    if not isinstance(extra, Mapping):
        raise ValueError(f"path: {path}: its 'extra' entry is not a mapping")
    return dict(saved["ema"]), dict(extra)


def tensors_fingerprint(tensors: Iterable[Tensor]) -> Tensor:
    """Per tensor, the float64 sum and sum of magnitudes: enough to tell one set of weights
    from any other, at one host sync."""
    rows = [torch.stack([t.detach().double().sum(), t.detach().double().abs().sum()])
            for t in tensors]
    return torch.stack(rows).cpu() if rows else torch.zeros(0, 2, dtype=torch.float64)
