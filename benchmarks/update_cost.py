"""Cost of one EMA update, as a ratio to the floor: one ``lerp_`` over a single contiguous
buffer of the same element count (it moves 3 x N x 4 bytes, the update's own traffic).

Every library is measured in the same run as the floor, each repeat timing the floor and
then the library back to back, so that load on the machine hits both alike; a cell is the
median over repeats of that ratio, with the library's median time in parentheses.

    python benchmarks/update_cost.py                 # all models, all libraries
    python benchmarks/update_cost.py --models "1000 x Linear(32,32)" --repeats 9

Threads: ``BENCH_THREADS`` (default 1). On a shared 2-core machine a 2-thread ``lerp_`` waits
on OpenMP barriers whenever another process holds a core, which makes the floor itself noisy
by 10-100x; one thread measures the kernels, not the scheduler.

Peers come from the ``bench`` extra: ``pip install -e ".[bench]"``. A peer that cannot run
here is shown as ``n/a (why)``.
"""

from __future__ import annotations

import argparse
import copy
import gc

import torch
from _common import (
    MODELS,
    PEERS,
    averaged_numel,
    describe,
    emakit_update,
    machine,
    median,
    setup_threads,
    table,
    timed,
)
from torch import nn

import emakit


def emakit_flat(model):
    flat = emakit.flatten_parameters(copy.deepcopy(model))
    return emakit_update(flat)  # the EMA holds the flattened copy


def emakit_registering(model):
    """emakit with ``nn.CrossEntropyLoss()`` and ``nn.Linear(2, 2)`` built before each step,
    as training code builds a loss or a metric; their building is timed too (see
    benchmarks/registrations.py for the step alone)."""
    step, drain = emakit_update(model)

    def update():
        kept = (nn.CrossEntropyLoss(), nn.Linear(2, 2))  # noqa: F841 - alive during the step
        step()

    return update, drain


CONTESTANTS = dict(PEERS)
CONTESTANTS["emakit"] = emakit_update
CONTESTANTS["emakit, a module built per step"] = emakit_registering
CONTESTANTS["emakit + flatten_parameters"] = emakit_flat
TENTH = "emakit, 10ba (per step)"


def measure(model, setup, floor, repeats: int, device: str, block: int = 1):
    """(median of the per-pair ratios to the floor, median seconds per call, median floor
    seconds). Each repeat times the floor and then the contestant back to back, so the
    ratio of a pair shares the load the machine was under at that moment."""
    update, drain = setup(model)
    for _ in range(block):  # warm-up
        update()
    drain()
    gc.collect()
    gc.freeze()  # long-lived objects out of the collector's way (see step_overhead.py)
    ts, fs = [], []

    def run():
        for _ in range(block):
            update()
        drain()

    for _ in range(repeats):
        fs.append(timed(floor, device))
        ts.append(timed(run, device) / block)
    gc.unfreeze()
    ratio = median([t / f for t, f in zip(ts, fs, strict=True)])
    return ratio, median(ts), median(fs), min(ts) / min(fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=None, help="default: by model size")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    setup_threads()
    device = args.device
    contestants = dict(CONTESTANTS)
    if torch.device(device).type == "cuda":
        contestants["emakit, compensated=False"] = lambda m: emakit_update(m, compensated=False)
        contestants["emakit, device='cpu'"] = lambda m: emakit_update(m, device="cpu")
    print(f"# one EMA update / one lerp_ over a contiguous buffer; {machine()}\n")
    header = ["model", "floor (lerp_)"] + list(contestants) + [TENTH]
    rows, best_rows = [], []
    for name in args.models:
        build, _ = MODELS[name]
        torch.manual_seed(0)
        model = build().to(device)
        n = averaged_numel(model)
        repeats = args.repeats or (7 if n > 5e7 else 11 if n > 5e6 else 31)
        if device != "cpu":
            repeats *= 4
        a, b = torch.randn(n, device=device), torch.randn(n, device=device)

        def floor(a=a, b=b):
            a.lerp_(b, 1.0 - 0.999)

        for _ in range(2):
            floor()
        copy_s = median([timed(lambda a=a, b=b: b.copy_(a), device) for _ in range(repeats)])
        cells, floors, bests = [], [], []
        for label, setup in contestants.items():
            try:
                r, t, f, best = measure(model, setup, floor, repeats, device)
                gc.collect()  # free this contestant's copy before the next one
                cells.append(f"{r:.2f}x ({t * 1e3:.2f} ms)")
                bests.append(f"{best:.2f}x")
                floors.append(f)
            except Exception as exc:  # a peer that cannot run here
                cells.append(f"n/a ({type(exc).__name__}: {str(exc)[:60]})")
                bests.append("n/a")
            print(f"  {name} / {label}: {cells[-1]}", flush=True)
        r, t, f, best = measure(
            model,
            lambda m: emakit_update(m, "10ba"),
            floor,
            max(3, repeats // 2),
            device,
            block=10,
        )
        cells.append(f"{r:.2f}x ({t * 1e3:.2f} ms)")
        bests.append(f"{best:.2f}x")
        floors.append(f)
        print(f"  {name} / {TENTH}: {cells[-1]}", flush=True)
        fl = median(floors)
        gbs = 3 * n * 4 / fl / 1e9
        floor_cell = f"{fl * 1e3:.2f} ms, {gbs:.0f} GB/s"
        if device != "cpu":  # the update's traffic against a device-to-device copy's
            floor_cell += f" ({gbs / (2 * n * 4 / copy_s / 1e9):.2f} of copy bandwidth)"
        rows.append([f"{name} ({describe(model)})", floor_cell] + cells)
        best_rows.append([name] + bests)
        del model, a, b
        gc.collect()
    print("\nmedian over repeats of (update time / floor time), median update time:\n")
    print(table(header, rows))
    print("\nbest update time / best floor time (interference only ever adds time):\n")
    print(table(["model"] + header[2:], best_rows))


if __name__ == "__main__":
    main()
