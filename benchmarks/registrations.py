"""What registrations between updates add to ``ema.step()``: a module built per step (a loss,
a metric, a throwaway layer), another EMA library's update, every parameter set again under
its own name (what FSDP1 with ``use_orig_params=True`` does after every forward), against
the same step with nothing in between.

Every repeat times one ``step()`` (an update each time: ``update_interval="1ba"``) after
each case in turn, in an order rotated from repeat to repeat; what happens between steps is
not timed. Before each case a forward and backward pass of the model runs, as in training
(``--idle``: none). Without it the step after "nothing" finds its tensors' Python objects
in the CPU's caches, which any work between steps evicts: a plain Python loop of 2 ms
between steps makes the staleness check of 1000 x Linear 1.6x slower, registering nothing;
the column "every parameter read" (the same loop as "every parameter set again", reading,
no registration) shows that part.

A cell is the median over repeats of (step after the case / step after nothing in the same
repeat), with the median step time in parentheses; a second table gives the
ratio of the best times (load on a shared machine only ever adds time). The target (issue
21): at most 1.10x.

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


def _read_parameters(model: nn.Module) -> Callable[[], None]:
    """The loop of :func:`_same_parameters`, reading: no registration."""
    triples = [(m, n, p) for m in model.modules() for n, p in m._parameters.items()
               if p is not None]

    def read() -> None:
        for m, n, _ in triples:
            getattr(m, n)

    return read


def cases(model: nn.Module) -> dict[str, Callable[[], object] | None]:
    out: dict[str, Callable[[], object] | None] = {
        "nothing": None,
        "nn.CrossEntropyLoss()": nn.CrossEntropyLoss,
        "nn.Linear(2, 2)": lambda: nn.Linear(2, 2),
        "every parameter read": _read_parameters(model),
        "every parameter set again": _same_parameters(model),
    }
    try:
        out["ema-pytorch update"] = _ema_pytorch(model)
    except ImportError:
        pass
    return out


def _training(model: nn.Module, make_input: Callable[[], torch.Tensor]) -> Callable[[], None]:
    x = make_input()

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).float().mean().backward()

    return forward_backward


def measure(model: nn.Module, make_input: Callable[[], torch.Tensor] | None,
            repeats: int) -> dict[str, tuple[float, float, float]]:
    """case -> (median of per-repeat ratios to "nothing", median step seconds, best step
    seconds). ``make_input``: a forward and backward pass on it before each case (None:
    none)."""
    step, drain = emakit_update(model)
    train = _training(model, make_input) if make_input is not None else None
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
            if train is not None:
                train()
            kept = between() if between is not None else None  # noqa: F841 - alive while timed
            times[name].append(timed(lambda: (step(), drain())))
    gc.unfreeze()
    base = times["nothing"]
    return {name: (median([t / b for t, b in zip(ts, base, strict=True)]), median(ts), min(ts))
            for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=None, help="default: by model size")
    parser.add_argument("--idle", action="store_true",
                        help="no forward and backward pass between steps")
    args = parser.parse_args()
    setup_threads()
    between = "the case" if args.idle else "a forward and backward pass, then the case"
    print(f"# ema.step() after {between} / after nothing, same repeat; {machine()}\n")
    header: list[str] = []
    rows, best_rows = [], []
    for name in args.models:
        build, make_input = MODELS[name]
        torch.manual_seed(0)
        model = build()
        n = sum(p.numel() for p in model.parameters())
        repeats = args.repeats or (9 if n > 5e7 else 15 if n > 5e6 else 41)
        result = measure(model, None if args.idle else make_input, repeats)
        if not header:
            header = ["model", "step after nothing"] + [c for c in result if c != "nothing"]
        _, base, best = result["nothing"]
        row = [f"{name} ({describe(model)})", f"{base * 1e3:.2f} ms"]
        best_row = [name, f"{best * 1e3:.2f} ms"]
        for case in header[2:]:
            if case in result:
                ratio, t, b = result[case]
                row.append(f"{ratio:.2f}x ({t * 1e3:.2f} ms)")
                best_row.append(f"{b / best:.2f}x")
            else:
                row.append("n/a (not installed)")
                best_row.append("n/a")
        rows.append(row)
        best_rows.append(best_row)
        print(f"  {name}: " + ", ".join(row[1:]), flush=True)
        del model
        gc.collect()
    print("\nmedian over repeats of (step after the case / step after nothing), median step:\n")
    print(table(header, rows))
    print("\nbest step after the case / best step after nothing (load only ever adds time):\n")
    print(table(header, best_rows))


if __name__ == "__main__":
    main()
