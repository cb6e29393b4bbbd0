"""Post-hoc EMA reconstruction error on a random walk.

A Linear(64, 64) whose weights take a Gaussian random-walk step every batch is tracked by a
PostHocEMA (sigma_rel 0.05 and 0.10, snapshots every ``every`` batches) and, beside it, by a
PostHocEMA that tracks each target sigma_rel directly. Reported per target:

- profile: relative L2 error of the synthesized profile (from the solve, float64);
- |d|/|direct|: ||synthesized - direct|| / ||direct||;
- |d|/|direct-raw|: ||synthesized - direct|| / ||direct - raw weights||, i.e. relative to
  how far the average sits from the current weights (the stricter measure).

Run: python benchmarks/posthoc_reconstruction.py
"""

from __future__ import annotations

import tempfile

import torch

import emakit
from emakit.posthoc import plan_synthesis

TARGETS = (0.02, 0.03, 0.05, 0.075, 0.10, 0.15, 0.20, 0.25)


def flat(sd: dict) -> torch.Tensor:
    return torch.cat([sd[k].double().flatten() for k in ("weight", "bias")])


def run(steps: int, every: int, dtype: torch.dtype, interval: int = 1) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    with tempfile.TemporaryDirectory() as d:
        ph = emakit.PostHocEMA(model, snapshot_every=f"{every}ba", snapshot_dir=d,
                               snapshot_dtype=dtype, update_interval=f"{interval}ba")
        direct = emakit.PostHocEMA(model, sigma_rels=TARGETS, snapshot_every=None,
                                   update_interval=f"{interval}ba")
        for _ in range(steps):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            ph.step()
            direct.step()
        raw = flat(model.state_dict())
        plan = plan_synthesis(d, TARGETS, max_error=None)
        outs = emakit.synthesize(d, sigma_rel=list(TARGETS), max_error=None)
        n = len(plan.snapshots)
        name = str(dtype).removeprefix("torch.")
        for s, out, err in zip(TARGETS, outs, plan.errors, strict=True):
            ref = flat(direct.ema_state_dict(s))
            diff = (flat(out) - ref).norm()
            print(f"| {steps} | {every} | {interval} | {n} | {name} | {s:g} | {float(err):.2e} "
                  f"| {float(diff / ref.norm()):.2e} | {float(diff / (ref - raw).norm()):.2e} |")


def main() -> None:
    torch.set_num_threads(1)
    print("| steps | snapshot every | update interval | snapshots | dtype | sigma_rel "
          "| profile | abs(d)/abs(direct) | abs(d)/abs(direct-raw) |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for every, dtype, interval in ((50, torch.float32, 1), (50, torch.float16, 1),
                                   (20, torch.float32, 1), (100, torch.float32, 1),
                                   (60, torch.float32, 3)):
        run(1200 if interval == 3 else 1000, every, dtype, interval)


if __name__ == "__main__":
    main()
