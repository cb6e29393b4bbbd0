"""EMA memory per rank under FSDP2, DDP (whole or ``shard=True``) and DeepSpeed ZeRO-3, for
1, 2 and 4 ranks.

    python benchmarks/distributed_memory.py [--worlds 1 2 4] [--width 1024] [--depth 12]
        [--modes fsdp2 ddp ddp-shard zero3]

``zero3`` (needs ``pip install emakit[deepspeed]``; runs on the CPU accelerator here) trains
under ZeRO stage 3 with ``stage3_param_persistence_threshold`` 0, so every parameter is
partitioned, and builds the EMA after ``deepspeed.initialize``.

Launches each (mode, world) as ``world`` local processes (gloo, CPU) and prints a Markdown
table. Per rank: ``EMA bytes``, what the average holds on that rank (its flat buffers), and
``RSS growth``, the process's resident memory measured before and after building the EMA
(``/proc/self/status`` VmRSS; the average's pages are touched when it is first filled).
The numbers are the largest over ranks.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import socket
import subprocess
import sys

MODES = ("fsdp2", "ddp", "ddp-shard", "zero3")


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(mode: str, width: int, depth: int) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    import emakit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    if mode == "zero3":
        _zero3(model, width)
        return
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.zero_grad()
    model(torch.randn(4, width)).square().mean().backward()
    opt.step()
    before = _rss()
    ema = emakit.EMA(model, half_life="100ba", shard=mode == "ddp-shard")
    ema.update()
    ema.update()
    grown = _rss() - before
    n = sum(p.numel() for p in model.parameters())
    report = {"rank": dist.get_rank(), "ema_bytes": ema.nbytes(),
              "rss": grown, "params": n}
    print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def _zero3(model, width: int) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    import emakit

    world = dist.get_world_size()
    config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "steps_per_print": 10**9}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    loss = engine(torch.randn(4, width)).square().mean()
    engine.backward(loss)
    engine.step()
    before = _rss()
    ema = emakit.EMA(engine.module, half_life="100ba")
    ema.update()
    ema.update()
    grown = _rss() - before
    n = sum(p.ds_numel for p in engine.module.parameters())
    report = {"rank": dist.get_rank(), "ema_bytes": ema.nbytes(),
              "rss": grown, "params": n, "world": world}
    print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, world: int, width: int, depth: int) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, __file__, "--worker", mode, "--width", str(width),
           "--depth", str(depth)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"{mode} on {world} ranks failed:\n{stderr[-3000:]}")
        out += [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.width, args.depth)
        return
    mib = 2**20
    rows = []
    modes = list(args.modes)
    if "zero3" in modes and importlib.util.find_spec("deepspeed") is None:
        print("(zero3 left out: DeepSpeed is not installed; pip install emakit[deepspeed])\n")
        modes.remove("zero3")
    for mode in modes:
        for world in args.worlds:
            res = launch(mode, world, args.width, args.depth)
            rows.append((mode, world, max(r["ema_bytes"] for r in res) / mib,
                         max(r["rss"] for r in res) / mib, res[0]["params"]))
    n = rows[0][4]
    print(f"Model: {args.depth} x Linear({args.width}, {args.width}), {n:,} parameters, "
          f"{4 * n / mib:.1f} MiB in fp32; EMA in fp32.\n")
    print("| mode | ranks | EMA MiB per rank | RSS growth MiB per rank |")
    print("| --- | ---: | ---: | ---: |")
    for mode, world, ema_mib, rss_mib, _ in rows:
        print(f"| {mode} | {world} | {ema_mib:.1f} | {rss_mib:.1f} |")


if __name__ == "__main__":
    main()
