"""BEMA against the plain EMA on the demo's run: test loss per epoch, raw weights beside them.

Both averages ride on one training run (the demo's MLP on scikit-learn's digits, SGD with a
high learning rate), so the only difference is the averaging. Prints a markdown table.

    python benchmarks/bema_vs_ema.py [--epochs 20]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import emakit
from emakit.demo import evaluate, load_digits_split, make_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    averages = {
        "EMA (half-life 200ba, warmup 3/4)": emakit.EMA(
            model, half_life="200ba", warmup=emakit.PowerWarmup(power=3 / 4)),
        "BEMA (defaults)": emakit.BEMA(model),
    }
    gen = torch.Generator().manual_seed(args.seed)
    print("| epoch | raw | " + " | ".join(averages) + " |")
    print("|---|---|" + "---|" * len(averages))
    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(x_train), generator=gen).split(32):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for avg in averages.values():
                avg.step()
        raw, _ = evaluate(model, x_test, y_test)
        cells = []
        for avg in averages.values():
            with avg.swapped():
                cells.append(f"{evaluate(model, x_test, y_test)[0]:.4f}")
        print(f"| {epoch} | {raw:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
