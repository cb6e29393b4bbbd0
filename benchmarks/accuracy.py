"""How far each storage of the average drifts from a float64 EMA, and what it costs.

    python benchmarks/accuracy.py            # ~10 min on 1 CPU thread (compiles included)
    python benchmarks/accuracy.py --quick    # smaller sizes, for a smoke test
    python benchmarks/accuracy.py --only frozen --long   # adds a half-life of 1e8

1. Frozen weight (issue "exact over any run length"): a weight at 1.0 moves to 1.001 and
   stays; after one half-life h the average must read 1.0005. For each storage and h in
   1e4..1e7 the table gives the reading and its error relative to the 0.0005 it should have
   moved.

   Long runs are measured in segments: K independent elements, element j starting at the
   exact EMA value after j*m updates (m = h/K), stored as the storage would hold it (the
   float64 value split into average + compensation), each run m real updates with the real
   weight; all K run at once as one vector. Each segment's own error (its result minus the
   exact EMA from its stored start) is carried to the end of the half-life by the exact
   linear map (factor (1-w)**k <= 1) and the errors are summed. An update depends only on
   the stored state, the source and w, so the segments replay every one of the h updates a
   full run makes, from the state it would be in. The equivalence is shown where a full run
   is cheap: h = 1e4 and 1e5 are run both ways ("full" and "segments" columns).

2. Random walk: 10,000 weights (normal, half of them near 1 like LayerNorm gains) take 1000
   random steps of 1e-4; half-life 1e5 updates; fp32 and bf16 (rounded from an fp32 master)
   models. Max |average - float64 EMA| over all elements and steps' end, and that error
   relative to the largest distance an element's average moved.

3. Cost on this CPU: bytes stored per element, bytes an update moves, and one update's time
   with the eager kernel (``lerp_``) and the fused one (``FusedLerp``, compiled), each as a
   ratio to a plain ``torch._foreach_lerp_`` over the same number of fp32 elements, timed
   back to back in the same run.

Every storage row runs the library's kernels except "fp32 + 16-bit comp, round to nearest
(sim.)": the 6-byte layout of the 16-bit compensation with the low part rounded to nearest
instead of dithered, simulated in float64 arithmetic, to show why the kernel dithers. The
16-bit compensation (an int8 ``comp`` of two byte planes) is decoded here in float64 from
its definition (``q * 2**(e - 39)``), not by the kernel.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from _common import machine

from emakit._engine.kernels import FusedLerp, comp_nbytes, compilation_available, lerp_

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

F32, BF16, F64, I8 = torch.float32, torch.bfloat16, torch.float64, torch.int8
RN16 = "int16 rn"  # the simulated round-to-nearest fixed point

# name: (average dtype, compensation dtype or None)
STORAGES: dict[str, tuple[torch.dtype, torch.dtype | str | None]] = {
    "fp32 (plain)": (F32, None),
    "fp32 + fp32 comp": (F32, F32),
    "fp32 + bf16 comp": (F32, BF16),
    "fp32 + 16-bit comp (dithered)": (F32, I8),
    "fp32 + 16-bit comp, round to nearest (sim.)": (F32, RN16),
    "bf16 + bf16 comp": (BF16, BF16),
    "bf16 (plain)": (BF16, None),
    "fp64 (plain)": (F64, None),
}


def nbytes(avg_dtype: torch.dtype, comp) -> int:
    return comp_nbytes(avg_dtype, I8 if comp == RN16 else comp)


def quantum(hi: torch.Tensor) -> torch.Tensor:
    """The 16-bit compensation's step for fp32 averages ``hi``, in float64, from its
    definition: 2**(e - 39) for hi in [2**e, 2**(e+1)), e >= -87."""
    _, e = torch.frexp(hi.double())  # hi = m * 2**e with m in [0.5, 1)
    return torch.ldexp(torch.ones_like(hi, dtype=F64), torch.clamp(e - 1, min=-87) - 39)


def planes(q: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of 16-bit counts: two int8 planes, high byte then low byte."""
    return torch.stack([(q >> 8).to(I8), ((q & 0xFF) + 128) % 256 - 128]).to(I8)


def count(c: torch.Tensor) -> torch.Tensor:
    return c[0].to(torch.int64) * 256 + (c[1].to(torch.int64) & 0xFF)


class State:
    """The stored average of one storage kind, and its update."""

    def __init__(self, value: torch.Tensor, avg_dtype: torch.dtype, comp) -> None:
        self.comp_kind = comp
        self.hi = value.to(avg_dtype)
        self.lo = None
        rest = value - self.hi.double()
        if comp in (I8, RN16):
            q = torch.round(rest / quantum(self.hi)).clamp(-(2**15), 2**15 - 1).to(torch.int64)
            self.lo = q if comp == RN16 else planes(q)
        elif comp is not None:
            self.lo = rest.to(comp)

    def value(self) -> torch.Tensor:
        if self.comp_kind == I8:
            return self.hi.double() + count(self.lo).double() * quantum(self.hi)
        if self.comp_kind == RN16:
            return self.hi.double() + self.lo.double() * quantum(self.hi)
        return self.hi.double() + (0.0 if self.lo is None else self.lo.double())

    def update(self, src: torch.Tensor, w: float, kernel=lerp_) -> None:
        if self.comp_kind == RN16:  # float64 arithmetic, stored as the 16-bit layout holds it
            e = self.value()
            e = e + w * (src.double() - e)
            self.hi = e.to(F32)
            q = torch.round((e - self.hi.double()) / quantum(self.hi))
            self.lo = q.clamp(-(2**15), 2**15 - 1).to(torch.int64)
        else:
            kernel([self.hi], [src], w, None if self.lo is None else [self.lo])


def frozen_reading(h: float, storage, segments: int, target: float, kernel=lerp_) -> float:
    """The average after h updates of a weight that moved from 1.0 to ``target``."""
    w = -math.expm1(-math.log(2.0) / h)  # 1 - 2**(-1/h), accurate for large h
    steps = round(h)
    m = steps // segments
    x = torch.tensor(target, dtype=F32)
    xd = float(x)
    j = torch.arange(segments, dtype=F64)
    log_s = math.log1p(-w)
    starts = xd - (xd - 1.0) * torch.exp(j * m * log_s)  # exact EMA after j*m updates
    state = State(starts, *storage)
    start_stored = state.value()
    src = x.expand(segments).contiguous()
    for _ in range(m):
        state.update(src, w, kernel)
    exact_seg = xd - (xd - start_stored) * math.exp(m * log_s)
    err = (state.value() - exact_seg) * torch.exp((segments - 1 - j) * m * log_s)
    exact = xd - (xd - 1.0) * math.exp(steps * log_s)
    return exact + float(err.sum())


def frozen_table(half_lives, quick: bool) -> None:
    target = 1.001
    exact_moved = (float(torch.tensor(target, dtype=F32)) - 1.0) / 2
    # long runs take the compiled kernel where there is one (the same arithmetic, faster)
    fused = FusedLerp(eager_below=0) if compilation_available("cpu") else lerp_
    print("\n## Frozen weight: 1.0 -> 1.001, reading after one half-life (should be 1.0005)\n")
    cols = []
    for h in half_lives:
        if h <= (1e4 if quick else 1e5):
            cols.append((h, "full", 1))
        cols.append((h, "segments", 100 if h <= 1e4 else 1000 if h <= 1e7 else 10_000))
    head = " | ".join(f"h={h:.0e} {how}" for h, how, _ in cols)
    print(f"| storage | bytes/elem | {head} |")
    print("|---|---|" + "---|" * len(cols))
    for name, storage in STORAGES.items():
        cells = []
        for h, _, k in cols:
            kernel = fused if round(h) // k >= 10_000 else lerp_
            reading = frozen_reading(h, storage, k, target, kernel)
            rel = abs(reading - (1.0 + exact_moved)) / exact_moved
            cells.append(f"{reading:.7f} ({rel:.1e})")
        print(f"| {name} | {nbytes(*storage)} | " + " | ".join(cells) + " |", flush=True)
    print(
        "\nCells: reading (|reading - exact| / 0.0005). 'full' runs h real updates; "
        "'segments' K = 100 (h=1e4), 1000 (to 1e7) or 10,000 (1e8) independent elements "
        "of h/K updates each."
    )


def random_walk_table(n: int, steps: int, h: float) -> None:
    print(f"\n## Random walk: {n} weights, {steps} steps of 1e-4, half-life {h:.0e}\n")
    print("| storage | model | max abs error | error / max distance moved |")
    print("|---|---|---|---|")
    w = -math.expm1(-math.log(2.0) / h)
    for model_dtype in (F32, BF16):
        g = torch.Generator().manual_seed(0)
        master = torch.randn(n, generator=g, dtype=F32)
        master[: n // 2] = 1.0 + 0.01 * master[: n // 2]  # LayerNorm-like gains
        walk = [master]
        for _ in range(steps):
            walk.append(walk[-1] + 1e-4 * torch.randn(n, generator=g, dtype=F32))
        srcs = [x.to(model_dtype) for x in walk]
        ref = srcs[0].double()
        for s in srcs[1:]:
            ref = ref + w * (s.double() - ref)
        moved = (ref - srcs[0].double()).abs().max().item()
        for name, storage in STORAGES.items():
            state = State(srcs[0].double(), *storage)
            for s in srcs[1:]:
                state.update(s, w)
            err = (state.value() - ref).abs().max().item()
            print(f"| {name} | {str(model_dtype)[6:]} | {err:.2e} | {err / moved:.1e} |")
    print(f"\n(max distance moved by an element's average: about {moved:.1e})")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


COST_ROWS = [  # (model dtype, storage name)
    (F32, "fp32 (plain)"),
    (F32, "fp32 + fp32 comp"),
    (F32, "fp32 + bf16 comp"),
    (F32, "fp32 + 16-bit comp (dithered)"),
    (BF16, "fp32 (plain)"),
    (BF16, "fp32 + fp32 comp"),
    (BF16, "fp32 + 16-bit comp (dithered)"),
    (BF16, "bf16 + bf16 comp"),
]


def _ratio(fn, floor, reps: int) -> tuple[float, float]:
    """(median time of ``fn``, median of time(fn) / time(floor)), timed back to back."""
    fn()  # warm-up (and compile)
    times, ratios = [], []
    for _ in range(reps):
        t_floor = _timed(floor)
        t = _timed(fn)
        times.append(t)
        ratios.append(t / t_floor)
    return statistics.median(times), statistics.median(ratios)


def cost_table(n: int, reps: int) -> None:
    """Each repeat times the floor (a plain ``_foreach_lerp_`` over n fp32 elements) and
    then the kernel, back to back (the machine's load hits both alike); a cell is the median
    time and the median over repeats of kernel time / floor time."""
    a, b = [torch.randn(n)], [torch.randn(n)]

    def floor():
        torch._foreach_lerp_(a, b, 1e-4)

    fused_ok = compilation_available("cpu")
    print(f"\n## Cost: {n / 1e6:.0f}M elements, one update against a plain fp32 lerp_\n")
    print("| model | storage | bytes stored/elem | bytes moved/elem | eager lerp_ | "
          "fused (compiled) |")
    print("|---|---|---|---|---|---|")
    w = 1e-4
    fused = FusedLerp(eager_below=0) if fused_ok else None
    for model_dtype, name in COST_ROWS:
        avg_dtype, comp_dtype = STORAGES[name]
        src = [torch.randn(n).to(model_dtype)]
        avg = [src[0].to(avg_dtype)]
        comp = None if comp_dtype is None else [
            torch.zeros((2, n) if comp_dtype == I8 else n, dtype=comp_dtype)]
        stored = nbytes(avg_dtype, comp_dtype)
        moved = model_dtype.itemsize + 2 * stored
        cells = []
        kernels = [lambda a=avg, s=src, c=comp: lerp_(a, s, w, c)]
        if fused is not None:
            kernels.append(lambda a=avg, s=src, c=comp: fused(a, s, w, c))
        for fn in kernels:
            try:
                t, r = _ratio(fn, floor, reps)
                cells.append(f"{t * 1e3:.2f} ms ({r:.2f}x)")
            except Exception as e:  # a compile failure is reported, not fatal
                cells.append(f"error: {type(e).__name__}: {e}")
        if fused is None:
            cells.append("n/a (no C++ compiler for inductor)")
        mdt = str(model_dtype)[6:]
        print(f"| {mdt} | {name} | {stored} | {moved} | " + " | ".join(cells) + " |",
              flush=True)
    t_floor = statistics.median(_timed(floor) for _ in range(reps))
    print(f"\nfloor: {t_floor * 1e3:.2f} ms (12 bytes per element: "
          f"{12 * n / t_floor / 1e9:.1f} GB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--long", action="store_true", help="add a half-life of 1e8")
    parser.add_argument(
        "--only", choices=("frozen", "walk", "cost"), default=None, help="one table only"
    )
    args = parser.parse_args()
    print(f"# {machine()}")
    half_lives = [1e4, 1e5] if args.quick else [1e4, 1e5, 1e6, 1e7]
    if args.long:
        half_lives.append(1e8)
    if args.only in (None, "frozen"):
        frozen_table(half_lives, args.quick)
    if args.only in (None, "walk"):
        random_walk_table(1000 if args.quick else 10_000, 100 if args.quick else 1000, 1e5)
    if args.only in (None, "cost"):
        cost_table(1 << (18 if args.quick else 23), 3 if args.quick else 9)


if __name__ == "__main__":
    main()
