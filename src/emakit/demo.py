"""``emakit demo``: raw vs EMA weights on scikit-learn's bundled digits.

A small MLP with BatchNorm is trained with a learning rate high enough that the raw weights
jitter from step to step; the EMA of those weights is evaluated beside them after every
epoch. Needs the ``demo`` extra (scikit-learn, matplotlib, tqdm); no download.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .ema import EMA
from .schedules import PowerWarmup

__all__ = ["DemoConfig", "load_digits_split", "make_model", "run_demo", "add_arguments", "main"]


@dataclass
class DemoConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.3
    half_life: str = "200ba"
    seed: int = 0
    out: str = "demo-output"
    progress: bool = True


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The 1797 8x8 digits, scaled to [0, 1], split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit("emakit demo needs the demo extra: pip install 'emakit[demo]'") from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_train = int(0.8 * len(x))
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
        nn.Linear(128, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy in [0, 1]) in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    model.train(was_training)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def run_demo(config: DemoConfig) -> list[dict[str, float]]:
    """Train, evaluating raw and EMA weights after each epoch; returns one row per epoch."""
    torch.manual_seed(config.seed)
    x_train, y_train, x_test, y_test = load_digits_split(config.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    # Warmup keeps the first epochs' average from dragging the random initialization along.
    ema = EMA(model, half_life=config.half_life, warmup=PowerWarmup(power=3 / 4))
    steps_per_epoch = (len(x_train) + config.batch_size - 1) // config.batch_size
    bar = _progress(config.epochs * steps_per_epoch, config.progress)
    generator = torch.Generator().manual_seed(config.seed)
    rows = []
    for epoch in range(1, config.epochs + 1):
        for idx in torch.randperm(len(x_train), generator=generator).split(config.batch_size):
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.step()
            bar.update(1)
        ema.epoch_end()
        raw_loss, raw_acc = evaluate(model, x_test, y_test)
        with ema.swapped():
            ema_loss, ema_acc = evaluate(model, x_test, y_test)
        rows.append(
            {"epoch": epoch, "raw_loss": raw_loss, "raw_acc": raw_acc,
             "ema_loss": ema_loss, "ema_acc": ema_acc}
        )
        bar.set_postfix(raw=f"{raw_loss:.3f}", ema=f"{ema_loss:.3f}")
    bar.close()
    return rows


def format_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| epoch | raw test loss | EMA test loss | raw accuracy | EMA accuracy |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['epoch']} | {r['raw_loss']:.4f} | {r['ema_loss']:.4f} "
            f"| {r['raw_acc']:.2%} | {r['ema_acc']:.2%} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["raw_loss"] for r in rows], label="raw weights")
    ax_loss.plot(epochs, [r["ema_loss"] for r in rows], label="EMA weights")
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy (nats)", title="Test loss")
    ax_acc.plot(epochs, [100 * r["raw_acc"] for r in rows], label="raw weights")
    ax_acc.plot(epochs, [100 * r["ema_acc"] for r in rows], label="EMA weights")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("emakit demo: digits, SGD lr high enough to be noisy")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="training", unit="step", leave=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--half-life", default=defaults.half_life)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=defaults.out, help="folder for the plot")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise SystemExit(f"--epochs: expected an integer >= 1, got {args.epochs}")
    config = DemoConfig(
        epochs=args.epochs, lr=args.lr, half_life=args.half_life, seed=args.seed,
        out=args.out, progress=not args.no_progress,
    )
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = run_demo(config)
    print(format_table(rows))
    last = rows[-1]
    print(
        f"\nfinal test loss: raw {last['raw_loss']:.4f}, EMA {last['ema_loss']:.4f} "
        f"(half-life {config.half_life}); accuracy: raw {last['raw_acc']:.2%}, "
        f"EMA {last['ema_acc']:.2%}"
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(rows, out / "demo.png")
    print(f"plot written to {out / 'demo.png'}")
    return 0
