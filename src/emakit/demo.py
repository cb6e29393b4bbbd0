"""``emakit demo``: raw vs EMA weights on scikit-learn's bundled digits.

A small MLP with BatchNorm is trained with a learning rate high enough that the raw weights
jitter from step to step; the EMA of those weights is evaluated beside them after every
epoch. A :class:`~emakit.PostHocEMA` rides along on the same run and stores 40 snapshots;
after training the demo sweeps sigma_rel with :func:`~emakit.synthesize` and reports the
test loss of each post-hoc average. Needs the ``demo`` extra (scikit-learn, matplotlib,
tqdm); no download.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .ema import EMA
from .io import atomic_file
from .posthoc import PostHocEMA, supported_sigma_rels, synthesize
from .posthoc import list_snapshots as _list_snapshots
from .schedules import PowerWarmup

__all__ = [
    "DemoConfig", "load_digits_split", "make_model", "run_demo", "posthoc_sweep",
    "add_arguments", "main",
]

#: sigma_rel values the post-hoc sweep tries (those the snapshots support)
SWEEP_SIGMA_RELS = (0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.07, 0.10, 0.13, 0.16, 0.20, 0.25)
SNAPSHOTS = 40


@dataclass
class DemoConfig:
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.3
    half_life: str = "200ba"
    seed: int = 0
    out: str = "demo-output"
    progress: bool = True
    sweep: bool = True
    snapshot_dir: str | None = None  # None: a temporary folder


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


def run_demo(
    config: DemoConfig, snapshot_dir: str | os.PathLike | None = None
) -> list[dict[str, float]]:
    """Train, evaluating raw and EMA weights after each epoch; returns one row per epoch.

    With ``snapshot_dir``, a PostHocEMA (sigma_rel 0.05 and 0.10, fp16) beside the EMA writes
    about SNAPSHOTS (40) snapshots there, the last at the final step."""
    torch.manual_seed(config.seed)
    x_train, y_train, x_test, y_test = load_digits_split(config.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    # Warmup keeps the first epochs' average from dragging the random initialization along.
    ema = EMA(model, half_life=config.half_life, warmup=PowerWarmup(power=3 / 4))
    steps_per_epoch = (len(x_train) + config.batch_size - 1) // config.batch_size
    posthoc = None
    if snapshot_dir is not None:
        every = max(1, config.epochs * steps_per_epoch // SNAPSHOTS)
        posthoc = PostHocEMA(model, snapshot_every=f"{every}ba", snapshot_dir=snapshot_dir)
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
            if posthoc is not None:
                posthoc.step()
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
    if posthoc is not None and posthoc.counts["ba"] % posthoc.snapshot_every.value:
        posthoc.snapshot()  # the sweep synthesizes at the final step
    return rows


def posthoc_sweep(
    snapshot_dir: str | os.PathLike,
    seed: int = 0,
    sigma_rels: tuple[float, ...] = SWEEP_SIGMA_RELS,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Test loss and accuracy of the post-hoc EMA at the last snapshot, for each sigma_rel
    the snapshots support (one pass over the files); one row per sigma_rel."""
    _, _, x_test, y_test = load_digits_split(seed)
    snaps = _list_snapshots(snapshot_dir)
    ranges = supported_sigma_rels(snaps)
    chosen = [s for s in sigma_rels if any(lo <= s <= hi for lo, hi in ranges)]
    if not chosen:
        return []
    bar = _progress(len(snaps), progress, desc="post-hoc sweep", unit="file")
    states = synthesize(snapshot_dir, sigma_rel=chosen,
                        progress=lambda done, total: bar.update(1))
    bar.close()
    model = make_model()
    rows = []
    for sigma_rel, state in zip(chosen, states, strict=True):
        model.load_state_dict(state)
        loss, acc = evaluate(model, x_test, y_test)
        rows.append({"sigma_rel": sigma_rel, "loss": loss, "acc": acc, "snapshots": len(snaps)})
    return rows


def format_sweep(rows: list[dict[str, float]]) -> str:
    lines = ["| sigma_rel | post-hoc EMA test loss | accuracy |", "|---:|---:|---:|"]
    best = min(rows, key=lambda r: r["loss"])
    for r in rows:
        mark = " (best)" if r is best else ""
        lines.append(f"| {r['sigma_rel']:g} | {r['loss']:.4f}{mark} | {r['acc']:.2%} |")
    return "\n".join(lines)


def plot_sweep(
    rows: list[dict[str, float]], raw_loss: float, ema_loss: float, half_life: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["sigma_rel"] for r in rows], [r["loss"] for r in rows], "o-",
            label="post-hoc EMA (synthesized)")
    ax.axhline(raw_loss, color="gray", ls="--", label="raw weights")
    ax.axhline(ema_loss, color="tab:orange", ls=":", label=f"EMA, half-life {half_life}")
    ax.set(xscale="log", xlabel="sigma_rel (EMA length relative to training time)",
           ylabel="test cross-entropy (nats)", title="Post-hoc EMA sweep at the final step")
    from matplotlib.ticker import FixedLocator, NullFormatter, StrMethodFormatter

    ax.xaxis.set_major_locator(FixedLocator([0.01, 0.02, 0.05, 0.1, 0.2]))
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


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


def figure(rows: list[dict[str, float]]):
    """The demo's matplotlib figure: test loss and accuracy per epoch, raw and EMA weights;
    the epoch axis has whole-number ticks only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["raw_loss"] for r in rows], label="raw weights")
    ax_loss.plot(epochs, [r["ema_loss"] for r in rows], label="EMA weights")
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy (nats)", title="Test loss")
    ax_acc.plot(epochs, [100 * r["raw_acc"] for r in rows], label="raw weights")
    ax_acc.plot(epochs, [100 * r["ema_acc"] for r in rows], label="EMA weights")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("emakit demo: digits, SGD lr high enough to be noisy")
    fig.tight_layout()
    return fig


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows)
    with atomic_file(path) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kwargs: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str = "training", unit: str = "step"):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoConfig()
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--half-life", default=defaults.half_life)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=defaults.out, help="folder for the plot")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--no-sweep", action="store_true", help="skip the post-hoc EMA sweep")
    parser.add_argument("--snapshot-dir", default=None,
                        help="keep the post-hoc EMA snapshots in this (new or empty) folder, "
                        "for `emakit synthesize`; default: a temporary folder")


def main(args: argparse.Namespace) -> int:
    if args.epochs < 1:
        raise SystemExit(f"--epochs: expected an integer >= 1, got {args.epochs}")
    config = DemoConfig(
        epochs=args.epochs, lr=args.lr, half_life=args.half_life, seed=args.seed,
        out=args.out, progress=not args.no_progress, sweep=not args.no_sweep,
        snapshot_dir=args.snapshot_dir,
    )
    keep = Path(args.snapshot_dir) if args.snapshot_dir else None
    if keep is not None and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        raise SystemExit(f"--snapshot-dir: {str(keep)!r} must be a new or empty folder")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="emakit-demo-") as tmp:
        snapshot_dir = None
        if config.sweep:
            snapshot_dir = config.snapshot_dir or os.path.join(tmp, "snapshots")
        rows = run_demo(config, snapshot_dir)
        sweep = posthoc_sweep(snapshot_dir, config.seed, progress=config.progress) \
            if snapshot_dir else []
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
    if sweep:
        best = min(sweep, key=lambda r: r["loss"])
        print(f"\npost-hoc EMA sweep at the final step ({sweep[0]['snapshots']} snapshots of "
              "sigma_rel 0.05 and 0.10, fp16):")
        print(format_sweep(sweep))
        print(f"best sigma_rel {best['sigma_rel']:g}: test loss {best['loss']:.4f} "
              f"(raw {last['raw_loss']:.4f}, EMA half-life {config.half_life} "
              f"{last['ema_loss']:.4f})")
        plot_sweep(sweep, last["raw_loss"], last["ema_loss"], config.half_life,
                   out / "posthoc.png")
        print(f"plot written to {out / 'posthoc.png'}")
        if config.snapshot_dir:
            print(f"snapshots kept in {config.snapshot_dir}: try `emakit inspect "
                  f"{config.snapshot_dir}`")
    return 0
