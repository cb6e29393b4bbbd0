"""How far each storage of the average drifts from a float64 EMA, and what it costs.

    python benchmarks/accuracy.py            # ~3 min on 1 CPU thread
    python benchmarks/accuracy.py --quick    # smaller sizes, for a smoke test

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

3. Cost on this CPU: bytes stored per element, and one update's time against the floor
   (bytes the update must move / copy bandwidth measured in the same run) for the eager
   kernels and the fused (torch.compile) ones.

"fp32 + int16 fixed" is a candidate, simulated in float64 (no kernel yet): the compensation
stored as a 16-bit integer count of 2**-15 ulp(avg), i.e. a 39-bit significand in 6 bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from emakit._engine.kernels import FusedLerp, compilation_available, lerp_

torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64

# name: (average dtype, compensation dtype or None, or "int16" for the fixed-point candidate)
STORAGES: dict[str, tuple[torch.dtype, torch.dtype | str | None]] = {
    "fp32 (plain)": (F32, None),
    "fp32 + fp32 comp": (F32, F32),
    "fp32 + bf16 comp": (F32, BF16),
    "fp32 + int16 fixed (sim.)": (F32, "int16"),
    "bf16 + bf16 comp": (BF16, BF16),
    "bf16 (plain)": (BF16, None),
    "fp64 (plain)": (F64, None),
}


def nbytes(avg_dtype: torch.dtype, comp) -> int:
    extra = 0 if comp is None else 2 if comp == "int16" else comp.itemsize
    return avg_dtype.itemsize + extra


class State:
    """The stored average of one storage kind, and its update."""

    def __init__(self, value: torch.Tensor, avg_dtype: torch.dtype, comp) -> None:
        self.comp_kind = comp
        self.hi = value.to(avg_dtype)
        self.lo = None
        if comp == "int16":
            self.lo = self._quantize(value - self.hi.double())
        elif comp is not None:
            self.lo = (value - self.hi.double()).to(comp)

    def _ulp(self) -> torch.Tensor:
        _, exponent = torch.frexp(self.hi.double())
        return torch.ldexp(torch.ones_like(self.hi, dtype=F64), exponent - 24)

    def _quantize(self, rest: torch.Tensor) -> torch.Tensor:
        q = torch.round(rest / self._ulp() * 2.0**15)
        return q.clamp(-(2**15), 2**15 - 1).to(torch.int16)

    def value(self) -> torch.Tensor:
        if self.comp_kind == "int16":
            return self.hi.double() + self.lo.double() * self._ulp() * 2.0**-15
        return self.hi.double() + (0.0 if self.lo is None else self.lo.double())

    def update(self, src: torch.Tensor, w: float) -> None:
        if self.comp_kind == "int16":  # float64 arithmetic, storage rounded as a kernel would
            e = self.value()
            e = e + w * (src.double() - e)
            self.hi = e.to(F32)
            self.lo = self._quantize(e - self.hi.double())
        elif self.lo is None:
            lerp_([self.hi], [src], w)
        else:
            lerp_([self.hi], [src], w, [self.lo])


def frozen_reading(h: float, storage, segments: int, target: float) -> float:
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
        state.update(src, w)
    exact_seg = xd - (xd - start_stored) * math.exp(m * log_s)
    err = (state.value() - exact_seg) * torch.exp((segments - 1 - j) * m * log_s)
    exact = xd - (xd - 1.0) * math.exp(steps * log_s)
    return exact + float(err.sum())


def frozen_table(half_lives, quick: bool) -> None:
    target = 1.001
    exact_moved = (float(torch.tensor(target, dtype=F32)) - 1.0) / 2
    print("\n## Frozen weight: 1.0 -> 1.001, reading after one half-life (should be 1.0005)\n")
    cols = []
    for h in half_lives:
        if h <= (1e4 if quick else 1e5):
            cols.append((h, "full", 1))
        cols.append((h, "segments", 100 if h <= 1e4 else 1000))
    head = " | ".join(f"h={h:.0e} {how}" for h, how, _ in cols)
    print(f"| storage | bytes/elem | {head} |")
    print("|---|---|" + "---|" * len(cols))
    for name, storage in STORAGES.items():
        cells = []
        for h, _, k in cols:
            t0 = time.perf_counter()
            reading = frozen_reading(h, storage, k, target)
            rel = abs(reading - (1.0 + exact_moved)) / exact_moved
            cells.append(f"{reading:.7f} ({rel:.1e})")
            del t0
        print(f"| {name} | {nbytes(*storage)} | " + " | ".join(cells) + " |", flush=True)
    print(
        "\nCells: reading (|reading - exact| / 0.0005). 'full' runs h real updates; "
        "'segments' K = 100 (h=1e4) or 1000 independent elements of h/K updates each."
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


def cost_table(n: int, reps: int) -> None:
    """Each repeat times a copy of 4n bytes and then the kernel, back to back (the machine's
    load hits both alike); a cell is the median over repeats of kernel time / floor time,
    floor time = (bytes the kernel must move) / (bandwidth of that copy)."""
    big = torch.randn(n)
    other = torch.empty_like(big)
    print(f"\n## Cost: {n / 1e6:.0f}M elements, one update vs the copy-bandwidth floor\n")
    fused_ok = compilation_available("cpu")
    print("| model | storage | kernel | bytes moved/elem | time (median) | x floor |")
    print("|---|---|---|---|---|---|")
    w = 1e-4
    bws = []
    for model_dtype in (F32, BF16):
        src = [torch.randn(n).to(model_dtype)]
        for name in ("fp32 (plain)", "fp32 + fp32 comp", "fp32 + bf16 comp"):
            avg_dtype, comp_dtype = STORAGES[name]
            avg = [src[0].to(avg_dtype)]
            comp = None if comp_dtype is None else [torch.zeros(n, dtype=comp_dtype)]
            moved = model_dtype.itemsize + 2 * nbytes(avg_dtype, comp_dtype)
            kernels = {"eager lerp_": lambda a=avg, c=comp, s=src: lerp_(a, s, w, c)}
            if fused_ok:
                fused = FusedLerp()
                kernels["fused (compiled)"] = lambda a=avg, c=comp, f=fused, s=src: f(a, s, w, c)
            for kname, fn in kernels.items():
                mdt = str(model_dtype)[6:]
                try:
                    fn()  # warm-up (and compile)
                    ratios, times = [], []
                    for _ in range(reps):
                        t_copy = _timed(lambda: other.copy_(big))
                        t = _timed(fn)
                        bw = 2 * 4 * n / t_copy
                        bws.append(bw)
                        ratios.append(t / (moved * n / bw))
                        times.append(t)
                    cell = f"{statistics.median(times) * 1e3:.2f} ms | "
                    cell += f"{statistics.median(ratios):.2f}x"
                except Exception as e:  # a compile failure is reported, not fatal
                    cell = f"error: {type(e).__name__}: {e} | -"
                print(f"| {mdt} | {name} | {kname} | {moved} | {cell} |", flush=True)
    print(f"\nCopy bandwidth (median): {statistics.median(bws) / 1e9:.1f} GB/s")
    if not fused_ok:
        print("(no C++ compiler for inductor here: fused rows skipped)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument(
        "--only", choices=("frozen", "walk", "cost"), default=None, help="one table only"
    )
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    half_lives = (1e4, 1e5) if args.quick else (1e4, 1e5, 1e6, 1e7)
    if args.only in (None, "frozen"):
        frozen_table(half_lives, args.quick)
    if args.only in (None, "walk"):
        random_walk_table(1000 if args.quick else 10_000, 100 if args.quick else 1000, 1e5)
    if args.only in (None, "cost"):
        cost_table(1 << (18 if args.quick else 23), 3 if args.quick else 9)


if __name__ == "__main__":
    main()
