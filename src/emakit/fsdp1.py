"""PyTorch's first FSDP (``FullyShardedDataParallel``): the average kept flat shard by flat shard.

FSDP1 flattens the parameters of each unit (each ``FullyShardedDataParallel`` module:
the root, and the nested units of an ``auto_wrap_policy`` or of nested ``FSDP(...)`` calls)
into one ``FlatParameter``, pads it to a multiple of the world size ``W`` and keeps on rank
``r`` the elements ``[r * S, (r + 1) * S)`` of the padded flat vector, ``S`` being the
padded shard size. Each original parameter is a run of that vector (after FSDP's own
alignment padding under ``use_orig_params=True``), so rank ``r`` holds a 1-D piece of some
of them: ``flat_param._shard_param_infos`` says which (offset in the shard, length, and
where the piece starts in the flattened parameter). :class:`FlatShard` keeps the average
the same way:

- **What is averaged.** The sharded, full-precision flat parameter ``flat_param._local_shard``:
  the tensor the optimizer steps (through the ``FlatParameter`` with ``use_orig_params=False``,
  through the original parameters, views into it, with ``use_orig_params=True``). Under
  ``MixedPrecision(param_dtype=torch.bfloat16)`` FSDP casts that shard to a low-precision
  copy (``_mp_shard``) before each all-gather and frees it after; averaging that copy would
  average weights rounded to 8 bits of mantissa, and miss every optimizer update smaller
  than their rounding step, so the full-precision shard is averaged. Between optimizer
  steps FSDP points ``flat_param.data`` at the unsharded (and, under mixed precision,
  low-precision) storage around each forward and backward pass; the average never reads
  ``flat_param.data`` once ``_local_shard`` exists, so an update, an export or an EMA built
  inside a forward pass reads the sharded values.
- **Memory.** One piece per averaged parameter held by this rank, laid out as in the
  local shard (same relative offsets: the update is one lerp per unit): about ``N / W``
  elements per rank, ``2 N / W`` with the compensation (``compensated=True``, the default).
  Buffers (not sharded by FSDP) are kept whole on every rank.
- **Update**: on ``(piece of the average, piece of the local shard)`` pairs, no communication.
- **Export** (``ema_state_dict``, ``state_dict``, snapshots): one all-gather per unit of the
  pieces the export needs (a gather to rank 0 with ``rank0_only``), into tensors of the
  original parameters' shapes, under the names of FSDP's own full state dict (no
  ``_fsdp_wrapped_module.``, no ``_flat_param``). Frozen parameters (not averaged) are
  gathered from the local shards the same way.
- **Swap** (``swapped()``, ``ema.module``, ``copy_to()``) writes the averaged pieces into the
  local shards, so FSDP's own all-gather in the next forward computes with the average; no
  communication. FSDP keeps some units' unsharded parameters allocated after a forward pass
  (the root under ``FULL_SHARD``, every unit under ``SHARD_GRAD_OP``) and reuses them in the
  next forward or backward without gathering again; before and after a swap those copies
  are freed (as FSDP frees them after a backward pass), so a forward with the average never
  reuses training values, and the backward pass after a teacher forward (DINO, BYOL)
  gathers the training values again.

Supported: ``FULL_SHARD``, ``SHARD_GRAD_OP`` and ``NO_SHARD``; ``use_orig_params`` True or
False; nested units; ``MixedPrecision``; activation-checkpointing wrappers. Refused at
construction with a ValueError naming the parameter: hybrid strategies (``HYBRID_SHARD``,
``_HYBRID_SHARD_ZERO2``), ``CPUOffload(offload_params=True)``, tensor-parallel flat
parameters (an FSDP extension), units on different process groups, and a model that is
part of an FSDP unit it does not contain (pass the ``FullyShardedDataParallel`` module
itself, not the module it wraps).

>>> from torch import nn
>>> uses_fsdp1(nn.Linear(2, 2))
False
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layout import Entry, Matcher, align
from .placement import DTensor, Key, Placement, Slot

__all__ = ["FlatShard", "FlatView", "FlatEntry", "uses_fsdp1", "fsdp1_group", "named_state"]

# The watch reads each unit's FlatParameter (``handle.flat_param``, C-level) and maps this
# over it: the sharded full-precision storage, whatever flat_param.data points at now.
_LOCAL_SHARD = operator.attrgetter("_local_shard")
# Module levels that FSDP's own state dict leaves out of names (``clean_tensor_name``).
_WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_SUPPORTED = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def _fsdp_class() -> type | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a torch built without distributed
        return None
    return FullyShardedDataParallel


def _units(model: nn.Module) -> list[Any]:
    fsdp = _fsdp_class()
    return [] if fsdp is None else [m for m in model.modules() if isinstance(m, fsdp)]


def _flattened(p: Tensor) -> bool:
    """Whether FSDP1 manages ``p``: a FlatParameter, or an original parameter flattened into
    one (``use_orig_params=True``). Tensor parallel marks its DTensors the same way."""
    return bool(getattr(p, "_is_flat_param", False)) or (
        bool(getattr(p, "_fsdp_flattened", False)) and not isinstance(p, DTensor)
    )


def uses_fsdp1(model: nn.Module) -> bool:
    """Whether ``model`` is or contains an FSDP1 unit, or holds parameters FSDP1 flattened."""
    return bool(_units(model)) or any(_flattened(p) for p in model.parameters())


def fsdp1_group(model: nn.Module) -> Any:
    """The process group of the model's FSDP1 units (None when it has none), after checking
    that the EMA can average the model exactly (a ValueError naming the parameter if not)."""
    if not uses_fsdp1(model):
        return None
    return _check_model(model, _units(model))


# one original parameter -------------------------------------------------------------------


@dataclass(eq=False)
class FlatView:
    """One original parameter of a ``FlatParameter``: where it sits in the (unsharded, unpadded)
    flat vector and which piece of it this rank's shard holds. It stands for the parameter
    wherever the store reads a model tensor (``shape`` and ``dtype`` are the parameter's
    own); the placement turns it into this rank's piece or the gathered whole."""

    unit: Any  # the FullyShardedDataParallel module whose flat parameter holds it
    flat: Any  # the FlatParameter (torch keeps its metadata in private attributes)
    index: int  # among the flat parameter's original parameters
    shape: torch.Size  # the parameter's own (global) shape
    stride: tuple[int, ...]
    contiguous: bool
    dtype: torch.dtype
    begin: int  # offset in the unsharded flat vector
    numel: int
    offset: int  # offset of this rank's piece in the local shard (-1: none)
    first: int  # where this rank's piece starts in the flattened parameter
    count: int  # elements in this rank's piece
    sharded: bool  # False for NO_SHARD: every rank holds the whole flat vector
    shard_numel: int  # S: padded shard size (NO_SHARD: the whole vector)
    rank: int
    world: int
    param: nn.Parameter | None  # the original parameter (use_orig_params=True)
    _meta: Tensor | None = None

    @property
    def requires_grad(self) -> bool:
        return (self.param if self.param is not None else self.flat).requires_grad

    def meta(self) -> Tensor:
        """A meta tensor of the parameter's shape and dtype (no memory), for ``exclude`` and
        ``include`` callables."""
        if self._meta is None:
            self._meta = torch.empty(self.shape, dtype=self.dtype, device="meta")
        self._meta.requires_grad_(self.requires_grad)
        return self._meta

    def local_shard(self) -> Tensor:
        """This rank's sharded, full-precision flat vector (padded), whatever ``flat.data``
        points at now."""
        local = self.flat.__dict__.get("_local_shard")
        if local is not None:
            return local
        # Before FSDP's lazy initialization (the first forward, summon_full_params or
        # state_dict) there is no _local_shard: the flat parameter is the shard then, as no
        # unshard happens before that initialization. It becomes _local_shard, same storage.
        flat = self.flat.detach()
        if flat.numel() != self.shard_numel:
            raise RuntimeError(
                f"model: the FlatParameter of {self.unit_name()} holds {flat.numel()} elements, "
                f"not its shard of {self.shard_numel}, and FSDP has not initialized it yet"
            )
        return flat

    def piece(self) -> Tensor:
        """This rank's piece of the parameter (1-D; empty when it holds none)."""
        local = self.local_shard()
        if self.offset < 0:
            return local[:0]
        return local[self.offset : self.offset + self.count]

    def unit_name(self) -> str:
        return _unit_name(self.flat)


def _unit_name(flat: Any) -> str:
    return f"FSDP unit of {flat._fqns[0]!r}" if flat._fqns else "an FSDP unit"


def _views(unit: Any) -> dict[tuple[int, str], FlatView]:
    """(id(module), attribute) -> FlatView for every original parameter of ``unit``'s flat
    parameter, tied ones (``_shared_param_infos``) sharing their primary's view."""
    handle = unit._handle
    flat = handle.flat_param
    # the full-precision shard's dtype: inside a forward pass under MixedPrecision, flat.data
    # (and so flat.dtype) is the low-precision unsharded copy
    dtype = flat.__dict__.get("_local_shard", flat).dtype
    sharded = handle.uses_sharded_strategy
    shard_numel = flat._sharded_size.numel()
    starts: list[int] = []
    at = 0
    for n, pad in zip(flat._numels_with_padding, flat._is_padding_mask, strict=True):
        if not pad:
            starts.append(at)
        at += n
    out: dict[tuple[int, str], FlatView] = {}
    params = flat._params
    for i, (info, shard) in enumerate(zip(flat._param_infos, flat._shard_param_infos,
                                          strict=True)):
        out[(id(info.module), info.param_name)] = FlatView(
            unit=unit, flat=flat, index=i, shape=flat._shapes[i], stride=tuple(flat._strides[i]),
            contiguous=bool(flat._contiguities[i]), dtype=dtype, begin=starts[i],
            numel=flat._numels[i],
            offset=shard.offset_in_shard if shard.in_shard else -1,
            first=shard.intra_param_start_idx if shard.in_shard else 0,
            count=shard.numel_in_shard if shard.in_shard else 0,
            sharded=sharded, shard_numel=shard_numel, rank=handle.rank if sharded else 0,
            world=handle.world_size if sharded else 1,
            param=params[i] if params is not None else None,
        )
    for info in flat._shared_param_infos:
        out[(id(info.module), info.param_name)] = out[(id(info.prim_module), info.prim_param_name)]
    return out


def _all_views(model: nn.Module, cache: dict | None = None) -> dict[tuple[int, str], FlatView]:
    views: dict[tuple[int, str], FlatView] = {}
    for unit in _units(model):
        if unit._handle is None:
            continue
        key = id(unit._handle.flat_param)
        if cache is not None and key in cache and cache[key][0] is unit._handle.flat_param:
            views.update(cache[key][1])
            continue
        found = _views(unit)
        if cache is not None:
            cache[key] = (unit._handle.flat_param, found)
        views.update(found)
    return views


# the model's state, in state-dict order, without FSDP's state-dict hooks ------------------


@dataclass
class _Item:
    name: str
    tensor: Any  # a Tensor, or a FlatView
    module: Any
    attr: str
    is_param: bool


def _walk(module: nn.Module, prefix: str, views: dict, out: list[_Item]) -> None:
    """``module``'s parameters then persistent buffers, then its children, as
    ``nn.Module.state_dict`` orders them, FSDP's flattened parameters by their original
    names and wrapper levels left out of the names. ``views``: id(module) -> [(attribute,
    FlatView)] in the flat parameter's order."""
    _own_parameters(module, prefix, views.get(id(module), ()), out)
    for attr, b in module._buffers.items():
        if b is not None and attr not in module._non_persistent_buffers_set:
            out.append(_Item(prefix + attr, b, module, attr, False))
    for name, child in module._modules.items():
        if child is not None:
            _walk(child, prefix if name in _WRAPPERS else f"{prefix}{name}.", views, out)


def _own_parameters(module: nn.Module, prefix: str, mine: Sequence[tuple[str, FlatView]],
                out: list[_Item]) -> None:
    """``module``'s own parameters: flattened ones as their FlatView, in the module's order
    where FSDP keeps them registered (``use_orig_params=True``), else in the flat
    parameter's order (``use_orig_params=False`` deletes them from the module); the
    FlatParameter itself left out."""
    flat = dict(mine)
    for attr, p in module._parameters.items():
        if attr in flat:
            view = flat.pop(attr)
            out.append(_Item(prefix + attr, view, view.unit, "flat_param", True))
        elif p is not None and not getattr(p, "_is_flat_param", False):
            out.append(_Item(prefix + attr, p, module, attr, True))
    for attr, view in flat.items():
        out.append(_Item(prefix + attr, view, view.unit, "flat_param", True))


def _items(model: nn.Module, cache: dict | None = None) -> list[_Item]:
    by_module: dict[int, list[tuple[str, FlatView]]] = {}
    for (m, attr), view in _all_views(model, cache).items():
        by_module.setdefault(m, []).append((attr, view))
    out: list[_Item] = []
    _walk(model, "", by_module, out)
    return out


def named_state(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, tensor)`` for every tensor of ``model.state_dict()``, in its order, without
    calling it on an FSDP1 model (whose ``state_dict()`` all-gathers every parameter, and
    raises inside a forward pass): there each flattened parameter comes as a
    :class:`FlatView` (its global ``shape`` and ``dtype``) under its original name.

    >>> import torch
    >>> [n for n, _ in named_state(torch.nn.BatchNorm1d(2))]
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """
    if not uses_fsdp1(model):
        return [(n, t) for n, t in model.state_dict(keep_vars=True).items()
                if isinstance(t, Tensor)]
    return [(it.name, it.tensor) for it in _items(model)]


@dataclass(eq=False)
class FlatEntry(Entry):
    """An entry for an original parameter of a ``FlatParameter``. The staleness watch reads
    the unit's flat parameter from its handle (``handle.flat_param``) and the placement maps
    it to its local shard; ``tensor()`` is the parameter's :class:`FlatView`."""

    view: FlatView | None = None

    @property
    def table(self) -> dict[str, Tensor]:
        return self.module._handle.__dict__

    def tensor(self) -> Any:  # type: ignore[override]
        return self.view


# the placement ------------------------------------------------------------------------------


def _check_unit(unit: Any, world_group: Any) -> None:
    handle = unit._handle
    flat = handle.flat_param
    name = flat._fqns[0] if flat._fqns else type(unit).__name__
    strategy = unit.sharding_strategy.name
    if strategy not in _SUPPORTED:
        raise ValueError(
            f"model: the FlatParameter holding {name!r} is sharded with "
            f"sharding_strategy={strategy}, which the EMA does not support (supported: "
            f"{', '.join(_SUPPORTED)}); use one of those, or FSDP2 (fully_shard) for HSDP"
        )
    if unit.cpu_offload.offload_params:
        raise ValueError(
            f"model: the FlatParameter holding {name!r} uses "
            "CPUOffload(offload_params=True), which the EMA does not support; build FSDP "
            "without it, or keep the average off the accelerator with EMA(..., device='cpu')"
        )
    if any(e is not None for e in flat._param_extensions):
        raise ValueError(
            f"model: the FlatParameter holding {name!r} flattens tensor-parallel DTensors (an "
            "FSDP extension), which the EMA does not support; use FSDP2 (fully_shard) with "
            "tensor parallelism"
        )
    if world_group is not None and unit.process_group is not world_group:
        raise ValueError(
            f"model: the FlatParameter holding {name!r} is sharded over another process group "
            "than the model's other FSDP units; the EMA needs one group for all of them"
        )


def _check_model(model: nn.Module, units: list[Any]) -> Any:
    """Refuse what :class:`FlatShard` cannot average exactly; the units' process group."""
    group = None
    owned: set[int] = set()
    for unit in units:
        if unit._handle is None:
            continue
        _check_unit(unit, group)
        group = unit.process_group
        flat = unit._handle.flat_param
        owned.add(id(flat))
        owned.update(id(p) for p in flat._params or ())
        owned.update(id(p) for p in flat._shared_params or ())
    for name, p in model.named_parameters():
        clean = ".".join(a for a in name.split(".") if a not in _WRAPPERS)
        if isinstance(p, DTensor):
            raise ValueError(
                f"model: {clean} is a DTensor in a model that also uses FSDP1 "
                "(FullyShardedDataParallel); the EMA supports one or the other"
            )
        if _flattened(p) and id(p) not in owned:
            if getattr(p, "_is_flat_param", False):
                clean = f"{clean} (holding {', '.join(map(repr, getattr(p, '_fqns', ())))})"
            raise ValueError(
                f"model: {clean} is flattened by an FSDP1 unit (FullyShardedDataParallel) "
                "that is not part of the model given to the EMA; pass the "
                "FullyShardedDataParallel module itself (the root), not the module it wraps"
            )
    return group


@dataclass(frozen=True)
class _Run:
    """Elements ``[lo, hi)`` of a unit's unsharded flat vector, as its ranks' shards split
    them: rank ``q`` holds ``[q * S, (q + 1) * S)`` (every rank all of it under NO_SHARD)."""

    lo: int
    hi: int
    unit: FlatView  # any view of the unit: its shard size, world and strategy

    def span(self, q: int) -> tuple[int, int]:
        if not self.unit.sharded:
            return self.lo, self.hi
        size = self.unit.shard_numel
        return max(self.lo, q * size), min(self.hi, (q + 1) * size)

    def longest(self) -> int:
        return max(max(0, b - a) for a, b in map(self.span, range(self.unit.world)))

    def assemble(self, pieces: list[Tensor]) -> Tensor:
        """The run from each rank's piece (``pieces[q]`` starts at ``span(q)[0]``)."""
        full = pieces[0].new_empty(self.hi - self.lo)
        for q, piece in enumerate(pieces):
            a, b = self.span(q)
            if b > a:
                full[a - self.lo : b - self.lo].copy_(piece[: b - a])
        return full


class FlatShard(Placement):
    """The placement of a model trained with FSDP1; see the module docstring. Slots of
    flattened parameters carry their :class:`FlatView` in ``slot.meta`` (None for buffers
    and parameters FSDP does not manage, kept whole)."""

    collective = True
    model_forward = True

    def __init__(self, model: nn.Module, group: Any = None) -> None:
        units = _units(model)
        own = _check_model(model, units)
        self.group = own if own is not None else group
        self.handles = [u._handle for u in units if u._handle is not None]
        self._cache: dict = {}

    # the model's entries ----------------------------------------------------------------

    def classify(self, model: nn.Module, buffers: str, exclude: Any, include: Any) -> list:
        """The model's entries, in state-dict order, as :func:`emakit.layout.classify` makes
        them, flattened parameters as :class:`FlatEntry` (under their original names)."""
        excluded = Matcher(exclude, "exclude")
        included = Matcher(include, "include")
        by_id: dict[int, list[str]] = {}
        found: list[tuple[list[str], _Item]] = []
        for it in _items(model, self._cache):
            if id(it.tensor) in by_id:
                by_id[id(it.tensor)].append(it.name)
                continue
            names = [it.name]
            by_id[id(it.tensor)] = names
            found.append((names, it))
        entries: list[Entry] = []
        for names, it in found:
            t = it.tensor
            view = t if isinstance(t, FlatView) else None
            probe = view.meta() if view is not None else t
            floating = probe.is_floating_point()
            if it.is_param:
                kind = "average" if probe.requires_grad and floating else "live"
            elif floating:
                picked = included(names, probe)  # every floating buffer: see check_used
                kind = "average" if buffers == "average" or picked else "copy"
            else:
                kind = "live"
            if excluded(names, probe):
                kind = "live"
            if view is not None:
                entries.append(FlatEntry(names, it.module, it.attr, True, kind, view))
            else:
                entries.append(Entry(names, it.module, it.attr, it.is_param, kind))
        excluded.check_used("tensor")
        included.check_used("floating buffer")
        return entries

    def state_items(self, model: nn.Module) -> list[tuple[str, Any]]:
        """``(name, tensor or FlatView)`` in the order of ``model.state_dict()``."""
        return [(it.name, it.tensor) for it in _items(model, self._cache)]

    # local parts --------------------------------------------------------------------------

    def local(self, t: Tensor) -> Tensor:
        return t.piece() if isinstance(t, FlatView) else t

    def watch_local(self, slot: Slot) -> Callable[[Tensor], Tensor] | None:
        if slot.meta is None:
            return None
        # Before FSDP's lazy initialization the flat parameter is its shard: watch it itself
        # (its storage becomes _local_shard, so the plan stays valid after the initialization).
        return _LOCAL_SHARD if "_local_shard" in slot.meta.flat.__dict__ else None

    def allocate(self, slots: Sequence[Slot]) -> dict[Key, Tensor]:
        """Per storage key: for each flat parameter, the span of its local shard that this
        rank's averaged pieces cover, with their offsets in the shard (so one lerp updates a
        unit), then the whole tensors; each region aligned."""
        regions: dict[tuple[Key, int], list[int]] = {}  # -> [lo, hi, base]
        sizes: dict[Key, int] = {}
        for s in slots:
            t = s.entry.tensor()
            s.meta = t if isinstance(t, FlatView) else None
            if s.meta is not None and s.meta.offset >= 0:
                s.start = s.meta.first
                r = regions.setdefault((s.key, id(s.meta.flat)), [s.meta.offset, 0, 0])
                r[0] = min(r[0], s.meta.offset)
                r[1] = max(r[1], s.meta.offset + s.meta.count)
        for (key, _), r in regions.items():
            r[2] = sizes.get(key, 0)
            sizes[key] = r[2] + align(r[1] - r[0])
        whole: dict[int, int] = {}
        for s in slots:
            if s.meta is None:
                whole[id(s)] = sizes.get(s.key, 0)
                sizes[s.key] = whole[id(s)] + align(s.entry.tensor().numel())
        flats = {k: torch.zeros(n, device=k[0], dtype=k[1]) for k, n in sizes.items()}
        for s in slots:
            if s.meta is None:
                t = s.entry.tensor()
                s.avg = flats[s.key][whole[id(s)] : whole[id(s)] + t.numel()].view(t.shape)
            elif s.meta.offset < 0:
                s.avg = None  # this rank's shard holds none of the parameter
            else:
                lo, _, base = regions[(s.key, id(s.meta.flat))]
                at = base + s.meta.offset - lo
                s.avg = flats[s.key][at : at + s.meta.count]
        return flats

    def bind(self, slot: Slot) -> None:
        if slot.meta is None:
            slot.src = slot.entry.tensor()
        else:
            slot.src = None if slot.avg is None else slot.meta.piece()

    # gathering ----------------------------------------------------------------------------

    def _gather_views(
        self, parts: list[tuple[FlatView, Tensor | None]], rank0_only: bool
    ) -> list[Tensor | None]:
        """The whole parameters of ``parts`` (views of one flat parameter, each with this
        rank's piece or None) from every rank's pieces: one all-gather (a gather to rank 0
        with ``rank0_only``: None elsewhere) of the range of the flat vector they span."""
        v0 = parts[0][0]
        run = _Run(min(v.begin for v, _ in parts), max(v.begin + v.numel for v, _ in parts), v0)
        dtype = next((p.dtype for _, p in parts if p is not None), None) or v0.dtype
        device = v0.flat.device  # collectives run on the compute device (NCCL: CUDA)
        mine = run.span(v0.rank)
        buf = torch.zeros(run.longest(), dtype=dtype, device=device)
        for v, p in parts:
            if p is not None and p.numel():
                at = v.begin + v.first - mine[0]
                buf[at : at + p.numel()].copy_(p.reshape(-1))
        pieces = self._collect(buf, v0, rank0_only)
        if pieces is None:
            return [None] * len(parts)
        full = run.assemble(pieces)
        out: list[Tensor | None] = []
        for v, p in parts:
            flat = full[v.begin - run.lo : v.begin - run.lo + v.numel]
            value = flat.view(v.shape) if v.contiguous else flat.clone().as_strided(
                v.shape, v.stride)
            out.append(value if p is None else value.to(p.device))
        return out

    def _collect(self, buf: Tensor, v0: FlatView, rank0_only: bool) -> list[Tensor] | None:
        """Every rank's ``buf`` (None on ranks other than 0 with ``rank0_only``)."""
        if not v0.sharded or v0.world == 1:
            return None if rank0_only and dist.get_rank(self.group) != 0 else [buf]
        pieces = [torch.empty_like(buf) for _ in range(v0.world)]
        if not rank0_only:
            dist.all_gather(pieces, buf, group=self.group)
            return pieces
        dst = dist.get_global_rank(self.group, 0)
        dist.gather(buf, pieces if v0.rank == 0 else None, dst=dst, group=self.group)
        return pieces if v0.rank == 0 else None

    def gather(
        self, slots: Sequence[Slot], rank0_only: bool = False, attr: str = "avg"
    ) -> list[Tensor | None]:
        out: list[Tensor | None] = [None] * len(slots)
        units: dict[int, list[int]] = {}
        for i, s in enumerate(slots):
            if s.meta is None:
                out[i] = getattr(s, attr)
            else:
                units.setdefault(id(s.meta.flat), []).append(i)
        for idx in units.values():
            parts = [(slots[i].meta, getattr(slots[i], attr)) for i in idx]
            if all(p is None for _, p in parts):  # no piece here: gather in the storage dtype
                key = slots[idx[0]].key
                parts[0] = (parts[0][0], torch.empty(0, dtype=key[1], device=key[0]))
            for i, value in zip(idx, self._gather_views(parts, rank0_only), strict=True):
                out[i] = value if value is None else value.to(slots[i].key[0])
        return out

    def values(
        self, slots: Sequence[Slot], attr: str = "avg", convert: bool = False
    ) -> list[Tensor]:
        full = self.gather(slots, attr=attr)
        if convert:
            full = [f.to(dtype=s.dtype) for s, f in zip(slots, full, strict=True)]  # type: ignore[union-attr]
        return full  # type: ignore[return-value]

    def scatter(self, slot: Slot, value: Tensor) -> Tensor:
        value = super().scatter(slot, value)
        v: FlatView | None = slot.meta
        if v is None:
            return value
        if v.contiguous:
            flat = value.reshape(-1)
        else:  # the parameter's elements in its storage order, as the flat vector holds them
            dense = torch.empty_strided(v.shape, v.stride, dtype=value.dtype, device=value.device)
            flat = dense.copy_(value).as_strided((v.numel,), (1,))
        n = 0 if slot.avg is None else slot.avg.numel()
        return flat[v.first : v.first + n]

    @torch.no_grad()
    def full(self, t: Tensor) -> Tensor:
        """A model tensor the EMA does not keep (a frozen parameter), gathered: a collective."""
        if not isinstance(t, FlatView):
            return super().full(t)
        value = self._gather_views([(t, t.piece())], rank0_only=False)[0]
        assert value is not None
        return value

    # swapping -----------------------------------------------------------------------------

    def _release(self, strict: bool) -> None:
        """Free the unsharded flat parameters FSDP keeps allocated after a forward pass, so
        its next forward or backward gathers the shards again (as FSDP itself does after a
        backward pass). ``strict``: raise when a unit is unsharded now (inside a forward,
        a backward or ``summon_full_params``), where a swap would not be seen."""
        for handle in self.handles:
            flat = handle.flat_param
            local = flat.__dict__.get("_local_shard")
            if local is None or not handle.uses_sharded_strategy:
                continue  # not initialized (nothing gathered yet), or NO_SHARD: no copy
            if flat.data_ptr() != local.data_ptr():
                if strict:
                    raise RuntimeError(
                        f"the {_unit_name(flat)} holds its unsharded "
                        "parameters now (inside a forward or backward pass, or "
                        "summon_full_params): swap the average in outside of them"
                    )
                continue
            for attr in ("_full_param_padded", "_full_prec_full_param_padded"):
                full = flat.__dict__.get(attr)
                if full is None or full.untyped_storage().size() == 0:
                    continue
                if full.device.type != "cpu":  # as FSDP frees it: after the kernels queued
                    full.record_stream(handle._device_handle.current_stream())
                full.untyped_storage().resize_(0)

    def swap_pairs(self, slots: Sequence[Slot]) -> tuple[list[Tensor], list[Tensor]]:
        """Targets: the pieces of the local shards (and whole buffers); values: the averaged
        pieces. No communication; unsharded copies FSDP kept are freed first."""
        self._release(strict=True)
        targets: list[Tensor] = []
        values: list[Tensor] = []
        for s in slots:
            if s.avg is None:
                continue  # this rank's shard holds none of the parameter
            if s.meta is None:
                targets.append(s.entry.tensor())
                values.append(s.avg)
            else:
                targets.append(s.meta.piece())
                values.append(s.avg)
        return targets, values

    @contextlib.contextmanager
    def swap_scope(self, slots: Sequence[Slot]) -> Iterator[None]:
        """After a swap, free what FSDP gathered from the averaged shards inside it."""
        try:
            yield
        finally:
            self._release(strict=False)
