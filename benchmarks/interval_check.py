"""Does ``update_interval="10ba"`` with the half-life kept give the average of every step?

Runs ``emakit demo``'s training (the digits MLP with BatchNorm, SGD lr 0.3 momentum 0.9,
batch 32, 20 epochs, half-life 200ba) with EMAs that update every batch and every 10
batches (smoothing ``2 ** (-10 / 200)`` per update), all fed by the same training run, and
reports for the final averages

- ``||avg_10 - avg_1|| / ||avg_1||`` over all averaged tensors,
- the same relative to how far the average travelled, ``||avg_10 - avg_1|| / ||avg_1 - w_0||``,
- for scale, the distance of the raw weights from the average, ``||w - avg_1|| / ||avg_1||``,
- test loss and accuracy of each average,
- the time the EMA takes per training step, interval 10 over interval 1.

with the demo's ``PowerWarmup(power=3/4)`` and without warmup.

    python benchmarks/interval_check.py
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import emakit
from emakit.demo import DemoConfig, evaluate, load_digits_split, make_model


def flat(sd: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([sd[n].double().flatten() for n in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = DemoConfig(epochs=args.epochs)
    torch.manual_seed(config.seed)
    x_train, y_train, x_test, y_test = load_digits_split(config.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    h = config.half_life
    emas = {
        (warm, every): emakit.EMA(
            model,
            half_life=h,
            update_interval=f"{every}ba",
            warmup=emakit.PowerWarmup(power=3 / 4) if warm else None,
        )
        for warm in (True, False)
        for every in (1, 10)
    }
    names = list(emas[(True, 1)].shadow.tensors())
    w0 = flat(model.state_dict(), names)
    cost = dict.fromkeys(emas, 0.0)
    generator = torch.Generator().manual_seed(config.seed)
    steps = 0
    for _ in range(config.epochs):
        for idx in torch.randperm(len(x_train), generator=generator).split(config.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            for key, ema in emas.items():
                start = time.perf_counter()
                ema.step()
                cost[key] += time.perf_counter() - start
    w = flat(model.state_dict(), names)
    print(f"emakit demo model, {steps} steps, half-life {h}, "
          f"interval 10ba vs 1ba (smoothing {emakit.smoothing_from_half_life(200, 10):.6f} "
          f"vs {emakit.smoothing_from_half_life(200, 1):.6f})\n")
    print("| warmup | rel. diff / norm | rel. diff / travel | raw vs avg | test loss 1ba -> 10ba "
          "| accuracy 1ba -> 10ba | EMA time per step, 10ba / 1ba |")
    print("|---|---|---|---|---|---|---|")
    raw_loss, raw_acc = evaluate(model, x_test, y_test)
    for warm in (True, False):
        e1, e10 = emas[(warm, 1)], emas[(warm, 10)]
        a1 = flat(e1.ema_state_dict(), names)
        a10 = flat(e10.ema_state_dict(), names)
        results = []
        for ema in (e1, e10):
            with ema.swapped():
                results.append(evaluate(model, x_test, y_test))
        print(
            f"| {'PowerWarmup(3/4)' if warm else 'none'} "
            f"| {float((a10 - a1).norm() / a1.norm()):.2e} "
            f"| {float((a10 - a1).norm() / (a1 - w0).norm()):.2e} "
            f"| {float((w - a1).norm() / a1.norm()):.2e} "
            f"| {results[0][0]:.4f} -> {results[1][0]:.4f} "
            f"| {results[0][1]:.2%} -> {results[1][1]:.2%} "
            f"| {cost[(warm, 10)] / cost[(warm, 1)]:.3f} |"
        )
    print(f"\nraw weights: test loss {raw_loss:.4f}, accuracy {raw_acc:.2%}")


if __name__ == "__main__":
    main()
