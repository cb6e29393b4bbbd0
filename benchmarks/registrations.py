"""What registrations between updates add to ``ema.step()``: a module built per step (a loss,
a metric, a throwaway layer), another EMA library's update, every parameter set again under
its own name (what FSDP1 with ``use_orig_params=True`` does after every forward), against
the same step with nothing in between.

Every repeat times one ``step()`` (an update each time: ``update_interval="1ba"``) after
each case in turn, in an order rotated from repeat to repeat; what happens between steps is
not timed. A cell is the median over repeats of (step after the case / step after nothing
in the same repeat), with the median step time in parentheses. The target (issue 21): at
most 1.10x.

    python benchmarks/registrations.py
    python benchmarks/registrations.py --models "1000 x Linear(32,32)" --repeats 51

Threads: ``BENCH_THREADS`` (default 1, see update_cost.py). ema-pytorch comes from the
``bench`` extra; without it that column says n/a.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable

import torch
from _common import MODELS, describe, emakit_update, machine, median, setup_threads, table, timed
from torch import nn


def _same_parameters(model: nn.Module) -> Callable[[], None]:
    """Every parameter registered again under its own name, through ``setattr``."""
    triples = [(m, n, p) for m in model.modules() for n, p in m._parameters.items()
               if p is not None]

    def again() -> None:
        for m, n, p in triples:
            setattr(m, n, p)

    return again


def _ema_pytorch(model: nn.Module) -> Callable[[], None]:
    from ema_pytorch import EMA

    ema = EMA(model, beta=0.999, update_after_step=0, update_every=1, use_foreach=True)
    ema.update()
    return ema.update


def cases(model: nn.Module) -> dict[str, Callable[[], object] | None]:
    out: dict[str, Callable[[], object] | None] = {
        "nothing": None,
        "nn.CrossEntropyLoss()": nn.CrossEntropyLoss,
        "nn.Linear(2, 2)": lambda: nn.Linear(2, 2),
        "every parameter set again": _same_parameters(model),
    }
    try:
        out["ema-pytorch update"] = _ema_pytorch(model)
    except ImportError:
        pass
    return out


def measure(model: nn.Module, repeats: int) -> dict[str, tuple[float, float]]:
    """case -> (median of per-repeat ratios to "nothing", median step seconds)."""
    step, drain = emakit_update(model)
    todo = cases(model)
    for between in todo.values():  # warm-up: the first re-plan, if any, is not timed
        if between is not None:
            between()
        step()
    drain()
    gc.collect()
    gc.freeze()
    times: dict[str, list[float]] = {name: [] for name in todo}
    names = list(todo)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            between = todo[name]
            kept = between() if between is not None else None  # noqa: F841 - alive while timed
            times[name].append(timed(lambda: (step(), drain())))
    gc.unfreeze()
    base = times["nothing"]
    return {name: (median([t / b for t, b in zip(ts, base, strict=True)]), median(ts))
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=None, help="default: by model size")
    args = parser.parse_args()
    setup_threads()
    print(f"# ema.step() after a case / after nothing, same repeat; {machine()}\n")
    header: list[str] = []
    rows = []
    for name in args.models:
        build, _ = MODELS[name]
        torch.manual_seed(0)
        model = build()
        n = sum(p.numel() for p in model.parameters())
        repeats = args.repeats or (9 if n > 5e7 else 15 if n > 5e6 else 41)
        result = measure(model, repeats)
        if not header:
            header = ["model", "step, nothing between"] + [c for c in result if c != "nothing"]
        base = result["nothing"][1]
        row = [f"{name} ({describe(model)})", f"{base * 1e3:.2f} ms"]
        for case in header[2:]:
            if case in result:
                ratio, t = result[case]
                row.append(f"{ratio:.2f}x ({t * 1e3:.2f} ms)")
            else:
                row.append("n/a (not installed)")
        rows.append(row)
        print(f"  {name}: " + ", ".join(row[1:]), flush=True)
        del model
        gc.collect()
    print()
    print(table(header, rows))


if __name__ == "__main__":
    main()
