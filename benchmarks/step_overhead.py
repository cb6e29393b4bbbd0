"""A real training step's time with EMA over without, for each library; EMA every step and
every 10 steps.

A step is ``zero_grad``, forward, backward and ``AdamW.step()`` on the benchmark models.

- CPU (synchronous): every step runs every library's EMA after the optimizer step, each
  timed on its own, in an order rotated from step to step; the overhead of a library is
  ``sum(EMA time) / sum(step time)`` over the measured steps (10 steps for "every 10").
- CUDA (``--device cuda``): work is asynchronous (an offloaded ``device="cpu"`` update
  overlaps the next step), so whole blocks of steps are timed with and without each EMA,
  interleaved, the device drained at the end of each block; overhead = median(with) /
  median(without) - 1.

    python benchmarks/step_overhead.py
    python benchmarks/step_overhead.py --device cuda
    python benchmarks/step_overhead.py --device cuda --bf16   # bf16 weights, fp32 averages

Long-lived objects are frozen out of Python's garbage collector while timing (``gc.freeze``):
otherwise full collections over the thousands of modules held by the model copies land on
whichever call happens to allocate next (seen as +17% to +32% on one peer's "every 10").

``emakit + flatten_parameters`` runs on its own flattened copy of the model, against that
copy's own step time. Threads: ``BENCH_THREADS`` (default 1, see update_cost.py).
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
from collections.abc import Callable

import torch
from _common import (
    DECAY,
    MODELS,
    PEERS,
    describe,
    ema_pytorch_update,
    emakit_update,
    machine,
    median,
    setup_threads,
    sync,
    table,
)

import emakit

# Each factory: (model, every) -> (call after every optimizer step, drain).


def _every(setup: Callable) -> Callable:
    """A peer without an interval option: the user's loop calls it every `every` steps."""

    def factory(model, every):
        update, drain = setup(model)
        count = [0]

        def step():
            count[0] += 1
            if count[0] % every == 0:
                update()

        return step, drain

    return factory


FACTORIES: dict[str, Callable] = {label: _every(setup) for label, setup in PEERS.items()}
FACTORIES["ema-pytorch"] = lambda m, every: (
    lambda e: (e[0], e[1])
)(ema_pytorch_update(m, every=every))  # native update_every
FACTORIES["emakit"] = lambda m, every: emakit_update(m, f"{every}ba")
FLAT = "emakit + flatten_parameters"


def make_step(model, batch, device):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        model(batch).float().square().mean().backward()
        opt.step()

    return step


def cpu_overheads(model, batch, factories, every: int, steps: int) -> dict[str, float]:
    train = make_step(model, batch, "cpu")
    train()
    emas = {label: f(model, every) for label, f in factories.items()}
    # Long-lived objects (the models and their copies) out of the collector's way: otherwise
    # a full collection over thousands of modules lands on whichever call allocates next.
    gc.collect()
    gc.freeze()
    t_train, t_ema = [], {label: [] for label in emas}
    labels = list(emas)
    for k in range(steps):
        start = time.perf_counter()
        train()
        t_train.append(time.perf_counter() - start)
        for label in labels[k % len(labels) :] + labels[: k % len(labels)]:
            update, drain = emas[label]
            start = time.perf_counter()
            update()
            drain()
            t_ema[label].append(time.perf_counter() - start)
    gc.unfreeze()
    return {label: sum(ts) / sum(t_train) for label, ts in t_ema.items()}


def cuda_overheads(model, batch, factories, every, steps, repeats=3) -> dict[str, float]:
    train = make_step(model, batch, "cuda")
    for _ in range(3):
        train()
    out = {}
    for label, factory in factories.items():
        update, drain = factory(model, every)
        gc.collect()
        gc.freeze()
        base, withema = [], []
        for _ in range(repeats):
            sync("cuda")
            start = time.perf_counter()
            for _ in range(steps):
                train()
            sync("cuda")
            base.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(steps):
                train()
                update()
            drain()
            sync("cuda")
            withema.append(time.perf_counter() - start)
        gc.unfreeze()
        out[label] = median(withema) / median(base) - 1.0
        del update, drain
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="default: 5 (10 for every 10)")
    parser.add_argument("--bf16", action="store_true",
                        help="train in bf16 (bf16 weights, fp32 averages: what large models do)")
    args = parser.parse_args()
    setup_threads()
    device = args.device
    cuda = torch.device(device).type == "cuda"
    factories = dict(FACTORIES)
    if cuda:
        factories["emakit, compensated=False"] = lambda m, every: emakit_update(
            m, f"{every}ba", compensated=False
        )
        factories["emakit, device='cpu'"] = lambda m, every: emakit_update(
            m, f"{every}ba", device="cpu"
        )
    what = "bf16 weights, AdamW" if args.bf16 else "fp32 weights, AdamW"
    print(f"# training step time with EMA over without ({what}); {machine()}, decay {DECAY}\n")
    rows = []
    for name in args.models:
        build, make_batch = MODELS[name]
        torch.manual_seed(0)
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model = build().to(device, dtype)
        batch = make_batch().to(device)
        if batch.is_floating_point():
            batch = batch.to(dtype)
        flat_model = emakit.flatten_parameters(copy.deepcopy(model))
        cells: dict[str, list[str]] = {label: [] for label in list(factories) + [FLAT]}
        for every in (1, 10):
            steps = args.steps or (5 if every == 1 else 10)
            if cuda:
                steps, run = max(steps, 20), cuda_overheads
            else:
                run = cpu_overheads
            result = run(model, batch, factories, every, steps)
            result.update(
                run(flat_model, batch, {FLAT: FACTORIES["emakit"]}, every, steps)
            )
            for label, value in result.items():
                cells[label].append(f"{100 * value:+.1f}%")
                print(f"  {name} / {label} / every {every}: {cells[label][-1]}", flush=True)
            gc.collect()
        rows.append(
            [f"{name} ({describe(model)})"] + [" / ".join(c) for c in cells.values()]
        )
        del model, flat_model
        gc.collect()
    print("\ncells: overhead with EMA every step / every 10 steps\n")
    print(table(["model"] + list(cells), rows))


if __name__ == "__main__":
    main()
