"""A float64 oracle of emakit's documented semantics, written apart from the engine.

It reads nothing of emakit: the update rule, the warmup's product, the numbering of schedule
calls and the start / interval / switch-back / reset rules are written here from README's
"Semantics" section, in float64, with plain Python loops over the events and the factors.
The conformance matrix (``tests/test_conformance.py``) drives an :class:`Oracle` beside an
``emakit.EMA`` with the same model values and compares every export, swap, forward pass and
resumed state against it, within the bound of :data:`BOUNDS` (the table that
``docs/semantics.md`` prints, checked by the matrix).

The rules, as README states them (``ba`` batches; the interval and the times in batches):

- ``step()`` counts a batch. At the first step on or after ``start`` every stored tensor
  takes the model's value (the start copy, update 1, training time ``k = 1``; ``origin`` is
  that batch). After it, at each batch that is a multiple of the interval, an update covers
  ``k = previous k + 1 .. batch - origin + 1`` (at least one interval: an update always
  moves the training time) and uses the product of the per-batch factors
  ``s_k``: ``2 ** (-1 / half_life)``, or ``s ** (1 / interval)`` for a smoothing ``s`` per
  update, each capped by the warmup ``clamp(1 - (1 + (k - 1) / inv_gamma) ** -power,
  min_smoothing, s_max)``. A schedule is called with the update's number (the start copy is
  update 1) and capped by the warmup's product (its cap 1).
- ``ema <- s * ema + (1 - s) * model`` for averaged tensors; copied tensors (floating
  buffers with ``buffers="copy"``) take the model's value at every update; live tensors
  (frozen parameters, integer buffers, excluded tensors) are never stored: exports read
  them from the model. Before the start every export gives the model's own values.
- ``update()``: one update now (the start copy before the start); it covers the batches since
  the previous update, or one interval when none passed.
- ``reset()``: the stored tensors take the model's values, ``k = 1`` again at this batch;
  ``num_updates`` is unchanged. Before the start it takes the start copy.
- ``switch_every=N``: after the event at every multiple of N batches (once started), the
  model's averaged tensors take the average.
- ``grad_scaler``: an update is left out (the average unchanged, copied tensors still copied,
  the training time still moves, ``num_updates`` still counts it) when the scaler skipped an
  optimizer step since the previous update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Law", "Timing", "Oracle", "Bound", "BOUNDS", "bound_table", "element_bound",
           "exact_in"]


# the law ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Law:
    """How much an update weighs: one of ``half_life`` (batches), ``smoothing`` (per update)
    or ``schedule`` (``update number -> smoothing``), and an optional warmup
    ``(inv_gamma, power, min_smoothing)``."""

    half_life: float | None = None
    smoothing: float | None = None
    schedule: Callable[[int], float] | None = None
    warmup: tuple[float, float, float] | None = None

    def per_batch(self, interval: int) -> float:
        """``s_max``, the factor of one batch before the warmup caps it."""
        if self.half_life is not None:
            return 2.0 ** (-1.0 / self.half_life)
        if self.smoothing is not None:
            return self.smoothing ** (1.0 / interval)
        return 1.0  # a schedule: the warmup alone caps it

    def warmup_factor(self, k: int, cap: float) -> float:
        inv_gamma, power, floor = self.warmup  # type: ignore[misc]
        value = 1.0 - (1.0 + (k - 1) / inv_gamma) ** -power
        return min(max(value, floor), cap)

    def factor(self, first: int, last: int, number: int, interval: int) -> float:
        """The smoothing of an update covering ``k = first..last``, the ``number``-th update
        (the start copy being the first)."""
        if self.schedule is not None:
            value = float(self.schedule(number))
            if self.warmup is not None:
                product = 1.0
                for k in range(first, last + 1):
                    product *= self.warmup_factor(k, 1.0)
                value = min(value, product)
            return value
        cap = self.per_batch(interval)
        product = 1.0
        for k in range(first, last + 1):
            product *= self.warmup_factor(k, cap) if self.warmup is not None else cap
        return product


@dataclass(frozen=True)
class Timing:
    """When: ``start``, ``interval`` and ``switch_every`` in batches."""

    start: int = 0
    interval: int = 1
    switch_every: int | None = None


# the oracle -------------------------------------------------------------------------------


@dataclass
class Oracle:
    """The float64 average of one model, event by event.

    ``kinds``: name -> ``"average"``, ``"copy"`` or ``"live"`` for every state-dict name (tied
    names each). Every method takes the model's values now (name -> tensor, any dtype; read
    as float64). For the error bound: ``paths[name]`` sums ``w * |x - e|`` over the updates
    (the increments' size), ``sources[name]`` sums ``w * |x|``, and ``peak[name]`` is the
    largest ``|e|``.
    """

    law: Law
    timing: Timing
    kinds: dict[str, str]
    batch: int = 0
    started: bool = False
    origin: int = 0
    k: int = 0
    num_updates: int = 0
    skipped_since: bool = False  # a scaler-skipped step since the last update
    avg: dict[str, Tensor] = field(default_factory=dict)
    paths: dict[str, Tensor] = field(default_factory=dict)
    sources: dict[str, Tensor] = field(default_factory=dict)
    peak: dict[str, Tensor] = field(default_factory=dict)
    updates: int = 0  # start copies, updates and resets: roundings of the stored value

    def stored(self) -> list[str]:
        return [n for n, kind in self.kinds.items() if kind != "live"]

    def _take(self, values: Mapping[str, Tensor]) -> None:
        for n in self.stored():
            x = values[n].double()
            self.avg[n] = x.clone()
            self.paths.setdefault(n, torch.zeros_like(x))
            self.sources.setdefault(n, torch.zeros_like(x))
            self.peak[n] = torch.maximum(self.peak.get(n, torch.zeros_like(x)), x.abs())
        self.updates += 1

    def _begin(self, values: Mapping[str, Tensor]) -> None:
        self._take(values)
        self.started, self.origin, self.k = True, self.batch, 1
        self.num_updates += 1
        self.skipped_since = False

    def _update(self, values: Mapping[str, Tensor], last: int) -> None:
        first = self.k + 1
        s = self.law.factor(first, last, self.num_updates + 1, self.timing.interval)
        masked = self.skipped_since
        for n in self.stored():
            x = values[n].double()
            if self.kinds[n] == "copy":
                self.avg[n] = x.clone()
            elif not masked:
                e = self.avg[n]
                w = 1.0 - s
                self.paths[n] = self.paths[n] + w * (x - e).abs()
                self.sources[n] = self.sources[n] + w * x.abs()
                self.avg[n] = s * e + w * x
            self.peak[n] = torch.maximum(self.peak[n], self.avg[n].abs())
        self.k = last
        self.num_updates += 1
        self.updates += 1
        self.skipped_since = False

    def step(self, values: Mapping[str, Tensor], scaler_skipped: bool = False) -> list[str]:
        """One ``ema.step()`` after an optimizer step (``scaler_skipped``: the GradScaler
        skipped it); returns what happened (``"start"``, ``"update"``, ``"switch"``)."""
        self.batch += 1
        self.skipped_since = self.skipped_since or scaler_skipped
        done = []
        if not self.started:
            if self.batch >= self.timing.start:
                self._begin(values)
                done.append("start")
        elif self.batch % self.timing.interval == 0:
            self._update(values, self._last())
            done.append("update")
        every = self.timing.switch_every
        if self.started and every is not None and self.batch % every == 0:
            done.append("switch")
        return done

    def update(self, values: Mapping[str, Tensor]) -> None:
        """A bare ``ema.update()``."""
        if not self.started:
            self._begin(values)
            return
        self._update(values, self._last())

    def _last(self) -> int:
        """The last k an update now covers: the clock's, or one interval further when the
        average is there already (a bare ``update()`` with no step since the last one)."""
        last = self.batch - self.origin + 1
        return last if last > self.k else self.k + self.timing.interval

    def reset(self, values: Mapping[str, Tensor]) -> None:
        if not self.started:
            self._begin(values)
            return
        self._take(values)
        self.origin, self.k = self.batch, 1
        self.skipped_since = False

    def next_smoothing(self) -> float:
        """``ema.smoothing``: the factor of the next averaging update (before the start: the
        first one after the start copy)."""
        u = self.timing.interval
        if self.started:
            at = (self.batch // u + 1) * u
            first = self.k + 1
            last = max(at - self.origin + 1, first)
            return self.law.factor(first, last, self.num_updates + 1, u)
        origin = max(self.batch + 1, self.timing.start)
        at = (origin // u + 1) * u
        return self.law.factor(2, at - origin + 1, 2, u)

    def export(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What every export should hold (float64): stored tensors from the average once
        started, everything else from the model."""
        out = {}
        for n, kind in self.kinds.items():
            use = self.started and kind != "live"
            out[n] = self.avg[n] if use else values[n].double()
        return out


# bounds -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """What a storage dtype guarantees against the float64 oracle.

    ``u``: unit roundoff (half an ulp at 1); ``tiny``: the smallest subnormal (rounding errors
    near 0 are absolute); ``element_size``: bytes of one stored element (its compensation
    takes as much again)."""

    dtype: torch.dtype
    u: float
    tiny: float
    element_size: int


def _bound(dtype: torch.dtype) -> Bound:
    info = torch.finfo(dtype)
    return Bound(dtype, info.eps / 2, info.smallest_normal * info.eps,
                 torch.empty((), dtype=dtype).element_size())


#: The storage dtypes emakit averages in, and what each guarantees (docs/semantics.md).
BOUNDS: dict[torch.dtype, Bound] = {
    d: _bound(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def exact_in(model: torch.dtype, storage: torch.dtype) -> bool:
    """Whether every value of ``model`` is a value of ``storage`` (fp16 and bf16 are not
    each other's)."""
    wider = {torch.float16: (torch.float32, torch.float64),
             torch.bfloat16: (torch.float32, torch.float64), torch.float32: (torch.float64,)}
    return model == storage or storage in wider.get(model, ())


def element_bound(
    storage: torch.dtype, model: torch.dtype, compensated: bool, updates: int,
    value: Tensor, path: Tensor, source: Tensor, peak: Tensor,
) -> Tensor:
    """The largest error, per element, of an export in the ``model`` dtype of an average
    stored in ``storage`` (``compensated`` or not) after ``updates`` start copies, updates
    and resets, against the float64 average ``value``; ``path`` sums ``w |x - e|`` and
    ``source`` ``w |x|`` over the updates, ``peak`` is the largest ``|e|`` seen.

    Compensated: ``u |e| + 4 u path + 4 n u**2 peak``: the stored value is the exact
    average rounded once; what each update adds is rounded relative to its increment, not
    to the average. Plain: each update rounds relative to the average, ``(n + 1) u peak +
    4 u path``. Both: ``2 u source`` where the model's values are not all values of the
    storage dtype (each source is rounded into it), ``(n + 2)`` smallest subnormals, the
    cast of the export to the model's dtype, ``u_model |e| + tiny_model``, and the oracle's
    own rounding (it runs the recursion in float64: ``3 (n + 1) u_64 peak``).
    """
    b, m = BOUNDS[storage], BOUNDS[model]
    n = updates
    e = value.abs()
    if compensated:
        stored = b.u * e + 4 * b.u * path + 4 * n * b.u ** 2 * peak
    else:
        stored = (n + 1) * b.u * peak + 4 * b.u * path
    if not exact_in(model, storage):
        stored = stored + 2 * b.u * source
    oracle = 3 * (n + 1) * BOUNDS[torch.float64].u * peak
    return stored + (n + 2) * b.tiny + m.u * e + m.tiny + oracle


def bound_table() -> str:
    """The markdown table of :data:`BOUNDS` that ``docs/semantics.md`` prints."""
    rows = [
        "| storage `dtype` | bytes per element (`compensated=False` / `True`) | unit roundoff u "
        "| smallest subnormal |",
        "|---|---|---|---|",
    ]
    for d, b in BOUNDS.items():
        name = str(d).removeprefix("torch.")
        rows.append(f"| `{name}` | {b.element_size} / {2 * b.element_size} | "
                    f"2^{round(math.log2(b.u))} = {b.u:.3g} | {b.tiny:.3g} |")
    return "\n".join(rows)
