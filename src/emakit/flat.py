"""Opt-in layout: a model's trainable parameters as views of one flat buffer.

Per-tensor dispatch is what an EMA update costs for models with many small tensors: each
``lerp`` call carries a fixed overhead (microseconds on a CPU, a kernel launch on a GPU)
whatever its size. :func:`flatten_parameters` lays the parameters out in one contiguous
buffer per (device, dtype), in the order and with the alignment (:mod:`emakit.layout`) that
the store uses for the average, so that a whole run of parameters maps onto one contiguous
span of the average and one update is one ``lerp_`` over that span.
"""

from __future__ import annotations

import torch
from torch import nn

from ._engine.layout import ALIGN, align
from ._engine.tensors import unwrap_model

__all__ = ["flatten_parameters", "ALIGN", "align"]


@torch.no_grad()
def flatten_parameters(model: nn.Module) -> nn.Module:
    """Re-point every parameter's ``.data`` to a view of one flat, zero-padded buffer per
    (device, dtype, requires_grad), in ``model.parameters()`` order. Values, shapes, identity
    (``id(p)``) and ``requires_grad`` are kept; only the storage moves.

    Call it **before** the optimizer is built and before ``emakit.EMA(model, ...)``. Then
    an update of the average runs one ``lerp_`` over each contiguous run of averaged
    parameters instead of one per tensor. Memory: the model's parameters are copied once into
    the new buffers (the old storages are freed when nothing else holds them); padding is at
    most ``ALIGN - 1`` elements per tensor.

    Later replacing a parameter's ``.data`` (``model.to(...)``, ``model.half()``) is detected
    by the EMA at its next update, which re-plans (carrying the average over) and re-detects
    the layout; call ``flatten_parameters`` again after such a move to get the fast path
    back.

    Args:
        model: the model (DDP and ``torch.compile`` wrappers are seen through).

    Returns:
        The same ``model`` object.

    Example:
        >>> import torch, emakit
        >>> model = emakit.flatten_parameters(torch.nn.Sequential(
        ...     torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)))
        >>> w = model[0].weight
        >>> w.untyped_storage().data_ptr() == model[1].bias.untyped_storage().data_ptr()
        True
    """
    inner = unwrap_model(model)
    groups: dict[tuple[torch.device, torch.dtype, bool], list[nn.Parameter]] = {}
    for p in inner.parameters():  # tied parameters appear once
        if type(p.detach()) is not torch.Tensor:
            raise TypeError(
                "model: flatten_parameters needs plain tensors; a parameter holds "
                f"{type(p.detach()).__name__} (DTensor/FSDP shards are already managed)"
            )
        groups.setdefault((p.device, p.dtype, p.requires_grad), []).append(p)
    for (device, dtype, _), params in groups.items():
        flat = torch.zeros(sum(align(p.numel()) for p in params), device=device, dtype=dtype)
        offset = 0
        for p in params:
            n = p.numel()
            view = flat[offset : offset + n].view(p.shape)
            view.copy_(p.detach())
            p.data = view
            offset += align(n)
    return model
