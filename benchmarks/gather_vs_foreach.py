"""Without flat parameters, is gathering the sources worth it? For groups of equal tensors,
times ``torch._foreach_lerp_`` over the tensors against ``torch.cat(sources, out=staging)``
followed by one ``lerp_`` on the flat average, and one ``lerp_`` alone (the floor).

    python benchmarks/gather_vs_foreach.py
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import setup_threads, table


def bench(fn, n: int = 21) -> float:
    fn()
    ts = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def measure(size: int, count: int) -> tuple[float, float, float]:
    sources = [torch.randn(size) for _ in range(count)]
    averages = [s.clone() for s in sources]
    n = size * count
    flat, other, staging = torch.randn(n), torch.randn(n), torch.empty(n)

    def gather():
        torch.cat(sources, out=staging)
        flat.lerp_(staging, 0.01)

    return (
        bench(lambda: flat.lerp_(other, 0.01)),
        bench(lambda: torch._foreach_lerp_(averages, sources, 0.01)),
        bench(gather),
    )


def main() -> None:
    setup_threads()
    rows = []
    for size, count in ((32, 2000), (1024, 1000), (4096, 300), (16384, 100), (65536, 40),
                        (262144, 10)):
        floor, foreach, gathered = measure(size, count)
        rows.append([f"{count} x {size}", f"{floor * 1e3:.3f}",
                     f"{foreach * 1e3:.3f} ({foreach / floor:.1f}x)",
                     f"{gathered * 1e3:.3f} ({gathered / floor:.1f}x)"])
    print(table(["tensors", "floor ms", "_foreach_lerp_ ms", "cat + lerp_ ms"], rows))


if __name__ == "__main__":
    main()
