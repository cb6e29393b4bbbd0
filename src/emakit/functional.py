"""``compute_ema``: the functional form of one EMA update between two models.

>>> import torch
>>> model, ema_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
>>> compute_ema(model, ema_model, smoothing=0.0)
>>> torch.equal(model.weight, ema_model.weight)
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._engine.kernels import lerp_
from ._engine.tensors import check_same_names, copy_, grouped, unwrap_model
from .schedules import check_smoothing

__all__ = ["compute_ema"]


@torch.no_grad()
def compute_ema(model: nn.Module, ema_model: nn.Module, smoothing: float = 0.99) -> None:
    """In place, ``ema <- smoothing * ema + (1 - smoothing) * model``, tensor by tensor.

    Trainable parameters and floating buffers (BatchNorm running statistics) are averaged;
    integer buffers (``num_batches_tracked``) are copied. Tensors are paired by name, never
    by position: two models whose names or shapes differ raise a ValueError listing them.
    ``smoothing`` is in [0, 1]: 0 copies the model, 1 leaves the average unchanged. Each
    (device, dtype) group is one call of the engine's kernel (sources of another dtype or
    device are converted first).
    """
    smoothing = check_smoothing(smoothing)
    model, ema_model = unwrap_model(model), unwrap_model(ema_model, "ema_model")
    if model is ema_model:
        raise ValueError("ema_model: expected a second model, got the model itself")
    src = model.state_dict(keep_vars=True)
    dst = ema_model.state_dict(keep_vars=True)
    check_same_names(
        {n: t.shape for n, t in src.items()}, {n: t.shape for n, t in dst.items()}, "ema_model"
    )
    (avg_dst, avg_src), (copy_dst, copy_src) = _pairs(model, src, dst)
    for ds, ss in grouped(avg_dst, avg_src).values():
        if ss[0].device != ds[0].device:
            ss = [s.to(device=ds[0].device) for s in ss]
        lerp_(ds, ss, 1.0 - smoothing)
    copy_(copy_dst, copy_src)


def _pairs(
    model: nn.Module, src: dict[str, Tensor], dst: dict[str, Tensor]
) -> tuple[tuple[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]:
    """(averaged destinations, sources) and (copied destinations, sources), by name; tied
    tensors once."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    buffers = {id(b) for b in model.buffers()}
    averaged: tuple[list[Tensor], list[Tensor]] = ([], [])
    copied: tuple[list[Tensor], list[Tensor]] = ([], [])
    seen: set[int] = set()
    for name, s in src.items():
        if id(s) in seen:  # tied weights: one tensor under two names
            continue
        seen.add(id(s))
        if s.is_floating_point() and (id(s) in trainable or id(s) in buffers):
            target = averaged
        elif id(s) in buffers:
            target = copied
        else:
            continue
        target[0].append(dst[name].detach())
        target[1].append(s.detach())
    return averaged, copied
