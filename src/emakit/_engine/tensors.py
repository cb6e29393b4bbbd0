"""Tensor-list helpers: grouping by device and dtype, copies, swaps, finiteness, names.

Every helper runs one ``torch._foreach_*`` call per group with no host synchronization
(except :func:`all_finite`, which answers a question on the host).
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

try:  # public since torch 2.5; torch 2.4 has it under a private name
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - depends on the torch build
    try:
        from torch.distributed._tensor import DTensor, distribute_tensor
    except ImportError:  # a torch built without distributed: no parameter is a DTensor

        class DTensor:  # type: ignore[no-redef]
            pass

        distribute_tensor = None  # type: ignore[assignment]

__all__ = [
    "DTensor",
    "distribute_tensor",
    "grouped",
    "copy_",
    "values_swapped",
    "all_finite",
    "unwrap_model",
    "check_same_names",
]


def grouped(
    dst: Sequence[Tensor], src: Sequence[Tensor]
) -> dict[Hashable, tuple[list[Tensor], list[Tensor]]]:
    """``(dst, src)`` pairs grouped by (dst device, dst dtype, src device, src dtype), in
    order: the one grouping helper of the package (a foreach call takes one group).

    >>> g = grouped([torch.zeros(1), torch.zeros(1, dtype=torch.float64)], [torch.ones(1)] * 2)
    >>> len(g)
    2
    """
    if len(dst) != len(src):
        raise ValueError(f"tensor lists differ in length: {len(dst)} vs {len(src)}")
    groups: dict[Hashable, tuple[list[Tensor], list[Tensor]]] = {}
    for d, s in zip(dst, src, strict=True):
        pair = groups.setdefault((d.device, d.dtype, s.device, s.dtype), ([], []))
        pair[0].append(d)
        pair[1].append(s)
    return groups


@torch.no_grad()
def copy_(dst: Sequence[Tensor], src: Sequence[Tensor], non_blocking: bool = False) -> None:
    """In place, ``dst[i] <- src[i]`` (converting dtype and device) for every i."""
    for ds, ss in grouped(dst, src).values():
        torch._foreach_copy_(ds, ss, non_blocking=non_blocking)


@contextlib.contextmanager
def values_swapped(targets: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Inside the block ``targets[i]`` hold ``values[i]``; after it (also when it raises) they
    hold their own values again, bitwise. Costs one backup copy of ``targets``."""
    with torch.no_grad():
        backup = [t.detach().clone() for t in targets]
        copy_(targets, values)
    del values  # the caller may drop its copies (gathered shards) while the block runs
    try:
        yield
    finally:
        with torch.no_grad():
            copy_(targets, backup)


@torch.no_grad()
def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite. One host-device sync in all."""
    flags = []
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for ts in by_kind.values():
        # The max-norm of finite values is finite (a sum of squares could overflow).
        norms = torch._foreach_norm(ts, ord=float("inf"))
        flags.append(torch.stack(norms).isfinite().all().cpu())
    return bool(torch.stack(flags).all()) if flags else True


def unwrap_model(model: nn.Module, name: str = "model") -> nn.Module:
    """The module that holds the weights: DDP's and DataParallel's ``.module`` and
    ``torch.compile``'s ``._orig_mod`` are seen through, so their prefixes never reach a name.
    ``name``: the argument ``model`` came from, for the error when it is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        # a registered submodule, not getattr: FSDP1 forwards unknown attributes to the module
        # it wraps, and must not be stripped (it holds the weights' state)
        inner = model._modules.get("_orig_mod")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def check_same_names(
    expected: Mapping[str, Iterable[int]], got: Mapping[str, Iterable[int]], what: str
) -> None:
    """Raise a ValueError listing missing and unexpected names and shape mismatches."""
    missing = [n for n in expected if n not in got]
    unexpected = [n for n in got if n not in expected]
    shapes = [
        f"{n}: expected {tuple(expected[n])}, got {tuple(got[n])}"
        for n in expected
        if n in got and tuple(expected[n]) != tuple(got[n])
    ]
    parts = []
    if missing:
        parts.append(f"missing names {missing}")
    if unexpected:
        parts.append(f"unexpected names {unexpected}")
    if shapes:
        parts.append(f"shape mismatches [{'; '.join(shapes)}]")
    if parts:
        raise ValueError(f"{what} does not match the model: " + ", ".join(parts))
