"""Cost of one EMA update, as a ratio to its own byte floor measured in the same run.

The floor of a contestant is the time to move the bytes its update must move, on buffers
of the same element count: ``a.lerp_(b, w)`` over one contiguous fp32 buffer (12 B per
element: read the model and the average, write the average) and, for a compensated
average, a ``neg_`` over one more buffer the compensation's size (fp32 compensation: 8 B
more, 20 in all; a 16-bit one: 4 B more, 16). Each repeat times a contestant's floor and
then the contestant back to back, so that load on the machine hits both alike; a cell is
the median over repeats of that ratio, with the contestant's median time in parentheses.

    python benchmarks/update_cost.py                          # the issue's columns (~4 min)
    python benchmarks/update_cost.py --all                    # + every peer, flatten, 10ba
    python benchmarks/update_cost.py --models "1000 x Linear(32,32)" --repeats 9

"a module built per step": an ``nn.Linear(2, 2)`` is constructed between updates (outside
the timed call), as a loss or metric built inside a training loop is: every registration
anywhere in the process must cost the update nothing.

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
from collections.abc import Callable

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
    timm_update,
)
from torch import nn

import emakit


def emakit_flat(model):
    flat = emakit.flatten_parameters(copy.deepcopy(model))
    return emakit_update(flat)  # the EMA holds the flattened copy


def emakit_flat_plain(model):
    flat = emakit.flatten_parameters(copy.deepcopy(model))
    return emakit_update(flat, compensated=False)


def a_module() -> None:
    nn.Linear(2, 2)  # registers two parameters: torch's global registration hooks fire


# label -> (setup, extra floor bytes per element beyond the plain 12, between updates)
Contestant = tuple[Callable, int, Callable[[], None] | None]
MAIN: dict[str, Contestant] = {
    "timm ModelEmaV3": (timm_update, 0, None),
    "emakit (default)": (emakit_update, 8, None),
    "emakit (default), a module built per step": (emakit_update, 8, a_module),
    "emakit compensated=False": (lambda m: emakit_update(m, compensated=False), 0, None),
    "emakit compensated=False, a module built per step": (
        lambda m: emakit_update(m, compensated=False), 0, a_module),
}
EXTRA: dict[str, Contestant] = {
    **{k: (v, 0, None) for k, v in PEERS.items() if k != "timm ModelEmaV3"},
    "emakit (default) + flatten_parameters": (emakit_flat, 8, None),
    "emakit compensated=False + flatten_parameters": (emakit_flat_plain, 0, None),
}
TENTH = "emakit (default), 10ba (per step)"


class Floors:
    """The byte floors on buffers of ``n`` elements: 12 B (one ``lerp_``) plus ``extra``."""

    def __init__(self, n: int, device: str) -> None:
        self.a = torch.randn(n, device=device)
        self.b = torch.randn(n, device=device)
        self.c = torch.randn(n, device=device)  # 8 B per element more: an fp32 compensation

    def get(self, extra: int) -> Callable[[], None]:
        a, b = self.a, self.b
        c = self.c[: self.c.numel() * extra // 8] if extra else None

        def floor() -> None:
            a.lerp_(b, 1.0 - 0.999)
            if c is not None:
                c.neg_()

        return floor


def measure(model, setup, floor, repeats: int, device: str, block: int = 1, between=None):
    """(median of the per-pair ratios to the floor, median seconds per call, median floor
    seconds, best/best). Each repeat times the floor and then the contestant back to back,
    so the ratio of a pair shares the load the machine was under at that moment."""
    update, drain = setup(model)
    for _ in range(block):  # warm-up (and compiles)
        if between is not None:
            between()
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
        if between is not None:
            between()  # outside the timed call: only its effect on the update counts
        ts.append(timed(run, device) / block)
    gc.unfreeze()
    ratio = median([t / f for t, f in zip(ts, fs, strict=True)])
    return ratio, median(ts), median(fs), min(ts) / min(fs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=None, help="default: by model size")
    parser.add_argument("--all", action="store_true",
                        help="also every other peer, flatten_parameters and 10ba")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    setup_threads()
    device = args.device
    contestants = dict(MAIN)
    if args.all:
        contestants.update(EXTRA)
    if torch.device(device).type == "cuda":
        contestants["emakit, device='cpu'"] = (lambda m: emakit_update(m, device="cpu"), 8,
                                               None)
    print(f"# one EMA update / its byte floor; {machine()}\n")
    header = ["model", "floor 12 B/elem (lerp_)", "floor 20 B/elem"] + list(contestants)
    if args.all:
        header.append(TENTH)
    rows, best_rows = [], []
    for name in args.models:
        build, _ = MODELS[name]
        torch.manual_seed(0)
        model = build().to(device)
        n = averaged_numel(model)
        repeats = args.repeats or (7 if n > 5e7 else 11 if n > 5e6 else 31)
        if device != "cpu":
            repeats *= 4
        floors = Floors(n, device)
        for _ in range(2):
            floors.get(8)()
        cells, bests = [], []
        floor_times: dict[int, list[float]] = {0: [], 8: []}
        for label, (setup, extra, between) in contestants.items():
            try:
                r, t, f, best = measure(model, setup, floors.get(extra), repeats, device,
                                        between=between)
                gc.collect()  # free this contestant's copy before the next one
                cells.append(f"{r:.2f}x ({t * 1e3:.2f} ms)")
                bests.append(f"{best:.2f}x")
                floor_times.setdefault(extra, []).append(f)
            except Exception as exc:  # a peer that cannot run here
                cells.append(f"n/a ({type(exc).__name__}: {str(exc)[:60]})")
                bests.append("n/a")
            print(f"  {name} / {label}: {cells[-1]}", flush=True)
        if args.all:
            r, t, f, best = measure(model, lambda m: emakit_update(m, "10ba"), floors.get(8),
                                    max(3, repeats // 2), device, block=10)
            cells.append(f"{r:.2f}x ({t * 1e3:.2f} ms)")
            bests.append(f"{best:.2f}x")
            print(f"  {name} / {TENTH}: {cells[-1]}", flush=True)
        floor_cells = []
        for extra in (0, 8):
            fl = median(floor_times[extra]) if floor_times[extra] else float("nan")
            gbs = (12 + extra) * n / fl / 1e9
            floor_cells.append(f"{fl * 1e3:.2f} ms, {gbs:.0f} GB/s")
        rows.append([f"{name} ({describe(model)})"] + floor_cells + cells)
        best_rows.append([name] + bests)
        del model, floors
        gc.collect()
    print("\nmedian over repeats of (update time / its floor's time), median update time;"
          " floors: median time and bandwidth:\n")
    print(table(header, rows))
    print("\nbest update time / best floor time (interference only ever adds time):\n")
    print(table(["model"] + header[3:], best_rows))


if __name__ == "__main__":
    main()
