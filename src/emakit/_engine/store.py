"""Store: the averaged tensors of one average: allocate, update, re-plan, reset, load, swap.

A store is built from the model and a :class:`~emakit.StoreConfig`; it classifies the
model's tensors (:mod:`.layout`), places this rank's part of each (:mod:`.placements`),
plans the update (:mod:`.plan`) and runs it (:mod:`.executors`). Reading the average back
in the model's form (by name, as a state dict, for a forward pass) is :mod:`.views`.

**Never a stale average.** Every entry point first checks (:class:`~.plan.Watch`:
one integer comparison and one C-level pass over the stored tensors' addresses) that the
model still holds the tensors the plan was made for. When it does not (a parameter or buffer
replaced, ``load_state_dict(assign=True)``, ``.data`` moved, ``model.half()`` or
``model.to()``, a tensor or layer added or removed), the store re-plans:

- a tensor whose name and (global) shape are unchanged keeps its average (converted to the
  storage dtype and device, which follow the model's when ``dtype``/``device`` are None);
- a new tensor starts as a copy of the model's current value;
- a removed tensor is dropped (exports follow the model);
- a tensor whose shape changed raises a ValueError naming it, and nothing changes: its
  average cannot be carried over. :meth:`Store.reset` then restarts every average from the
  model's current weights.

Under placements whose exports gather (FSDP2, ``shard=True``) a re-plan gathers the old
averages: every rank must change its model alike, as training does anyway. Not watched: a
change of ``requires_grad`` (freezing or unfreezing a parameter), and a view of the same
memory under another shape; :meth:`Store.reset` re-classifies the model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..config import StoreConfig
from .executors import Eager, Executor, select
from .layout import Entry, Kind, classify
from .placements import Placement, Slot, choose
from .plan import Bound, Plan, Watch, build
from .tensors import all_finite, check_same_names, copy_, unwrap_model, values_swapped

__all__ = ["Store"]


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
        self._build(self._classify(), carry=None)

    # construction ------------------------------------------------------------------------

    def _classify(self) -> list[Entry]:
        c = self.config
        return classify(self.model, c.buffers, c.exclude, c.include, self.views_cache)

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

    def _check_shapes(self, slots: list[Slot], carry: dict[str, tuple]) -> None:
        for s in slots:
            old = next((carry[n] for n in s.entry.names if n in carry), None)
            if old is not None and tuple(old[0].shape) != tuple(s.shape):
                raise ValueError(
                    f"model: {s.entry.name} changed shape from {tuple(old[0].shape)} to "
                    f"{tuple(s.shape)} after the EMA was built, so its average cannot be "
                    "carried over; call reset() to restart the average from the model's "
                    "weights, or build a new EMA"
                )

    @torch.no_grad()
    def _build(self, entries: list[Entry], carry: dict[str, tuple] | None) -> None:
        """Allocate, bind and plan for ``entries``; fill each average from ``carry``
        (name -> (full average, full compensation or None)) or from the model."""
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
        watch = Watch([s.entry for s in slots], [p.watch_local(s) for s in slots])
        self.entries, self.slots, self.flat, self.comps = entries, slots, flats, comps
        self._signature = _signature(entries)
        self.plan: Plan = build(slots, watch, comps, stage=self.executor.stage)
        self._fill(slots, carry or {})

    def _fill(self, slots: list[Slot], carry: dict[str, tuple]) -> None:
        """Each average from ``carry`` (its old average and compensation, by name) or, for a
        tensor new to the store, from the model's current value."""
        p = self.placement
        dst: list[Tensor] = []
        src: list[Tensor] = []
        cdst: list[Tensor] = []
        csrc: list[Tensor] = []
        for b in Bound.of(slots):
            s = b.slot
            old = next((carry[n] for n in s.entry.names if n in carry), None)
            dst.append(b.avg)
            src.append(b.src if old is None else p.scatter(s, old[0]))
            if old is not None and s.comp is not None and old[1] is not None:
                cdst.append(s.comp)
                csrc.append(p.scatter(s, old[1]))
        copy_(dst, src)
        copy_(cdst, csrc)

    def ensure(self) -> None:
        """Re-plan when the model no longer holds the tensors the plan was made for."""
        if self.plan.watch.valid():
            return
        entries = self._classify()
        if _signature(entries) == self._signature and self.plan.watch.same_tensors():
            self.plan.watch.refresh()  # a registration elsewhere in the process
            return
        self.executor.synchronize()
        full = self.placement.gather(self.slots)
        comp = self.placement.gather(self.slots, attr="comp") if self.comps else None
        carry = {}
        for i, s in enumerate(self.slots):
            value = (full[i], None if comp is None else comp[i])
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
        """Every average takes the model's current value (compensation 0). Usable at any
        time, also after a change that could not be carried over; it classifies the model
        afresh, so parameters frozen or unfrozen since (``requires_grad``, which no cheap
        check sees) join or leave the average here."""
        self.executor.synchronize()
        entries = self._classify()  # also sees parameters frozen or unfrozen since
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
        check_same_names(
            {s.entry.name: s.shape for s in self.slots},
            {n: t.shape for n, t in tensors.items()},
            what,
        )
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
        from :meth:`compensation_tensors`) is loaded when given and kept; else it is 0."""
        self.check_load(tensors, what)
        if compensation is not None and self.comps is not None:
            self.check_load(compensation, f"{what} (compensation)")
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

    # swapping -----------------------------------------------------------------------------

    @torch.no_grad()
    def write_to_model(self) -> None:
        """Write the average into the model's tensors for good, this rank's parts into its
        shards (no gather): what ``copy_to()`` does where the model's forward gathers."""
        self.ensure()
        self.executor.synchronize()
        targets, values = self.placement.swap_pairs(self.slots)
        with self.placement.swap_scope(self.slots):
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
