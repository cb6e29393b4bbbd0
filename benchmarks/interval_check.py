"""Does ``update_interval="10ba"`` with the half-life kept give the same average as every step?

Trains a small MLP on random regression data (SGD with momentum), with two EMAs of the same
half-life, one updating every batch and one every 10 batches (smoothing ``2 ** (-10 / h)``
per update), and reports the relative difference of the final averages,
``||avg_10 - avg_1|| / ||avg_1 - w_0||`` (w_0: the initial weights, so the figure is relative
to how far the average has travelled) and ``||avg_10 - avg_1|| / ||avg_1||``, together with
the time EMA takes per step in each case.

    python benchmarks/interval_check.py [--steps 3000] [--half-life 200]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import emakit


def flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.double().flatten() for t in sd.values() if t.is_floating_point()])


def run(steps: int, half_life: int, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 1))
    w0 = flat(model.state_dict())
    x, w_true = torch.randn(4096, 32), torch.randn(32, 1)
    y = torch.sin(x @ w_true) + 0.1 * torch.randn(4096, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    every1 = emakit.EMA(model, half_life=f"{half_life}ba")
    every10 = emakit.EMA(model, half_life=f"{half_life}ba", update_interval="10ba")
    cost = {1: 0.0, 10: 0.0}
    for _ in range(steps):
        idx = torch.randint(0, 4096, (64,))
        opt.zero_grad()
        nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
        for k, ema in ((1, every1), (10, every10)):
            start = time.perf_counter()
            ema.step()
            cost[k] += time.perf_counter() - start
    a1, a10, w = flat(every1.ema_state_dict()), flat(every10.ema_state_dict()), flat(
        model.state_dict()
    )
    return {
        "rel_to_travel": float((a10 - a1).norm() / (a1 - w0).norm()),
        "rel_to_norm": float((a10 - a1).norm() / a1.norm()),
        "model_vs_avg": float((w - a1).norm() / (a1 - w0).norm()),
        "cost_ratio": cost[10] / cost[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--half-life", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    r = run(args.steps, args.half_life)
    print(f"MLP 32-256-256-1, {args.steps} SGD steps, half-life {args.half_life}ba")
    print(f"||avg_10 - avg_1|| / ||avg_1 - w_0|| = {r['rel_to_travel']:.2e}")
    print(f"||avg_10 - avg_1|| / ||avg_1||       = {r['rel_to_norm']:.2e}")
    print(f"for scale, ||w - avg_1|| / ||avg_1 - w_0|| = {r['model_vs_avg']:.2e}")
    print(f"EMA time per step, interval 10 / interval 1 = {r['cost_ratio']:.3f}")


if __name__ == "__main__":
    main()
