"""When updates happen: the training clock and the cadence as pure functions. No torch here.

An averager's timing is a :class:`CadenceState` (frozen) that each event replaces with a new
one. The functions below are the whole of it:

- :func:`tick` counts a batch (with its samples and tokens) or an epoch;
- :func:`due` says what the event just counted calls for (:class:`Due`): the start copy, an
  update, a switch-back of the average into the model, a snapshot;
- :func:`constructed` says whether building the averager takes the start copy
  (``copy_at_construction``);
- :func:`begin`, :func:`span`, :func:`moved`, :func:`restart` and :func:`resumed` give the
  state after the start copy, the training time an update covers, the state after it, after
  a reset, and after the clock is put at given counts.

**Training time** ``k`` counts the interval's unit (batches for ``"ba"``) from the start copy,
which is k = 1 (counted in ``num_updates``, as ``AveragedModel.n_averaged`` counts its first
copy). An update at count ``c`` covers k = ``first..last`` with ``first`` the k after the
last update and ``last = c - origin + 1``, ``origin`` being the count at the start copy; an
update with no time elapsed since the last one (a bare ``update()``) covers one interval.
An averaging law (:mod:`emakit.laws`) turns that span into a smoothing factor.

**The start copy** is taken at the first event on or after ``start``, or, with
``copy_at_construction``, when the averager is built (at the counts then, usually 0: the
first ``step()`` is then the first averaging update, update 2, covering k = 2).

**The update phase.** With ``update_phase="zero"`` updates happen at the counts that are
multiples of the interval ``n`` (n, 2n, ...); with ``"start"`` every ``n`` after the start
copy (a copy at count ``s``, updates at ``s + n``, ``s + 2n``, ...), as MMEngine's
``interval``, Lightning's ``update_every_n_steps`` and anything that counts its own calls do.

>>> c = Cadence(start=Time(2, "ba"), interval=Time(1, "ba"))
>>> s = CadenceState()
>>> s = tick(s, "ba"); due(c, s, "ba").start   # batch 1: before the start
False
>>> s = tick(s, "ba"); due(c, s, "ba").start   # batch 2: the start copy
True
>>> s = begin(c, s); (s.k, s.origin, s.num_updates)
(1, 2, 1)
>>> s = tick(tick(s, "ba"), "ba"); span(c, s)   # batch 4: this update covers k = 2..3
Span(first=2, last=3, origin=2)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .time import COUNTED_UNITS, Time, check_count

__all__ = [
    "UPDATE_PHASES",
    "Counts",
    "Cadence",
    "CadenceState",
    "Due",
    "Span",
    "tick",
    "reached",
    "due",
    "begin",
    "span",
    "next_span",
    "moved",
    "restart",
    "resumed",
    "constructed",
]

#: Where the updates' grid is anchored: at count 0 (updates at multiples of the interval) or
#: at the start copy (updates every interval after it).
UPDATE_PHASES = ("zero", "start")


@dataclass(frozen=True, slots=True)
class Counts:
    """Training done so far: batches (optimizer steps), epochs, samples and tokens."""

    ba: int = 0
    ep: int = 0
    sp: int = 0
    tok: int = 0

    def __getitem__(self, unit: str) -> int:
        if unit not in COUNTED_UNITS:
            raise KeyError(f"unit: expected one of {COUNTED_UNITS}, got {unit!r}")
        return int(getattr(self, unit))

    def as_dict(self) -> dict[str, int]:
        """The counts by unit, e.g. ``{"ba": 8, "ep": 2, "sp": 0, "tok": 0}``."""
        return {u: self[u] for u in COUNTED_UNITS}

    @classmethod
    def from_mapping(cls, counts: Any, what: str = "counts") -> Counts:
        """Counts from a mapping of every unit to a whole number >= 0 (a saved state's
        ``"clock"``); anything else is a ValueError naming ``what``."""
        if not hasattr(counts, "keys") or sorted(counts.keys()) != sorted(COUNTED_UNITS):
            raise ValueError(f"{what}: expected counts {sorted(COUNTED_UNITS)}, got {counts!r}")
        return cls(**{u: check_count(counts[u], f"{what}[{u!r}]") for u in COUNTED_UNITS})


@dataclass(frozen=True, slots=True)
class Span:
    """The training time one update covers: k = ``first..last`` (the start copy is k = 1),
    ``origin`` being the count of the interval's unit at k = 1. In counts since the start of
    training: the update happens at ``origin + last - 1``, the previous one at
    ``origin + first - 2``."""

    first: int
    last: int
    origin: int

    @property
    def units(self) -> int:
        """How many units of the interval's unit the update covers (``dt``)."""
        return self.last - self.first + 1

    @property
    def time(self) -> int:
        """The count at which the update happens (``t``, from the start of training)."""
        return self.origin + self.last - 1


@dataclass(frozen=True, slots=True)
class Cadence:
    """When an averager starts, updates, switches back and snapshots.

    Args:
        start: the first event on or after this time takes the start copy.
        interval: updates happen at the counts of ``interval.unit`` (``ba`` or ``ep``) that
            are multiples of ``interval.value``.
        total: the whole training length, for ``dur`` times.
        batches_per_epoch: converts between ``ba`` and ``ep`` (for ``dur`` times).
        switch_every: after the update at multiples of it, the model takes the average.
        snapshot_every: at multiples of it (once started), a snapshot is due.
        start_on_interval: the start copy also waits for a multiple of the interval
            (post-hoc profiles take their copy at an update time); moot with
            ``update_phase="start"``, whose grid begins at the start copy.
        update_phase: ``"zero"``: updates at the counts that are multiples of the interval;
            ``"start"``: every interval after the start copy (see the module docstring).
        copy_at_construction: the start copy is taken when the averager is built
            (:func:`constructed`) instead of at the first event on or after ``start``.
    """

    start: Time
    interval: Time
    total: Time | None = None
    batches_per_epoch: int | None = None
    switch_every: Time | None = None
    snapshot_every: Time | None = None
    start_on_interval: bool = False
    update_phase: str = "zero"
    copy_at_construction: bool = False

    def __post_init__(self) -> None:
        if self.update_phase not in UPDATE_PHASES:
            raise ValueError(f"update_phase: expected one of {UPDATE_PHASES}, got "
                             f"{self.update_phase!r}")


@dataclass(frozen=True, slots=True)
class CadenceState:
    """Where an averager stands: the counts, whether the average started, and its training
    time (``origin``: the interval-unit count at k = 1; ``k``: the training time the average
    was last brought up to); ``num_updates`` counts the start copy and every update."""

    counts: Counts = Counts()
    started: bool = False
    origin: int = 0
    k: int = 0
    num_updates: int = 0


@dataclass(frozen=True, slots=True)
class Due:
    """What an event calls for, in this order: the start copy or an update, then a
    switch-back, then a snapshot. ``switch`` and ``snapshot`` hold once the average has
    started (the caller checks, since a guard may delay the start)."""

    start: bool = False
    update: bool = False
    switch: bool = False
    snapshot: bool = False


def tick(
    state: CadenceState, unit: str, samples: int | None = None, tokens: int | None = None
) -> CadenceState:
    """``state`` after one more batch (``unit="ba"``, with the samples and tokens it held, each
    a whole number >= 0 or None) or one more epoch (``"ep"``). A refused count counts nothing.
    """
    c = state.counts
    if unit == "ep":
        return dataclasses.replace(state, counts=dataclasses.replace(c, ep=c.ep + 1))
    if unit != "ba":
        raise ValueError(f"unit: expected 'ba' or 'ep', got {unit!r}")
    sp = check_count(samples, "samples") if samples is not None else 0
    tok = check_count(tokens, "tokens") if tokens is not None else 0
    counts = Counts(ba=c.ba + 1, ep=c.ep, sp=c.sp + sp, tok=c.tok + tok)
    return dataclasses.replace(state, counts=counts)


def reached(cadence: Cadence, counts: Counts, time: Time) -> bool:
    """Whether at least ``time`` has elapsed (``dur`` as a fraction of ``cadence.total``)."""
    if time.unit == "dur":
        total = cadence.total
        if total is None:
            raise ValueError(f"{time} is a fraction of training; it needs total")
        if total.unit == "dur" or total.value == 0:
            return True
        return counts[total.unit] >= time.value * total.value
    return counts[time.unit] >= time.value


def _multiple(counts: Counts, every: Time | None, unit: str, anchor: int = 0) -> bool:
    return (every is not None and every.unit == unit
            and (counts[unit] - anchor) % int(every.value) == 0)


def _anchor(cadence: Cadence, state: CadenceState) -> int:
    """The count the updates' grid is anchored at: 0, or the start copy's (``origin``)."""
    return state.origin if cadence.update_phase == "start" and state.started else 0


def due(cadence: Cadence, state: CadenceState, unit: str) -> Due:
    """What the event of ``unit`` just counted (by :func:`tick`) calls for."""
    counts, interval = state.counts, cadence.interval
    on_interval = _multiple(counts, interval, unit, _anchor(cadence, state))
    aligned = on_interval or not cadence.start_on_interval or cadence.update_phase == "start"
    start = (
        not state.started
        and interval.unit == unit
        and reached(cadence, counts, cadence.start)
        and aligned
    )
    return Due(
        start=start,
        update=state.started and on_interval,
        switch=_multiple(counts, cadence.switch_every, unit),
        snapshot=_multiple(counts, cadence.snapshot_every, unit),
    )


def _count(cadence: Cadence, state: CadenceState) -> int:
    return state.counts[cadence.interval.unit]


def constructed(cadence: Cadence, state: CadenceState) -> Due:
    """What building the averager calls for: the start copy with ``copy_at_construction``
    (update 1, k = 1 at the counts then), else nothing."""
    return Due(start=cadence.copy_at_construction and not state.started)


def begin(cadence: Cadence, state: CadenceState) -> CadenceState:
    """The state after the start copy: k = 1 at the current count, one more update."""
    return dataclasses.replace(
        state, started=True, origin=_count(cadence, state), k=1,
        num_updates=state.num_updates + 1,
    )


def restart(cadence: Cadence, state: CadenceState) -> CadenceState:
    """The state after a reset: k = 1 again at the current count (warmup restarts)."""
    return dataclasses.replace(state, origin=_count(cadence, state), k=1)


def resumed(cadence: Cadence, state: CadenceState, counts: Counts) -> CadenceState:
    """The state with the clock put at ``counts`` (a run resumed without a saved state of the
    average). A started average keeps its training time: its origin moves with the clock, so
    k stays where the average was brought and the next update covers the time after
    ``counts`` (an average copied at construction and put at step N is k = 1 at N)."""
    if not state.started:
        return dataclasses.replace(state, counts=counts)
    unit = cadence.interval.unit
    return dataclasses.replace(
        state, counts=counts, origin=state.origin + counts[unit] - state.counts[unit]
    )


def span(cadence: Cadence, state: CadenceState) -> Span:
    """The training time an update now covers: the interval's units since the last update,
    or one interval when the clock has not moved (a bare ``update()``)."""
    last = _count(cadence, state) - state.origin + 1
    if last <= state.k:
        last = state.k + int(cadence.interval.value)
    return Span(state.k + 1, last, state.origin)


def next_span(cadence: Cadence, state: CadenceState) -> Span:
    """The span of the next averaging update the clock will bring: at the next point of the
    updates' grid (a multiple of the interval, or of it after the start copy with
    ``update_phase="start"``). Before the start: the first averaging update after a start
    copy at the first event that may take it (the next count, or ``start`` when it is in the
    interval's unit; a start in another unit is assumed to come at the next count)."""
    u = int(cadence.interval.value)
    count = _count(cadence, state)
    if state.started:
        anchor = _anchor(cadence, state)
        upcoming = anchor + ((count - anchor) // u + 1) * u
        first = state.k + 1
        return Span(first, max(upcoming - state.origin + 1, first), state.origin)
    origin = count + 1
    if cadence.start.unit == cadence.interval.unit:
        origin = max(origin, math.ceil(cadence.start.value))
    if cadence.update_phase == "start":
        return Span(2, u + 1, origin)
    if cadence.start_on_interval:
        origin = -(-origin // u) * u
    return Span(2, (origin // u + 1) * u - origin + 1, origin)


def moved(state: CadenceState, covered: Span, counted: bool = True) -> CadenceState:
    """The state after an update that covered ``covered``; a skipped update (``counted``
    False) still moves the training time but is not counted in ``num_updates``."""
    return dataclasses.replace(
        state, k=covered.last, num_updates=state.num_updates + int(counted)
    )
