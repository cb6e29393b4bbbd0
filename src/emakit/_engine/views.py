"""The average read back from a :class:`~.store.Store`, in the model's form.

Three vocabularies, one per use:

- by canonical name, in the storage dtype (:func:`tensors`, :func:`compensation`): what a
  state dict saves and loads; views (one process), DTensors over the local shards (FSDP2),
  gathered full tensors (``shard=True``, ZeRO-3);
- as a plain model state dict (:func:`export`): names and dtypes as ``model.state_dict()``,
  gathered where the placement spreads the average, live tensors from the model;
- as a forward pass needs it (:func:`mapping`): every name, tied ones too, in the model's
  dtype and device.

Every function first checks that the store still fits the model (a re-plan when it does
not), and may communicate where the placement spreads the average (a collective then).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from .collectives import rank
from .flat_params import state_items
from .layout import Kind
from .placements import Slot
from .store import Store

__all__ = ["EntryInfo", "describe", "tensors", "compensation", "export", "named", "mapping"]


@dataclass(frozen=True)
class EntryInfo:
    """One tensor of the model as the store sees it: for snapshots and fingerprints."""

    name: str
    kind: Kind
    shape: tuple[int, ...]  # global shape
    dtype: torch.dtype  # the model's dtype
    aliases: tuple[str, ...]  # tied names


def describe(store: Store) -> list[EntryInfo]:
    """Every tensor of the model (tied ones once), in state-dict order."""
    store.ensure()
    out = []
    for e in store.entries:
        t = e.tensor()
        out.append(EntryInfo(e.name, e.kind, tuple(store.placement.shape(t)), t.dtype,
                             tuple(e.names[1:])))
    return out


def tensors(store: Store) -> dict[str, Tensor]:
    """Stored tensors by canonical name, storage dtype, in the model's own form."""
    store.ensure()
    values = store.placement.values(store.slots)
    return {s.entry.name: v for s, v in zip(store.slots, values, strict=True)}


def compensation(store: Store) -> dict[str, Tensor]:
    """The compensation terms by canonical name, like :func:`tensors` ({} without)."""
    store.ensure()
    if store.comps is None:
        return {}
    values = store.placement.values(store.slots, attr="comp")
    return {s.entry.name: v for s, v in zip(store.slots, values, strict=True)}


@torch.no_grad()
def export(store: Store, started: bool = True, rank0_only: bool = False) -> dict[str, Tensor]:
    """A plain state dict of the averaged model: keys and dtypes as ``model.state_dict()``.

    Stored tensors are cast back to the model's dtype; live ones are read from the model.
    Before ``started`` the model's own values are given. ``rank0_only``: only rank 0 keeps
    the tensors, on the CPU; other ranks get an empty dict."""
    store.ensure()
    keep = not rank0_only or rank(store.placement.group) == 0
    by_name: dict[str, tuple[Slot, Tensor | None]] = {}
    if started:
        full = store.placement.gather(store.slots, rank0_only=rank0_only)
        for s, f in zip(store.slots, full, strict=True):
            for n in s.entry.names:
                by_name[n] = (s, f)
    out: OrderedDict[str, Tensor] = OrderedDict()
    done: dict[int, Tensor] = {}
    for item in state_items(store.model, store.views_cache):
        name, tensor = item.name, item.tensor
        hit = by_name.get(name)
        key = id(hit[0]) if hit is not None else id(tensor)
        if key not in done:
            value = _exported(store, hit, tensor)
            if value is None:  # rank0_only, another rank
                continue
            done[key] = value.cpu() if rank0_only else value
        if keep:
            out[name] = done[key]
    return out if keep else OrderedDict()


def _exported(store: Store, hit: tuple[Slot, Tensor | None] | None, tensor: Tensor
              ) -> Tensor | None:
    if hit is None:
        return store.placement.full(tensor).clone()
    slot, value = hit
    return None if value is None else value.to(dtype=slot.dtype, copy=True)


def named(
    store: Store, kinds: tuple[Kind, ...] = tuple(Kind), rank0_only: bool = False
) -> list[tuple[str, Kind, Tensor]] | None:
    """(canonical name, kind, full tensor) for every entry of ``kinds``, in state-dict order:
    stored ones gathered in the storage dtype, live ones from the model. With ``rank0_only``
    other ranks get None."""
    store.ensure()
    keep = not rank0_only or rank(store.placement.group) == 0
    slots = [s for s in store.slots if s.entry.kind in kinds]
    full = dict(zip([id(s.entry) for s in slots],
                    store.placement.gather(slots, rank0_only=rank0_only), strict=True))
    out = []
    for e in store.entries:
        if e.kind not in kinds:
            continue
        # placement.full is a collective where the model spreads its tensors: every rank
        # calls it, whatever it keeps
        value = store.placement.full(e.tensor()) if e.kind is Kind.LIVE else full[id(e)]
        if value is not None:
            out.append((e.name, e.kind, value))
    return out if keep else None


def mapping(store: Store, started: bool = True) -> dict[str, Tensor]:
    """Name -> tensor for ``torch.func.functional_call``: the averages in the model's dtype,
    device and own form (a transient cast only where they differ), live tensors from the
    model; every tied name. Gathered under ``shard=True`` (a collective)."""
    store.ensure()
    result: dict[str, Tensor] = {}
    values = store.placement.values(store.slots, convert=True) if started else []
    stored = {id(s.entry): v for s, v in zip(store.slots, values, strict=False)}
    for e in store.entries:
        t = stored.get(id(e))
        if t is None:
            t = e.tensor().detach()
        for name in e.names:
            result[name] = t
    return result
