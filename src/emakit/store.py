"""Store: the averaged tensors of one EMA: allocate, update, swap, export, load.

A store is built from the model and the storage arguments; it classifies the model's tensors
(:mod:`emakit.layout`), places this rank's part of each (:mod:`emakit.placement`), plans the
update (:mod:`emakit.plan`) and runs it (:mod:`emakit.executors`). Everything the outside
sees goes through names: ``tensors()`` and ``load()`` by canonical state-dict name,
``export()`` as a plain model state dict.

**Never a stale average.** Every entry point first checks (:class:`~emakit.plan.Watch`:
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
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .executors import EXECUTORS, Eager, select
from .functional import all_finite, check_same_names, copy_, unwrap_model, values_swapped
from .layout import Entry, Selector, check_storage, classify
from .placement import Placement, Slot, choose, rank
from .plan import Plan, Watch, build

__all__ = ["Store", "EntryInfo"]


@dataclass(frozen=True)
class EntryInfo:
    """One tensor of the model as the store sees it: for snapshots and fingerprints."""

    name: str
    kind: str  # average | copy | live
    shape: tuple[int, ...]  # global shape
    dtype: torch.dtype  # the model's dtype
    aliases: tuple[str, ...]  # tied names


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
        dtype: storage dtype (``None``: each tensor's own). ``torch.float32`` (the default)
            is a floor: a wider (fp64) tensor keeps its own dtype.
        device: where the average lives (``None``: beside each tensor).
        buffers: ``"average"`` or ``"copy"`` for floating buffers.
        side_stream: deprecated, ignored with a ``FutureWarning``: a side stream saved
            nothing measurable in a GPU training step and raced with weights written in
            place outside ``torch.optim``; updates run on the current stream.
        shard: keep 1/world of the average of a replicated model on each rank.
        group: the process group of ``shard`` and FSDP2 collectives.
        exclude, include: see :mod:`emakit.layout`.
        compensated: keep a compensation term beside the average (same layout and dtype),
            so that ``average + compensation`` tracks a float64 EMA
            (:func:`emakit.kernels.lerp_`); doubles the state.
        placement: a :class:`~emakit.placement.Placement` to use instead of the default.
        executor: how updates run (:func:`emakit.executors.select`): ``"auto"`` (CUDA: fused
            kernels replayed from a CUDA graph; CPU: fused when compensated, else eager),
            ``"eager"``, ``"fused"`` or ``"graph"``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> store = Store(model)
        >>> before = store.tensors()["weight"].clone()
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> store.update(0.25)  # avg <- avg + 0.25 * (1 - avg)
        >>> torch.allclose(store.tensors()["weight"], before + 0.25 * (1.0 - before))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        buffers: str = "average",
        side_stream: bool = False,
        shard: bool = False,
        group: Any = None,
        exclude: Selector = None,
        include: Selector = None,
        compensated: bool = False,
        placement: Placement | None = None,
        executor: str = "auto",
    ) -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor: expected one of {EXECUTORS}, got {executor!r}")
        if side_stream:
            warnings.warn(
                "side_stream=True is deprecated and ignored: updates run on the current "
                "stream (a side stream saved nothing measurable and raced with in-place "
                "writes outside torch.optim)",
                FutureWarning,
                stacklevel=3,  # the caller of EMA(...)
            )
        self.model = unwrap_model(model)
        self.dtype, self.device, self.buffers = check_storage(dtype, device, buffers)
        self.side_stream = False
        self.executor_kind = executor
        self.exclude, self.include = exclude, include
        self.compensated = bool(compensated)
        # chosen again at each re-plan unless given: deepspeed.initialize partitions the
        # parameters of a model that an EMA was built on before it (ZeRO-3)
        self._auto_placement = None if placement is not None else (shard, group)
        self.placement = placement if placement is not None else choose(self.model, shard, group)
        self.executor: Eager = Eager()
        self.flat: dict = {}
        self.comps: dict | None = None
        self._build(self._classify(), carry=None)

    # construction ------------------------------------------------------------------------

    def _classify(self) -> list[Entry]:
        return classify(self.model, self.buffers, self.exclude, self.include)

    def _slots(self, entries: list[Entry]) -> list[Slot]:
        p = self.placement
        slots = []
        for e in entries:
            if e.kind == "live":
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
        self.executor = select(self.executor_kind, {s.key[0] for s in slots}, self.compensated)
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
        dst, src, cdst, csrc = [], [], [], []
        for s in slots:
            if s.avg is None:
                continue
            old = next((carry[n] for n in s.entry.names if n in carry), None) if carry else None
            if old is None:
                dst.append(s.avg)
                src.append(s.src)
                continue
            dst.append(s.avg)
            src.append(p.scatter(s, old[0]))
            if s.comp is not None and old[1] is not None:
                cdst.append(s.comp)
                csrc.append(p.scatter(s, old[1]))
        copy_(dst, src)
        copy_(cdst, csrc)

    def _ensure(self) -> None:
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
        self._ensure()
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
        live = [s for s in self.slots if s.avg is not None]
        copy_([s.avg for s in live], [s.src for s in live])
        if self.comps is not None:
            for c in self.comps.values():
                c.zero_()

    def sources_finite(self) -> bool:
        """Whether the model's stored tensors (averaged and copied) are finite on this rank's
        parts (one host-device sync; combine ranks with :func:`emakit.distributed.all_ranks`).
        """
        self._ensure()
        return all_finite([s.src for s in self.slots if s.avg is not None])

    def workspace_nbytes(self) -> int:
        """Bytes of staging buffers (dtype/device conversion, pinned host copies)."""
        return self.plan.workspace_nbytes()

    def state_nbytes(self) -> int:
        """Bytes of the average (and its compensation) held on this rank."""
        flats = list(self.flat.values()) + list((self.comps or {}).values())
        return sum(f.numel() * f.element_size() for f in flats)

    # names -------------------------------------------------------------------------------

    def describe(self) -> list[EntryInfo]:
        """Every tensor of the model (tied ones once), in state-dict order."""
        self._ensure()
        out = []
        for e in self.entries:
            t = e.tensor()
            out.append(EntryInfo(e.name, e.kind, tuple(self.placement.shape(t)), t.dtype,
                                 tuple(e.names[1:])))
        return out

    def tensors(self) -> dict[str, Tensor]:
        """Stored tensors by canonical name, storage dtype, in the model's own form: views
        (one process), DTensors over the local shards (FSDP2), full tensors (``shard=True``,
        gathered: a collective)."""
        self._ensure()
        values = self.placement.values(self.slots)
        return {s.entry.name: v for s, v in zip(self.slots, values, strict=True)}

    def compensation_tensors(self) -> dict[str, Tensor]:
        """The compensation terms by canonical name, like :meth:`tensors` ({} without)."""
        self._ensure()
        if self.comps is None:
            return {}
        values = self.placement.values(self.slots, attr="comp")
        return {s.entry.name: v for s, v in zip(self.slots, values, strict=True)}

    def check_load(self, tensors: Mapping[str, Tensor], what: str = "state_dict") -> None:
        """Raise a ValueError (names, global shapes) or TypeError (not a floating tensor)
        unless :meth:`load` would accept ``tensors``; changes nothing."""
        self._ensure()
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
        live = [s for s in self.slots if s.avg is not None]
        copy_([s.avg for s in live], [p.scatter(s, tensors[s.entry.name]) for s in live])
        if self.comps is not None:
            if compensation is None:
                for c in self.comps.values():
                    c.zero_()
            else:
                copy_([s.comp for s in live],
                      [p.scatter(s, compensation[s.entry.name]) for s in live])

    # the average in the model's form -----------------------------------------------------

    @torch.no_grad()
    def export(self, started: bool = True, rank0_only: bool = False) -> OrderedDict[str, Tensor]:
        """A plain state dict of the averaged model: keys and dtypes as ``model.state_dict()``.

        Stored tensors are cast back to the model's dtype; live ones are read from the model.
        Before ``started`` the model's own values are given. Gathered where the placement
        spreads the average (a collective). ``rank0_only``: only rank 0 keeps the tensors,
        on the CPU; other ranks get an empty dict."""
        self._ensure()
        keep = not rank0_only or rank(self.placement.group) == 0
        by_name: dict[str, tuple[Slot, Tensor | None]] = {}
        if started:
            full = self.placement.gather(self.slots, rank0_only=rank0_only)
            for s, f in zip(self.slots, full, strict=True):
                for n in s.entry.names:
                    by_name[n] = (s, f)
        out: OrderedDict[str, Tensor] = OrderedDict()
        done: dict[int, Tensor] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            hit = by_name.get(name)
            key = id(hit[0]) if hit is not None else id(tensor)
            if key not in done:
                if hit is not None:
                    value = hit[1]
                    if value is None:  # rank0_only, another rank
                        continue
                    value = value.to(dtype=hit[0].dtype, copy=True)
                else:
                    value = self.placement.full(tensor).clone()
                done[key] = value.cpu() if rank0_only else value
            if keep:
                out[name] = done[key]
        return out if keep else OrderedDict()

    def named_tensors(
        self, kinds: tuple[str, ...] = ("average", "copy", "live"), rank0_only: bool = False
    ) -> list[tuple[str, str, Tensor]] | None:
        """(canonical name, kind, full tensor) for every entry of ``kinds``, in state-dict
        order: stored ones gathered in the storage dtype, live ones from the model. A
        collective where the placement spreads the average; with ``rank0_only`` other ranks
        get None."""
        self._ensure()
        keep = not rank0_only or rank(self.placement.group) == 0
        slots = [s for s in self.slots if s.entry.kind in kinds]
        full = dict(zip([id(s.entry) for s in slots],
                        self.placement.gather(slots, rank0_only=rank0_only), strict=True))
        out = []
        for e in self.entries:
            if e.kind not in kinds:
                continue
            if e.kind == "live":
                value = self.placement.full(e.tensor())
            else:
                value = full[id(e)]
            out.append((e.name, e.kind, value))
        return out if keep else None

    def mapping(self, started: bool = True) -> dict[str, Tensor]:
        """Name -> tensor for ``torch.func.functional_call``: the averages in the model's
        dtype and device and own form (a transient cast only where they differ), live
        tensors from the model. Gathered under ``shard=True`` (a collective)."""
        self._ensure()
        result: dict[str, Tensor] = {}
        values = self.placement.values(self.slots, convert=True) if started else []
        stored = {id(s.entry): v for s, v in zip(self.slots, values, strict=False)}
        for e in self.entries:
            t = stored.get(id(e))
            if t is None:
                t = e.tensor().detach()
            for name in e.names:
                result[name] = t
        return result

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Averaged values in the model's tensors inside the block; the training values are
        restored bitwise after it, also when it raises. Tensor identity is kept."""
        self._ensure()
        self.executor.synchronize()
        targets, values = self.placement.swap_pairs(self.slots)
        with self.placement.swap_scope(self.slots), values_swapped(targets, values):
            del values
            yield

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write the average into the model's tensors for good (no restore)."""
        self._ensure()
        self.executor.synchronize()
        targets, values = self.placement.swap_pairs(self.slots)
        copy_(targets, values)
