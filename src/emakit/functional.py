"""Tensor-list kernels: lerp and copy grouped by device and dtype, and ``compute_ema``.

Every kernel here runs one ``torch._foreach_*`` call per (device, dtype) group, with Python
scalars as weights, so none of them synchronizes the host with an accelerator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .schedules import check_smoothing

__all__ = [
    "lerp_",
    "copy_",
    "values_swapped",
    "all_finite",
    "compute_ema",
    "unwrap_model",
    "check_same_names",
]

_GroupKey = tuple[torch.device, torch.dtype, torch.device, torch.dtype]


def _groups(dst: Sequence[Tensor], src: Sequence[Tensor]) -> dict[_GroupKey, tuple[list, list]]:
    if len(dst) != len(src):
        raise ValueError(f"tensor lists differ in length: {len(dst)} vs {len(src)}")
    groups: dict[_GroupKey, tuple[list, list]] = {}
    for d, s in zip(dst, src, strict=True):
        key = (d.device, d.dtype, s.device, s.dtype)
        pair = groups.setdefault(key, ([], []))
        pair[0].append(d)
        pair[1].append(s)
    return groups


@torch.no_grad()
def lerp_(dst: Sequence[Tensor], src: Sequence[Tensor], weight: float) -> None:
    """In place, ``dst[i] <- dst[i] + weight * (src[i] - dst[i])`` for every i.

    With ``weight = 1 - s`` this is the EMA update ``dst <- s * dst + (1 - s) * src``.
    Sources of another dtype or device are converted first (a transient copy).
    """
    for (d_dev, d_dtype, s_dev, s_dtype), (ds, ss) in _groups(dst, src).items():
        if (s_dev, s_dtype) != (d_dev, d_dtype):
            ss = [s.to(device=d_dev, dtype=d_dtype) for s in ss]
        torch._foreach_lerp_(ds, ss, weight)


@torch.no_grad()
def copy_(dst: Sequence[Tensor], src: Sequence[Tensor], non_blocking: bool = False) -> None:
    """In place, ``dst[i] <- src[i]`` (converting dtype and device) for every i."""
    for ds, ss in _groups(dst, src).values():
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
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault((t.device, t.dtype), []).append(t)
    for ts in by_device.values():
        # The max-norm of finite values is finite (a sum of squares could overflow).
        norms = torch._foreach_norm(ts, ord=float("inf"))
        flags.append(torch.stack(norms).isfinite().all().cpu())
    return bool(torch.stack(flags).all()) if flags else True


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that holds the weights: DDP's and DataParallel's ``.module`` and
    ``torch.compile``'s ``._orig_mod`` are seen through, so their prefixes never reach a name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        # a registered submodule, not getattr: FSDP1 forwards unknown attributes to the module
        # it wraps, and must not be stripped (it holds the weights' state)
        elif isinstance(model._modules.get("_orig_mod"), nn.Module):
            model = model._modules["_orig_mod"]
        else:
            return model


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
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing names {missing}")
        if unexpected:
            parts.append(f"unexpected names {unexpected}")
        if shapes:
            parts.append(f"shape mismatches [{'; '.join(shapes)}]")
        raise ValueError(f"{what} does not match the model: " + ", ".join(parts))


def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """In place, ``ema <- smoothing * ema + (1 - smoothing) * model``, tensor by tensor.

    Trainable parameters and floating buffers (BatchNorm running statistics) are averaged;
    integer buffers (``num_batches_tracked``) are copied. Tensors are paired by name, never
    by position: two models whose names or shapes differ raise a ValueError listing them.
    ``smoothing`` is in [0, 1]: 0 copies the model, 1 leaves the average unchanged.

    >>> import torch
    >>> model, ema_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> compute_ema(model, ema_model, smoothing=0.0)
    >>> torch.equal(model.weight, ema_model.weight)
    True
    """
    smoothing = check_smoothing(smoothing)
    src = unwrap_model(model).state_dict(keep_vars=True)
    dst = unwrap_model(ema_model).state_dict(keep_vars=True)
    check_same_names(
        {n: t.shape for n, t in src.items()}, {n: t.shape for n, t in dst.items()}, "ema_model"
    )
    trainable = {id(p) for p in unwrap_model(model).parameters() if p.requires_grad}
    buffers = {id(b) for b in unwrap_model(model).buffers()}
    avg_dst, avg_src, copy_dst, copy_src = [], [], [], []
    seen: set[int] = set()
    for name, s in src.items():
        if id(s) in seen:  # tied weights: one tensor under two names
            continue
        seen.add(id(s))
        if s.is_floating_point() and (id(s) in trainable or id(s) in buffers):
            avg_dst.append(dst[name].detach())
            avg_src.append(s.detach())
        elif id(s) in buffers:
            copy_dst.append(dst[name].detach())
            copy_src.append(s.detach())
    lerp_(avg_dst, avg_src, 1.0 - smoothing)
    copy_(copy_dst, copy_src)
