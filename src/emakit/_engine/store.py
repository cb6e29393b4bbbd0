"""Store: the averaged tensors of one average: allocate, update, re-plan, reset, load, swap.

A store is built from the model and a :class:`~emakit.StoreConfig`; it classifies the
model's tensors (:mod:`.layout`), places this rank's part of each (:mod:`.placements`),
plans the update (:mod:`.plan`) and runs it (:mod:`.executors`). Reading the average back
in the model's form (by name, as a state dict, for a forward pass) is :mod:`.views`.

**Never a stale average.** Every entry point first checks (:class:`~.plan.Watch`: no
Python loop per tensor) that the model still holds the tensors the plan was made for and
would classify them alike. When it does not (a parameter or buffer replaced,
``load_state_dict(assign=True)``, ``.data`` moved, ``model.half()`` or ``model.to()``, a
tensor or layer added or removed, a frozen parameter that starts training), the store
re-plans:

- a tensor keeps its average when it is held where it was (the same module and attribute:
  a layer that moved to another name, as ``del model[1]`` renumbers a Sequential, keeps its
  own), else when its name is unchanged (``load_state_dict(assign=True)``, ``model.half()``),
  provided its (global) shape is unchanged; the average is converted to the storage dtype
  and device, which follow the model's when ``dtype``/``device`` are None;
- a new tensor starts as a copy of the model's current value;
- a removed tensor is dropped (exports follow the model);
- a tensor whose shape changed raises a ValueError naming it, and nothing changes: its
  average cannot be carried over. :meth:`Store.reset` then restarts every average from the
  model's current weights.

Registrations elsewhere in the process (a loss or metric built per step, another model)
and the same parameter registered again under its name (FSDP1 with
``use_orig_params=True``, after every forward) cost nothing.

**Training starts and stops.** A parameter that is frozen (``requires_grad=False``) when
the store plans is left live: exports read it from the model. When it starts training
(gradual unfreezing; a backbone frozen for the first N steps), the next update (or export,
swap or load, whichever comes first) sees it: it starts as a copy of its value then and is
averaged from then on, every other average carried over. A parameter that stops training
stays in the average and keeps being averaged, toward the value it now keeps: the average
of its trajectory, which reaches the frozen value with the half-life instead of jumping to
it (as timm, Ultralytics and d2go average every parameter, frozen or not). :meth:`Store.reset`
classifies afresh and drops it (its average is then its value). For a frozen parameter,
:meth:`Store.load` follows the state: one that holds its average (a run resumed after it
stopped training) keeps it averaged, one that does not leaves it live.

Under placements whose exports gather (FSDP2, ``shard=True``) a re-plan gathers the old
averages: every rank must change its model alike, as training does anyway. Not watched: a
view of the same memory under another shape.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Container, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import StoreConfig
from .executors import Eager, Executor, select
from .layout import Entry, FlatEntry, Kind, Matcher, classify
from .placements import Placement, Slot, Whole, choose
from .plan import Bound, Plan, Watch, build
from .tensors import all_finite, check_same_names, copy_, unwrap_model, values_swapped

__all__ = ["Store"]


# What a pickled store rebuilds instead of holding (see Store.__getstate__).
_REBUILT = frozenset({"entries", "slots", "flat", "comps", "plan", "_signature"})


def storage_dtype(requested: torch.dtype | None, model: torch.dtype) -> torch.dtype:
    """The storage dtype of a tensor of dtype ``model``: ``requested`` (``None``: ``model``);
    ``float32``, the default, is at least fp32, so an fp64 model gets an fp64 average.

    >>> import torch
    >>> storage_dtype(torch.float32, torch.float64), storage_dtype(torch.float32, torch.bfloat16)
    (torch.float64, torch.float32)
    """
    if requested is None:
        return model
    if requested == torch.float32 and model.is_floating_point:
        return torch.promote_types(requested, model)
    return requested


def _signature(entries: list[Entry]) -> list[tuple]:
    return [(tuple(e.names), e.kind, id(e.module), e.attr, e.is_param) for e in entries]


def _probe(e: Entry) -> Tensor:
    """``e``'s tensor, or for an FSDP1 parameter a meta tensor of its shape, dtype and
    ``requires_grad``."""
    return e.view.meta() if isinstance(e, FlatEntry) and e.view is not None else e.tensor()


def _params(entries: list[Entry], kind: Kind) -> list[Entry]:
    return [e for e in entries if e.kind is kind and e.is_param]


def _owner(e: Entry) -> tuple[int, str] | None:
    """The module and attribute that hold ``e`` (None for an FSDP1 parameter, whose unit
    holds many): a layer moved to another name (``del model[1]`` renumbers a Sequential)
    keeps its own average. The old entries keep their modules alive, so ids are not reused."""
    return None if isinstance(e, FlatEntry) else (id(e.module), e.attr)


def _carried(carry: dict, e: Entry) -> tuple | None:
    """``e``'s old (average, compensation): by its holder, else by any of its names (a
    name whose old holder holds a tensor still is not carried by name: a layer inserted
    before it starts afresh)."""
    owner = _owner(e)
    if owner is not None and owner in carry:
        return carry[owner]
    return next((carry[n] for n in e.names if n in carry), None)
@torch.no_grad()
def _keep_remainders(bound: list[Bound]) -> None:
    """After ``avg <- src`` (the model's values rounded into the storage dtype), the
    compensation keeps what the rounding dropped (``comp <- src - avg``), so that a
    compensated average starts at the model's values, not half an ulp of the storage dtype
    off them, where the model's dtype is wider (an fp64 model into fp32, fp32 into 16 bits).
    One tensor at a time: it runs at a start copy, a reset or a re-plan, not per update."""
    for b in bound:
        comp = b.slot.comp
        if comp is None or b.src.dtype == b.avg.dtype:
            continue
        wide = torch.promote_types(b.src.dtype, b.avg.dtype)
        comp.copy_(b.src.detach().to(device=b.avg.device, dtype=wide) - b.avg.to(wide))


class Store:
    """Averaged copies of a model's tensors, kept where the placement says.

    Args:
        model: the training model (DDP and ``torch.compile`` wrappers are seen through).
        config: the storage (:class:`~emakit.StoreConfig`: dtype, device, buffers,
            compensated, shard, exclude, include, executor); ``side_stream`` is deprecated
            and ignored with a ``FutureWarning``. ``dtype=torch.float32`` (the default) is a
            floor: a wider (fp64) tensor keeps its own dtype (:func:`storage_dtype`).
        group: the process group of ``shard`` and FSDP2 collectives.
        placement: a :class:`~.placements.Placement` to use instead of the default.

    Example:
        >>> import torch
        >>> from emakit.config import StoreConfig
        >>> from emakit._engine import views
        >>> model = torch.nn.Linear(2, 1)
        >>> store = Store(model, StoreConfig(compensated=False))
        >>> before = views.tensors(store)["weight"].clone()
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> store.update(0.25)  # avg <- avg + 0.25 * (1 - avg)
        >>> torch.allclose(views.tensors(store)["weight"], before + 0.25 * (1.0 - before))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        config: StoreConfig,
        group: Any = None,
        placement: Placement | None = None,
    ) -> None:
        if config.side_stream:
            warnings.warn(
                "side_stream=True is deprecated and ignored: updates run on the current "
                "stream (a side stream saved nothing measurable and raced with in-place "
                "writes outside torch.optim)",
                FutureWarning,
                stacklevel=3,  # the caller of EMA(...)
            )
        self.model = unwrap_model(model)
        self.config = config
        self.dtype, self.device = config.dtype, config.device
        self.compensated = config.compensated
        # chosen again at each re-plan unless given: deepspeed.initialize partitions the
        # parameters of a model that an EMA was built on before it (ZeRO-3)
        self._auto_placement = None if placement is not None else (config.shard, group)
        self.placement = (
            placement if placement is not None else choose(self.model, config.shard, group)
        )
        self.executor: Executor = Eager()
        self.views_cache: dict = {}  # an FSDP1 model's flat-parameter views, kept
        self.flat: dict = {}
        self.comps: dict | None = None
        self._trained: set[str] = set()  # names of the parameters averaged so far
        self._pending: dict[str, tuple] | None = None  # averages a pickle brought (by name)
        self._build(self._classify(), carry=None)

    # construction ------------------------------------------------------------------------

    def _classify(self, fresh: bool = False) -> list[Entry]:
        """The model's entries; unless ``fresh``, a parameter averaged so far stays averaged
        after it stops training (see the module docstring)."""
        c = self.config
        entries = classify(self.model, c.buffers, c.exclude, c.include, self.views_cache)
        if not fresh:
            for e in self._stopped(entries, self._trained):
                e.kind = Kind.AVERAGE
        return entries

    def _stopped(self, entries: list[Entry], names: Container[str]) -> list[Entry]:
        """The live entries among ``names`` that are floating parameters left live only
        because they do not train now (not excluded)."""
        out = []
        excluded = None
        for e in entries:
            if e.kind is not Kind.LIVE or not e.is_param or not any(n in names for n in e.names):
                continue
            probe = _probe(e)
            if probe.is_floating_point() and not probe.requires_grad:
                excluded = excluded or Matcher(self.config.exclude, "exclude")
                if not excluded(e.names, probe):
                    out.append(e)
        return out

    def _slots(self, entries: list[Entry]) -> list[Slot]:
        p = self.placement
        slots = []
        for e in entries:
            if e.kind is Kind.LIVE:
                continue
            t = e.tensor()
            local = p.local(t)
            key = (self.device or local.device, storage_dtype(self.dtype, t.dtype))
            slots.append(Slot(e, p.shape(t), t.dtype, key))
        return slots

    def _check_shapes(self, slots: list[Slot], carry: dict) -> None:
        for s in slots:
            old = _carried(carry, s.entry)
            if old is not None and tuple(old[0].shape) != tuple(s.shape):
                raise ValueError(
                    f"model: {s.entry.name} changed shape from {tuple(old[0].shape)} to "
                    f"{tuple(s.shape)} after the EMA was built, so its average cannot be "
                    "carried over; call reset() to restart the average from the model's "
                    "weights, or build a new EMA"
                )

    @torch.no_grad()
    def _build(self, entries: list[Entry], carry: dict | None) -> None:
        """Allocate, bind and plan for ``entries``; fill each average from ``carry``
        (name, or (id(module), attribute) -> (full average, full compensation or None)) or
        from the model."""
        slots = self._slots(entries)
        if carry:
            self._check_shapes(slots, carry)
        self.executor.synchronize()  # pending work may still use the buffers being dropped
        self.executor = select(self.config.executor, {s.key[0] for s in slots}, self.compensated)
        p = self.placement
        flats = p.allocate(slots)
        comps = {k: torch.zeros_like(f) for k, f in flats.items()} if self.compensated else None
        for s in slots:
            p.bind(s)
            if comps is not None and s.avg is not None:
                a = s.avg
                s.comp = comps[s.key].as_strided(a.shape, a.stride(), a.storage_offset())
        watch = Watch([s.entry for s in slots], [p.watch_local(s) for s in slots], self.model,
                      _params(entries, Kind.LIVE))
        self.entries, self.slots, self.flat, self.comps = entries, slots, flats, comps
        self._trained = {n for e in _params(entries, Kind.AVERAGE) for n in e.names}
        self._signature = _signature(entries)
        self.plan: Plan = build(slots, watch, comps, stage=self.executor.stage)
        self._fill(slots, carry or {})

    def _fill(self, slots: list[Slot], carry: dict) -> None:
        """Each average from ``carry`` (its old average and compensation, by holder or name)
        or, for a tensor new to the store, from the model's current value."""
        p = self.placement
        dst: list[Tensor] = []
        src: list[Tensor] = []
        cdst: list[Tensor] = []
        csrc: list[Tensor] = []
        fresh: list[Bound] = []
        for b in Bound.of(slots):
            s = b.slot
            old = _carried(carry, s.entry)
            dst.append(b.avg)
            src.append(b.src if old is None else p.scatter(s, old[0]))
            if old is None:
                fresh.append(b)
            elif s.comp is not None and old[1] is not None:
                cdst.append(s.comp)
                csrc.append(p.scatter(s, old[1]))
        copy_(dst, src)
        copy_(cdst, csrc)
        _keep_remainders(fresh)

    def ensure(self) -> None:
        """Re-plan when the model no longer holds the tensors the plan was made for, or a
        frozen parameter started training."""
        if self.plan.watch.valid():
            return
        entries = self._classify()
        if _signature(entries) == self._signature and self.plan.watch.same_tensors():
            self.plan.watch.refresh()  # nothing the plan covers changed (a stateless layer)
            return
        self._replan(entries)

    def _replan(self, entries: list[Entry]) -> None:
        """Plan for ``entries``, every average carried over by holder or name (see the
        module docstring)."""
        self.executor.synchronize()
        full = self.placement.gather(self.slots)
        comp = self.placement.gather(self.slots, attr="comp") if self.comps else None
        claimed = {_owner(e) for e in entries}
        carry: dict[str | tuple[int, str], tuple] = {}
        for i, s in enumerate(self.slots):
            value = (full[i], None if comp is None else comp[i])
            owner = _owner(s.entry)
            if owner is not None:
                carry[owner] = value
            if owner is None or owner not in claimed:  # its holder is gone or emptied
                for n in s.entry.names:
                    carry[n] = value
        if self._auto_placement is not None:
            self.placement = choose(self.model, *self._auto_placement)
        self._build(entries, carry)

    # the update --------------------------------------------------------------------------

    @property
    def model_forward(self) -> bool:
        """Whether a forward pass with the average needs the model's own forward (FSDP2:
        its forward gathers the parameters, so the averaged shards are swapped in)."""
        return self.placement.model_forward

    @torch.no_grad()
    def update(self, weight: float | Tensor) -> None:
        """``avg <- avg + weight * (src - avg)`` on this rank's parts; ``copy`` entries take
        the source. ``weight`` = 1 - smoothing, a float or a 0-d tensor (read on the device,
        no host sync). May return before offloaded work is done."""
        self.ensure()
        self.executor.run(self.plan, weight)

    def synchronize(self) -> None:
        """Wait for pending offloaded work (``device="cpu"`` for a CUDA model)."""
        self.executor.synchronize()

    @torch.no_grad()
    def reset(self) -> None:
        """Every average takes the model's current value (the compensation keeps what
        rounding it into the storage dtype dropped, else 0). Usable at any
        time, also after a change that could not be carried over; it classifies the model
        afresh, so parameters that stopped training leave the average here (their live
        value is the average of a tensor that does not move)."""
        self.executor.synchronize()
        entries = self._classify(fresh=True)  # parameters that stopped training leave
        if not self.plan.watch.valid() or _signature(entries) != self._signature:
            if self._auto_placement is not None:
                self.placement = choose(self.model, *self._auto_placement)
            self._build(entries, carry=None)
            return
        live = Bound.of(self.slots)
        copy_([b.avg for b in live], [b.src for b in live])
        if self.comps is not None:
            for c in self.comps.values():
                c.zero_()
            _keep_remainders(live)

    def sources_finite(self) -> bool:
        """Whether the model's stored tensors (averaged and copied) are finite on this rank's
        parts (one host-device sync; combine ranks with :func:`emakit.distributed.all_ranks`).
        """
        self.ensure()
        return all_finite([b.src for b in Bound.of(self.slots)])

    def workspace_nbytes(self) -> int:
        """Bytes of staging buffers (dtype/device conversion, pinned host copies)."""
        return self.plan.workspace_nbytes()

    def state_nbytes(self) -> int:
        """Bytes of the average (and its compensation) held on this rank."""
        flats = list(self.flat.values()) + list((self.comps or {}).values())
        return sum(f.numel() * f.element_size() for f in flats)

    # loading ----------------------------------------------------------------------------

    def check_load(self, tensors: Mapping[str, Tensor], what: str = "state_dict") -> None:
        """Raise a ValueError (names, global shapes) or TypeError (not a floating tensor)
        unless :meth:`load` would accept ``tensors``; changes nothing."""
        self.ensure()
        if not isinstance(tensors, Mapping):
            raise TypeError(f"{what}: expected a mapping of name -> tensor, got "
                            f"{type(tensors).__name__}")
        bad = [n for n, t in tensors.items() if not isinstance(t, Tensor)]
        if bad:
            raise TypeError(f"{what}: expected tensors, got other values for {bad}")
        resumed, dropped = self._frozen_saved(tensors)  # see load()
        expected = {s.entry.name: s.shape for s in self.slots if s.entry not in dropped}
        for e in resumed:
            expected[e.name] = self.placement.shape(e.tensor())
        check_same_names(expected, {n: t.shape for n, t in tensors.items()}, what)
        ints = [f"{n}: {t.dtype}" for n, t in tensors.items() if not t.is_floating_point()]
        if ints:
            raise TypeError(f"{what}: expected floating tensors, got [{'; '.join(ints)}]")

    @torch.no_grad()
    def load(
        self,
        tensors: Mapping[str, Tensor],
        what: str = "state_dict",
        compensation: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Copy ``tensors`` (as from :meth:`tensors`: DTensors of any placements or full
        tensors) into this rank's parts, after :meth:`check_load`. ``compensation`` (as
        from :meth:`compensation_tensors`) is loaded when given and kept; else it is 0.
        For a parameter that is frozen now the state decides: an average saved for it (a run
        resumed after it stopped training) is taken and it stays averaged; none saved (a
        state from before it was averaged) and it is read from the model."""
        self.check_load(tensors, what)
        if compensation is not None and self.comps is not None:
            self.check_load(compensation, f"{what} (compensation)")
        self._resume_stopped(tensors)
        self.executor.synchronize()
        p = self.placement
        live = Bound.of(self.slots)
        copy_([b.avg for b in live], [p.scatter(b.slot, tensors[b.entry.name]) for b in live])
        if self.comps is not None:
            if compensation is None:
                for c in self.comps.values():
                    c.zero_()
            else:
                pairs = [(c, b) for b in live if (c := b.slot.comp) is not None]
                copy_([c for c, _ in pairs],
                      [p.scatter(b.slot, compensation[b.entry.name]) for _, b in pairs])

    def _frozen_saved(self, tensors: Mapping[str, Tensor]) -> tuple[list[Entry], list[Entry]]:
        """(live frozen parameters that ``tensors`` holds averages of, averaged frozen
        parameters it holds none of)."""
        dropped = [e for e in _params(self.entries, Kind.AVERAGE)
                   if e.name not in tensors and not _probe(e).requires_grad]
        return self._stopped(self.entries, tensors), dropped

    def _resume_stopped(self, tensors: Mapping[str, Tensor]) -> None:
        """Frozen parameters averaged as ``tensors`` (a saved state) has them."""
        resumed, dropped = self._frozen_saved(tensors)
        if resumed or dropped:
            self._trained.difference_update(n for e in dropped for n in e.names)
            self._trained.update(n for e in resumed for n in e.names)
            self._replan(self._classify())

    # swapping -----------------------------------------------------------------------------

    @torch.no_grad()
    def write_to_model(self, kinds: tuple[Kind, ...] = tuple(Kind)) -> None:
        """Write the average into the model's tensors for good, this rank's parts into its
        shards (no gather): what ``copy_to()`` does where the model's forward gathers.
        ``kinds``: only the entries of those kinds (a switch-back writes averaged ones)."""
        self.ensure()
        self.executor.synchronize()
        slots = [s for s in self.slots if s.entry.kind in kinds]
        targets, values = self.placement.swap_pairs(slots)
        with self.placement.swap_scope(slots):
            copy_(targets, values)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Averaged values in the model's tensors inside the block; the training values are
        restored bitwise after it, also when it raises. Tensor identity is kept."""
        self.ensure()
        self.executor.synchronize()
        targets, values = self.placement.swap_pairs(self.slots)
        with self.placement.swap_scope(self.slots), values_swapped(targets, values):
            del values
            yield

    # pickling -----------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """What a pickle (or ``copy.deepcopy``) of the store holds: the model, the
        configuration and each stored tensor's average and compensation by name, bitwise.
        The layout, placement, flats, plan and executor (its worker thread, compiled
        kernels, CUDA graphs) are rebuilt from them in the process that loads it, at the
        store's first use (:meth:`_restore`). Only a one-process (or replicated DDP, without
        ``shard``) average pickles: a distributed one is a TypeError that says what to use."""
        if not isinstance(self.placement, Whole):
            raise TypeError(
                f"pickle: this average is kept by the {type(self.placement).__name__} placement "
                "(a sharded or distributed model), which does not pickle; save it with "
                "state_dict() or emakit.distributed.save()"
            )
        self.ensure()
        self.executor.synchronize()
        full = self.placement.gather(self.slots)
        comp = self.placement.gather(self.slots, attr="comp") if self.comps else None
        carry = {}
        for i, s in enumerate(self.slots):
            avg = full[i]
            low = None if comp is None else comp[i]
            carry[s.entry.name] = (None if avg is None else avg.detach().clone(),
                                   None if low is None else low.detach().clone())
        return {"model": self.model, "config": self.config, "carry": carry,
                "trained": set(self._trained)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        config: StoreConfig = state["config"]
        self.model, self.config = state["model"], config
        self.dtype, self.device = config.dtype, config.device
        self.compensated = config.compensated
        self._auto_placement = (config.shard, None)
        self.placement = Whole()
        self.executor = Eager()
        self.views_cache = {}
        self._trained = set(state.get("trained", ()))
        # Built at the first use, not here: unpickling may reach this store before the
        # model it belongs to is whole (a model that holds its own EMA).
        self._pending = dict(state["carry"])

    @torch.no_grad()
    def _restore(self) -> None:
        """Build the store a pickle brought for its model, every average and compensation
        as it was pickled."""
        carry, self._pending = self._pending, None
        self._build(self._classify(), carry)

    if not TYPE_CHECKING:  # (so that type checkers still see every attribute's type)

        def __getattr__(self, name: str) -> Any:
            # Reached only for attributes the instance lacks: those an unpickled store
            # builds at its first use.
            if name in _REBUILT and self.__dict__.get("_pending") is not None:
                self._restore()
                return getattr(self, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
