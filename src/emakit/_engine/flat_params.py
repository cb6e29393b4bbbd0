"""FSDP1 (``FullyShardedDataParallel``) models seen from outside: which parameters FSDP1
flattened, where each original parameter sits in its unit's flat shard (:class:`FlatView`),
the model's state in state-dict order without FSDP's gathering ``state_dict()``
(:func:`state_items`, for every model), and the configurations the average refuses.

The placement that keeps the average of such a model is
:class:`~emakit._engine.placements.fsdp1.FlatShard`.

>>> from torch import nn
>>> uses_fsdp1(nn.Linear(2, 2))
False
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .tensors import is_dtensor

__all__ = ["FlatView", "Item", "uses_fsdp1", "fsdp1_group", "state_items", "named_state",
           "unit_name", "WRAPPERS"]

# Module levels that FSDP's own state dict leaves out of names (``clean_tensor_name``).
WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_SUPPORTED = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def _fsdp_class() -> type | None:
    # Importing FSDP imports DTensor's package (over a second); no model can hold an FSDP
    # unit before FSDP was imported, so an absent module answers "none".
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FullyShardedDataParallel", None) if module is not None else None


def _units(model: nn.Module) -> list[Any]:
    fsdp = _fsdp_class()
    return [] if fsdp is None else [m for m in model.modules() if isinstance(m, fsdp)]


def _flattened(p: Tensor) -> bool:
    """Whether FSDP1 manages ``p``: a FlatParameter, or an original parameter flattened into
    one (``use_orig_params=True``). Tensor parallel marks its DTensors the same way."""
    return bool(getattr(p, "_is_flat_param", False)) or (
        bool(getattr(p, "_fsdp_flattened", False)) and not is_dtensor(p)
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
        return unit_name(self.flat)


def unit_name(flat: Any) -> str:
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
class Item:
    name: str
    tensor: Any  # a Tensor, or a FlatView
    module: Any
    attr: str
    is_param: bool


def _walk(module: nn.Module, prefix: str, views: dict, out: list[Item]) -> None:
    """``module``'s parameters then persistent buffers, then its children, as
    ``nn.Module.state_dict`` orders them, FSDP's flattened parameters by their original
    names and wrapper levels left out of the names. ``views``: id(module) -> [(attribute,
    FlatView)] in the flat parameter's order."""
    _own_parameters(module, prefix, views.get(id(module), ()), out)
    for attr, b in module._buffers.items():
        if b is not None and attr not in module._non_persistent_buffers_set:
            out.append(Item(prefix + attr, b, module, attr, False))
    for name, child in module._modules.items():
        if child is not None:
            _walk(child, prefix if name in WRAPPERS else f"{prefix}{name}.", views, out)


def _own_parameters(module: nn.Module, prefix: str, mine: Sequence[tuple[str, FlatView]],
                out: list[Item]) -> None:
    """``module``'s own parameters: flattened ones as their FlatView, in the module's order
    where FSDP keeps them registered (``use_orig_params=True``), else in the flat
    parameter's order (``use_orig_params=False`` deletes them from the module); the
    FlatParameter itself left out."""
    flat = dict(mine)
    for attr, p in module._parameters.items():
        if attr in flat:
            view = flat.pop(attr)
            out.append(Item(prefix + attr, view, view.unit, "flat_param", True))
        elif p is not None and not getattr(p, "_is_flat_param", False):
            out.append(Item(prefix + attr, p, module, attr, True))
    for attr, view in flat.items():
        out.append(Item(prefix + attr, view, view.unit, "flat_param", True))


def _fsdp_items(model: nn.Module, cache: dict | None = None) -> list[Item]:
    by_module: dict[int, list[tuple[str, FlatView]]] = {}
    for (m, attr), view in _all_views(model, cache).items():
        by_module.setdefault(m, []).append((attr, view))
    out: list[Item] = []
    _walk(model, "", by_module, out)
    return out


def state_items(model: nn.Module, cache: dict | None = None) -> list[Item]:
    """Every tensor of ``model.state_dict()``, in its order, as :class:`Item` (the module and
    attribute that hold it; ``is_param``; extra state has neither), without calling it on an
    FSDP1 model (whose ``state_dict()`` all-gathers every parameter, and raises inside a
    forward pass): there each flattened parameter comes as a :class:`FlatView` (its global
    ``shape`` and ``dtype``) under its original name. ``cache``: views kept between calls.

    >>> import torch
    >>> [it.name for it in state_items(torch.nn.BatchNorm1d(2))]
    ['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']
    """
    if uses_fsdp1(model):
        return _fsdp_items(model, cache)
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, Tensor):
            continue
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix)
        out.append(Item(name, t, module, attr, attr in module._parameters))
    return out


def named_state(model: nn.Module) -> list[tuple[str, Any]]:
    """``(name, tensor or FlatView)`` for every tensor of the model's state dict (see
    :func:`state_items`)."""
    return [(it.name, it.tensor) for it in state_items(model)]


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
        clean = ".".join(a for a in name.split(".") if a not in WRAPPERS)
        if is_dtensor(p):
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
