"""EMA memory and time per update under FSDP1 (``FullyShardedDataParallel``, ``use_orig_params``
False and True) beside FSDP2 (``fully_shard``), for 1 and 2 ranks.

    python benchmarks/fsdp1.py [--worlds 1 2] [--width 1024] [--depth 12] [--steps 20]

Launches each (mode, world) as ``world`` local processes (gloo, CPU), every Linear its own
unit plus the root, and prints a Markdown table. Per rank: ``EMA MiB``, what the average
and its compensation hold (``ema.nbytes()``); ``RSS growth``, the resident
memory before and after building the EMA and two updates; ``ms per ema.step()``, the median
over ``--steps`` training steps of the time ``ema.step()`` takes after ``opt.step()`` (the
EMA's whole cost per step: the staleness check, and under ``use_orig_params=True`` the
re-reading of the model that FSDP's re-registration of the original parameters in every
forward pass causes, plus the update). The numbers are the largest over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

MODES = ("fsdp2", "fsdp1", "fsdp1-orig")


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _wrap(mode: str, model):
    import torch
    from torch import nn

    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"),
                                    use_orig_params=mode == "fsdp1-orig",
                                    auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))


def worker(mode: str, width: int, depth: int, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import emakit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    model = _wrap(mode, nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step() -> None:
        opt.zero_grad()
        model(torch.randn(4, width)).square().mean().backward()
        opt.step()

    train_step()
    before = _rss()
    ema = emakit.EMA(model, half_life="100ba")
    ema.update()
    ema.update()
    grown = _rss() - before
    times = []
    for _ in range(steps):
        train_step()
        t0 = time.perf_counter()
        ema.step()
        times.append(time.perf_counter() - t0)
    report = {"rank": dist.get_rank(), "ema_bytes": ema.nbytes(), "rss": grown,
              "params": depth * (width * width + width),
              "ms": 1e3 * statistics.median(times)}
    print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, world: int, width: int, depth: int, steps: int) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, __file__, "--worker", mode, "--width", str(width),
           "--depth", str(depth), "--steps", str(steps)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"{mode} on {world} ranks failed:\n{stderr[-3000:]}")
        out += [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.width, args.depth, args.steps)
        return
    mib = 2**20
    rows = []
    for mode in args.modes:
        for world in args.worlds:
            res = launch(mode, world, args.width, args.depth, args.steps)
            rows.append((mode, world, max(r["ema_bytes"] for r in res) / mib,
                         max(r["rss"] for r in res) / mib, max(r["ms"] for r in res),
                         res[0]["params"]))
    n = rows[0][5]
    print(f"Model: {args.depth} x Linear({args.width}, {args.width}), {n:,} parameters, "
          f"{4 * n / mib:.1f} MiB in fp32; EMA in fp32, compensated (the default).\n")
    print("| mode | ranks | EMA MiB per rank | RSS growth MiB per rank | ms per ema.step() |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, world, ema_mib, rss_mib, ms, _ in rows:
        print(f"| {mode} | {world} | {ema_mib:.1f} | {rss_mib:.1f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
