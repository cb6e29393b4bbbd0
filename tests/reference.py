"""An independent float64 reference for the EMA, written from the closed form.

After the average is set to the model's weights theta_0 at the start step, and updated at
steps 1..m with smoothings s_1..s_m, it equals

    prod_k s_k * theta_0 + sum_i (1 - s_i) * prod_{k > i} s_k * theta_i

computed here as an explicit weighted sum in float64 (not the recursion the code runs).
"""

from __future__ import annotations

import torch
from torch import nn


def closed_form(init: torch.Tensor, updates: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``init``: the weights at the start step; ``updates``: (smoothing, weights) in order."""
    smoothings = [s for s, _ in updates]
    weight_init = 1.0
    for s in smoothings:
        weight_init *= s
    total = weight_init * init.double()
    for i, (s_i, theta_i) in enumerate(updates):
        w = 1.0 - s_i
        for s_k in smoothings[i + 1 :]:
            w *= s_k
        total = total + w * theta_i.double()
    return total


def set_random_weights(model: nn.Module, generator: torch.Generator, scale: float = 1.0) -> None:
    """Give every parameter new random values, as an optimizer step would."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def flat_state(state: dict[str, torch.Tensor], model: nn.Module) -> torch.Tensor:
    return torch.cat([state[n].double().reshape(-1) for n, _ in model.named_parameters()])
