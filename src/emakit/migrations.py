"""Saved states of older versions, brought to the current one: an index of small functions.

Each function takes a state of version ``v`` of one kind (``"ema"``: :class:`~emakit.EMA`
and :class:`~emakit.BEMA`; ``"posthoc"``: :class:`~emakit.PostHocEMA`) and returns the same
state as version ``v + 1``; :func:`upgrade` runs them in order. A new format version is one
more function in :data:`MIGRATIONS`, nothing else. Every state a released emakit saved keeps
loading.

>>> old = {"version": 1, "clock": {"ba": 6, "ep": 0, "sp": 0, "tok": 0}, "num_updates": 5,
...        "started": True, "average": {}}
>>> new = upgrade("ema", old, interval_units=1, interval_unit="ba")
>>> new["version"], new["num_updates"], new["k"], new["origin"]
(2, 6, 6, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .time import check_count

__all__ = ["CURRENT", "MIGRATIONS", "Context", "upgrade"]

#: The version each kind of state is saved in now.
CURRENT = {"ema": 2, "posthoc": 2}


@dataclass(frozen=True)
class Context:
    """What a migration may need from the averager loading the state."""

    interval_units: int  # the update interval's value
    interval_unit: str  # "ba" or "ep"


def _clock_count(state: Mapping[str, Any], unit: str) -> int:
    clock = state.get("clock")
    if not isinstance(clock, Mapping) or unit not in clock:
        raise ValueError(f"state['clock']: expected counts with {unit!r}, got {clock!r}")
    return check_count(clock[unit], f"state['clock'][{unit!r}]")


def _ema_1_to_2(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """emakit 0.1 (version 1) counted neither the start copy in ``num_updates`` nor the
    warmup's training time: the start copy is update 1 now, and the updates since it were
    one interval apart."""
    started = state.get("started")
    if not isinstance(started, bool):
        raise ValueError(f"state['started']: expected a bool, got {started!r}")
    num_updates = check_count(state.get("num_updates"), "state['num_updates']") + int(started)
    k = 1 + (num_updates - 1) * ctx.interval_units if started else 0
    count = _clock_count(state, ctx.interval_unit)
    return {**state, "version": 2, "num_updates": num_updates, "k": k,
            "origin": count - k + 1 if started else 0}


def _posthoc_1_to_2(state: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """PostHocEMA's version 1 kept only ``t``, the time of the last update; the power law
    needs no more than that: k = 1 at ``t`` (the span of the next update is then
    ``t_next - t``, as before)."""
    num_updates = check_count(state.get("num_updates"), "state['num_updates']")
    t = check_count(state.get("t"), "state['t']")
    started = num_updates > 0
    return {**state, "version": 2, "started": started, "origin": t if started else 0,
            "k": 1 if started else 0, "skipped_updates": 0}


Migration = Callable[[dict[str, Any], Context], dict[str, Any]]

#: (kind, version) -> the function that turns that version into the next one.
MIGRATIONS: dict[tuple[str, int], Migration] = {
    ("ema", 1): _ema_1_to_2,
    ("posthoc", 1): _posthoc_1_to_2,
}


def upgrade(
    kind: str, state: Mapping[str, Any], interval_units: int, interval_unit: str
) -> dict[str, Any]:
    """``state`` (of any version this emakit reads) in the current version of ``kind``; a
    version it does not know is a ValueError."""
    version = state.get("version")
    known = [v for (k, v) in MIGRATIONS if k == kind] + [CURRENT[kind]]
    if isinstance(version, bool) or version not in known:
        raise ValueError(f"state: version {version!r} is not one of {sorted(known)}")
    out = dict(state)
    ctx = Context(interval_units, interval_unit)
    while out["version"] < CURRENT[kind]:
        out = MIGRATIONS[(kind, out["version"])](out, ctx)
    return out
