"""The shadow: which tensors of a model are averaged, and where and in which dtype they live.

Each state-dict entry of the model falls in one of three kinds:

- ``average``: trainable floating parameters, and floating buffers with ``buffers="average"``;
  stored in the storage dtype and updated with ``lerp``.
- ``copy``: floating buffers with ``buffers="copy"``; stored and copied at each update.
- ``live``: frozen parameters, integer buffers (``num_batches_tracked``) and extra state;
  never stored twice: exports read them from the live model.

Stored tensors are views into one flat allocation per (device, dtype), built once, so an
update is a fixed set of ``torch._foreach_*`` calls over lists made at construction.

Under FSDP2 (``fully_shard``) parameters are DTensors. The shadow stores only the local
shard of each (a plain tensor in the flat buffer) and keeps the mesh, placements and global
shape beside it, so the update runs on local shards with no communication (DTensor has no
sharding rule for some foreach ops, ``_foreach_copy_`` among them). DTensors are rebuilt
only at the edges: ``tensors()``, ``mapping()``, ``load()`` and ``export()`` (which gathers).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .functional import all_finite, check_same_names, copy_, unwrap_model

__all__ = ["Shadow", "BUFFER_MODES", "classify"]

BUFFER_MODES = ("average", "copy")
_ALIGN = 16  # elements; keeps every view 64-byte aligned for vectorized kernels
_STAGING_ELEMENTS = 1 << 24  # bound on the staging buffer for dtype/device conversion


@dataclass
class _Entry:
    names: list[str]  # the first is canonical; the others are tied aliases
    module: nn.Module
    attr: str
    is_param: bool
    kind: str  # "average" | "copy" | "live"
    view: Tensor | None = None
    # Under FSDP2: (mesh, placements, global shape, global stride) of the DTensor parameter.
    spec: tuple[Any, tuple, torch.Size, tuple[int, ...]] | None = None

    def tensor(self) -> Tensor:
        """The model's tensor as the model holds it (a DTensor under FSDP2)."""
        table = self.module._parameters if self.is_param else self.module._buffers
        return table[self.attr]

    def source(self) -> Tensor:
        """The model's tensor on this rank: the local shard of a DTensor, else the tensor."""
        t = self.tensor()
        return t._local_tensor if isinstance(t, DTensor) else t

    @property
    def shape(self) -> torch.Size:
        """The global shape (the local shape times the mesh, under FSDP2)."""
        return self.spec[2] if self.spec is not None else self.source().shape

    def wrap(self, local: Tensor) -> Tensor:
        """``local`` as this entry's DTensor (same mesh and placements), or as is."""
        if self.spec is None:
            return local
        mesh, placements, shape, stride = self.spec
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )

    def unwrap(self, value: Tensor) -> Tensor:
        """The local part of ``value`` for this rank: ``value`` may be a DTensor of any
        placements, or a full tensor (sliced locally, no communication)."""
        if self.spec is None:
            return value.full_tensor() if isinstance(value, DTensor) else value
        mesh, placements = self.spec[0], self.spec[1]
        if isinstance(value, DTensor):
            if value.device_mesh != mesh or tuple(value.placements) != tuple(placements):
                value = value.redistribute(mesh, placements)
            return value.to_local()
        return distribute_tensor(value, mesh, placements, src_data_rank=None).to_local()


def _gather(t: Tensor) -> Tensor:
    """A full tensor from a DTensor (a collective: every rank of its mesh must call it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def classify(model: nn.Module, buffers: str) -> list[_Entry]:
    """The model's state-dict entries as ``average`` / ``copy`` / ``live`` entries, tied
    tensors merged (the first name is canonical), extra state left out."""
    entries: list[_Entry] = []
    by_id: dict[int, _Entry] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in by_id:
            by_id[id(tensor)].names.append(name)
            continue
        prefix, _, attr = name.rpartition(".")
        module = model.get_submodule(prefix)
        is_param = attr in module._parameters
        is_buffer = not is_param and attr in module._buffers
        if is_param and tensor.requires_grad and tensor.is_floating_point():
            kind = "average"
        elif is_buffer and tensor.is_floating_point():
            kind = buffers
        else:
            kind = "live"
        if not (is_param or is_buffer):  # extra state: not a tensor we can track
            continue
        spec = None
        if isinstance(tensor, DTensor):
            spec = (tensor.device_mesh, tuple(tensor.placements), tensor.shape, tensor.stride())
        entry = _Entry([name], module, attr, is_param, kind, spec=spec)
        entries.append(entry)
        by_id[id(tensor)] = entry
    return entries


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class Shadow:
    """Averaged copies of a model's tensors, with the kernels that update, swap and export them.

    Args:
        model: the training model (DDP and ``torch.compile`` wrappers are seen through).
        dtype: storage dtype of stored tensors; ``None`` keeps each tensor's own dtype.
        device: where stored tensors live; ``None`` keeps each tensor's own device.
        buffers: ``"average"`` or ``"copy"`` for floating buffers.
    """

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
        buffers: str = "average",
    ) -> None:
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers: expected one of {BUFFER_MODES}, got {buffers!r}")
        floating = isinstance(dtype, torch.dtype) and dtype.is_floating_point
        if dtype is not None and not floating:
            raise TypeError(f"dtype: expected a floating torch.dtype or None, got {dtype!r}")
        self.model = unwrap_model(model)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.buffers = buffers
        self.entries = self._classify()
        self.stored = [e for e in self.entries if e.kind != "live"]
        self._allocate()
        self._plan()

    @property
    def fsdp(self) -> bool:
        """Whether the model's parameters are DTensors (FSDP2): the average is kept shard by
        shard, and a forward pass with it needs the model's own (FSDP) forward."""
        return any(e.spec is not None for e in self.entries)

    # construction ------------------------------------------------------------------------

    def _classify(self) -> list[_Entry]:
        return classify(self.model, self.buffers)

    def _storage(self, t: Tensor) -> tuple[torch.device, torch.dtype]:
        return (self.device or t.device, self.dtype or t.dtype)

    def _allocate(self) -> None:
        sizes: dict[tuple[torch.device, torch.dtype], int] = {}
        for e in self.stored:
            key = self._storage(e.source())
            sizes[key] = sizes.get(key, 0) + _align(e.source().numel())
        self.flat = {k: torch.empty(n, device=k[0], dtype=k[1]) for k, n in sizes.items()}
        offsets = dict.fromkeys(sizes, 0)
        for e in self.stored:
            src = e.source()
            key = self._storage(src)
            start = offsets[key]
            e.view = self.flat[key][start : start + src.numel()].view(src.shape)
            offsets[key] = start + _align(src.numel())
        self.reset()

    def _plan(self) -> None:
        """Build the tensor lists that one update runs over."""
        direct: dict[tuple, tuple[list, list]] = {}
        staged: dict[tuple, list[_Entry]] = {}
        copies: tuple[list, list] = ([], [])
        for e in self.stored:
            src = e.source()
            if e.kind == "copy":
                copies[0].append(e.view)
                copies[1].append(src)
            elif (src.device, src.dtype) == (e.view.device, e.view.dtype):
                lists = direct.setdefault((src.device, src.dtype), ([], []))
                lists[0].append(e.view)
                lists[1].append(src)
            else:
                key = (src.device, src.dtype, e.view.device, e.view.dtype)
                staged.setdefault(key, []).append(e)
        self._direct = list(direct.values())
        self._copies = copies
        self._staged = [self._stage(es) for es in staged.values()]
        # Buffers can be replaced (module.to()), and so can a DTensor's local shard.
        self._buffer_refs = [
            (e, e.source()) for e in self.stored if not e.is_param or e.spec is not None
        ]

    def _stage(self, entries: list[_Entry]) -> list[tuple[list, list, list]]:
        """Chunks of (views, sources, staging views): sources are converted into a staging
        buffer in the storage dtype and device, then lerped, chunk by chunk."""
        view = entries[0].view
        largest = max(_align(e.view.numel()) for e in entries)
        total = sum(_align(e.view.numel()) for e in entries)
        size = min(total, max(largest, _STAGING_ELEMENTS))
        pin = view.device.type == "cpu" and entries[0].source().device.type == "cuda"
        staging = torch.empty(size, dtype=view.dtype, device=view.device, pin_memory=pin)
        chunks: list[tuple[list, list, list]] = []
        used = size  # forces a new chunk first
        for e in entries:
            n = _align(e.view.numel())
            if used + n > size:
                chunks.append(([], [], []))
                used = 0
            chunks[-1][0].append(e.view)
            chunks[-1][1].append(e.source())
            chunks[-1][2].append(staging[used : used + e.view.numel()].view(e.view.shape))
            used += n
        return chunks

    # the update --------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Rebuild the lists if a buffer was replaced (``module.to()`` replaces buffers)."""
        for e, t in self._buffer_refs:
            if e.source() is not t:
                self._plan()
                return

    @torch.no_grad()
    def update(self, weight: float) -> None:
        """``stored <- stored + weight * (source - stored)``; ``copy`` entries take the source."""
        self._refresh()
        for views, sources in self._direct:
            torch._foreach_lerp_(views, sources, weight)
        for chunks in self._staged:
            for views, sources, staging in chunks:
                torch._foreach_copy_(staging, sources)
                torch._foreach_lerp_(views, staging, weight)
        if self._copies[0]:
            torch._foreach_copy_(self._copies[0], self._copies[1])

    @torch.no_grad()
    def reset(self) -> None:
        """Set every stored tensor to the model's current value."""
        copy_([e.view for e in self.stored], [e.source() for e in self.stored])

    def sources_finite(self) -> bool:
        """Whether the model's averaged tensors are all finite (one host-device sync)."""
        return all_finite([e.source() for e in self.stored if e.kind == "average"])

    # views of the state ------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        """Stored tensors by canonical name, in storage dtype (views, not copies). Under FSDP2
        each is a DTensor over the local shard, with the parameter's mesh and placements."""
        return {e.names[0]: e.wrap(e.view) for e in self.stored}

    @torch.no_grad()
    def load(self, tensors: Mapping[str, Tensor], what: str = "state_dict") -> None:
        """Copy ``tensors`` (as from ``tensors()``) into the stored views, after checking names
        and (global) shapes. Under FSDP2 a value may be a DTensor of any placements or a full
        tensor: each rank takes its own shard."""
        check_same_names(
            {e.names[0]: e.shape for e in self.stored},
            {n: t.shape for n, t in tensors.items()},
            what,
        )
        copy_([e.view for e in self.stored], [e.unwrap(tensors[e.names[0]]) for e in self.stored])

    @torch.no_grad()
    def export(self, started: bool = True, rank0_only: bool = False) -> OrderedDict[str, Tensor]:
        """A plain state dict of the averaged model: keys and dtypes as ``model.state_dict()``.

        Stored tensors are cast back to the model's dtype; live ones are read from the model.
        Before ``started`` the average follows the model, so the model's own values are given.
        Under FSDP2 sharded tensors are gathered into full ones (a collective: every rank must
        call it). ``rank0_only``: only rank 0 keeps the tensors, on the CPU; other ranks get
        an empty dict.
        """
        keep = not rank0_only or _rank() == 0
        averaged: dict[str, _Entry] = {}
        if started:
            averaged = {name: e for e in self.stored for name in e.names}
        out: OrderedDict[str, Tensor] = OrderedDict()
        done: dict[int, Tensor] = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            e = averaged.get(name)
            key = id(e) if e is not None else id(tensor)
            if key not in done:
                if e is not None:
                    value = _gather(e.wrap(e.view)).to(dtype=e.source().dtype, copy=True)
                else:
                    value = _gather(tensor.detach()).clone()
                done[key] = value.cpu() if rank0_only else value
            if keep:
                out[name] = done[key]
        if not keep:
            return OrderedDict()
        return out

    def mapping(self, started: bool = True) -> dict[str, Tensor]:
        """Name -> tensor for ``torch.func.functional_call``: stored views in the model's dtype
        and device (a transient cast only when they differ), live tensors from the model.
        Under FSDP2 the values are DTensors over the local shards."""
        result: dict[str, Tensor] = {}
        for e in self.entries:
            src = e.source()
            if started and e.view is not None:
                t = e.view
                if (t.device, t.dtype) != (src.device, src.dtype):
                    t = t.to(device=src.device, dtype=src.dtype)
                t = e.wrap(t)
            else:
                t = e.tensor().detach()
            for name in e.names:
                result[name] = t
        return result

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Averaged values in the model's tensors inside the block; the training values are
        restored bitwise after it, also when it raises. Tensor identity is kept."""
        sources = [e.source() for e in self.stored]
        with torch.no_grad():
            backup = [s.detach().clone() for s in sources]
            copy_(sources, [e.view for e in self.stored])
        try:
            yield
        finally:
            with torch.no_grad():
                copy_(sources, backup)

    def state_nbytes(self) -> int:
        """Bytes held by the stored average (flat buffers), staging excluded."""
        return sum(f.numel() * f.element_size() for f in self.flat.values())
