"""ZeRO-3 in bf16: the EMA of the bf16 partitions against the EMA of the fp32 master partitions.

    python benchmarks/zero3_master.py [--world 2] [--steps 60] [--half-life 20] [--lr 1e-3]

Trains an MLP under DeepSpeed ZeRO-3 with ``"bf16": {"enabled": true}`` (CPU accelerator,
gloo, ``world`` local processes). Two stores average the same run, differing only in their
source (:class:`emakit.zero.ZeroPartition`): ``param``, the bf16 partition the forward pass
uses, and ``master``, DeepSpeed's fp32 master partition. Both keep an fp32 average. The
reference is the float64 EMA of the fp32 master weights (each rank's master partition,
``deepspeed.utils.safe_get_local_fp32_param``, averaged in float64 and put together at the
end). Printed: the error of each average against it, relative to the RMS of the reference
average, and each average's RMS distance from the reference in units of a bf16 rounding
step of the weights.

Runs are kept short: with DeepSpeed 0.19.8 in bf16 on its CPU accelerator (gloo), the
training itself hangs in ZeRO-3's forward all-gather after 100-200 steps on this machine,
with or without an EMA (the same script with the stores removed hangs alike).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys


def worker(steps: int, half_life: float, lr: float) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param
    from torch import nn

    from emakit.store import Store
    from emakit.zero import ZeroPartition

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.Tanh(), nn.Linear(512, 64))
    config = {"train_micro_batch_size_per_gpu": 16, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": True}, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    names = [n for n, _ in engine.module.named_parameters()]
    s = 2.0 ** (-1.0 / half_life)
    teacher = nn.Linear(64, 64)
    stores: dict = {}
    ref: dict = {}
    for step in range(steps):
        g = torch.Generator().manual_seed(step * world + rank)
        x = torch.randn(16, 64, generator=g)
        with torch.no_grad():
            y = torch.sin(teacher(x)) + 0.1 * torch.randn(16, 64, generator=g)
        loss = nn.functional.mse_loss(engine(x.bfloat16()).float(), y)
        engine.backward(loss)
        engine.step()
        if step == 0:
            for source in ("param", "master"):
                stores[source] = Store(engine.module, placement=ZeroPartition(source=source))
        else:
            for store in stores.values():
                store.update(1.0 - s)
        for n, p in engine.module.named_parameters():  # this rank's partition, padding cut
            start = rank * p.ds_tensor.numel()
            keep = max(0, min(p.ds_tensor.numel(), p.ds_numel - start))
            master = safe_get_local_fp32_param(p)[:keep].double()
            ref[n] = master.clone() if step == 0 else s * ref[n] + (1 - s) * master
    # the reference's partitions, put together (a Python object gather: once, at the end)
    parts: list = [None] * world
    dist.all_gather_object(parts, ref)
    shapes = {n: p.ds_shape for n, p in engine.module.named_parameters()}
    ref = {n: torch.cat([part[n] for part in parts]).view(shapes[n]) for n in names}
    report = {}
    rms_ref = torch.cat([ref[n].flatten() for n in names]).square().mean().sqrt().item()
    # a bf16 rounding step of a weight of the reference's RMS size: 2 ** (e - 7)
    ulp = 2.0 ** (torch.tensor(rms_ref).log2().floor().item() - 7)
    for source, store in stores.items():
        avg = store.tensors()
        diff = torch.cat([(avg[n].double() - ref[n]).flatten() for n in names])
        report[source] = {"max": diff.abs().max().item() / rms_ref,
                          "rms": diff.square().mean().sqrt().item() / rms_ref,
                          "rms_ulp": diff.square().mean().sqrt().item() / ulp,
                          "bytes": store.state_nbytes()}
    if rank == 0:
        print("RESULT " + json.dumps(report), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--half-life", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.half_life, args.lr)
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               WORLD_SIZE=str(args.world), LOCAL_WORLD_SIZE=str(args.world))
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--half-life",
           str(args.half_life), "--lr", str(args.lr)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(args.world)]
    report = None
    outputs = [p.communicate(timeout=3600) for p in procs]
    failed = [f"rank {r}:\n{err[-3000:]}" for r, (p, (_, err)) in
              enumerate(zip(procs, outputs, strict=True)) if p.returncode]
    if failed:
        raise RuntimeError("\n".join(failed))
    for out, _ in outputs:
        for line in out.splitlines():
            if line.startswith("RESULT "):
                report = json.loads(line[7:])
    print(f"ZeRO-3, bf16, {args.world} ranks, {args.steps} SGD steps (lr {args.lr}), "
          f"half-life {args.half_life:g} steps; error against the float64 EMA of the fp32 "
          "master weights, relative to the reference's RMS.\n")
    print("| source | max error | RMS error | RMS error in bf16 steps | EMA bytes on rank 0 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for source, r in report.items():
        print(f"| {source} | {r['max']:.2e} | {r['rms']:.2e} | {r['rms_ulp']:.3f} | "
              f"{r['bytes']} |")


if __name__ == "__main__":
    main()
