"""One EMA update on a GPU for four model shapes: emakit's kernels, emakit.EMA and the
peers, each against the physical floor (bytes the update must move / measured copy
bandwidth).

    python benchmarks/gpu.py                  # CUDA, all rows (~3 min on an H100)
    python benchmarks/gpu.py --quick          # fewer repeats, a smaller GPT
    python benchmarks/gpu.py --device cpu --quick   # smoke test of every code path

Models (random weights, no downloads): ResNet-50 (fp32, 25.6M in 267 averaged tensors with
the BatchNorm statistics), a BERT-base-sized encoder (fp32, 108.5M in 145 tensors), a GPT of
24 layers, d=2048 (bf16 weights, fp32 average, 1.3B in 292 tensors; --quick: 4 layers) and
1000 x Linear(32, 32) (2000 tensors).

Floor: 12 bytes per element for an fp32 model (read model, read and write the average), 10
for a bf16 model with an fp32 average; rows with a compensation also move it (+8 for fp32):
"x floor" is against the plain floor, "x own" against the row's own bytes. Peers keep the
average in the model's dtype (bf16 for the GPT): they move fewer bytes than an fp32 average.

Times: CUDA events around each update, the device drained before each (so host-bound
updates show their host time), median of N. Every row runs in its own try/except: a peer
that is missing or fails prints its error and the table goes on.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import (  # noqa: E402
    DECAY,
    Encoder,
    ResNet50,
    diffusers_update,
    ema_pytorch_update,
    many_linear,
    timm_update,
    torch_update,
)

import emakit  # noqa: E402
from emakit._engine.kernels import CUDAGraphUpdate, FusedLerp, compilation_available, lerp_  # noqa: E402
from emakit._engine.store import Store  # noqa: E402
from emakit.config import StoreConfig  # noqa: E402


def _store(model, **storage):
    """A bare store of the private engine (benchmarks measure it apart from any face)."""
    storage.setdefault("compensated", False)
    return Store(model, StoreConfig(**storage))


W = 1.0 - DECAY
FUSED = FusedLerp()  # tensors under 64Ki elements go to the eager foreach path


class GPT(nn.Module):
    """GPT-2 layout: token and position embeddings, per layer 12 tensors (two LayerNorms,
    qkv, attention output, MLP in and out, with biases), a final LayerNorm."""

    def __init__(self, layers: int = 24, d: int = 2048, vocab: int = 50304, ctx: int = 2048):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.h = nn.ModuleList()
        for _ in range(layers):
            block = nn.Module()
            block.ln_1 = nn.LayerNorm(d)
            block.attn = nn.Linear(d, 3 * d)
            block.proj = nn.Linear(d, d)
            block.ln_2 = nn.LayerNorm(d)
            block.fc = nn.Linear(d, 4 * d)
            block.out = nn.Linear(4 * d, d)
            self.h.append(block)
        self.ln_f = nn.LayerNorm(d)


def build_models(quick: bool, small: bool) -> dict[str, Callable[[], nn.Module]]:
    """``small``: shrunken shapes (same tensor counts) for a CPU smoke test."""
    layers = 4 if quick else 24
    return {
        "ResNet-50 fp32": ResNet50,
        "encoder fp32": (lambda: Encoder(vocab=1000, d=192)) if small else Encoder,
        "GPT bf16 (fp32 avg)": lambda: GPT(
            layers=layers, **(dict(d=128, vocab=1000, ctx=128) if small else {})
        ).to(torch.bfloat16),
        "1000 x Linear(32,32)": many_linear,
    }


def averaged(model: nn.Module) -> list[torch.Tensor]:
    """Trainable parameters and floating buffers, as an EMA averages them."""
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            out.append(t.detach())
    return out


# timing ------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    def __call__(self, fn: Callable[[], object], warmup: int = 2) -> float:
        """Median seconds of one ``fn()``."""
        cuda = self.device.type == "cuda"
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if cuda:
                torch.cuda.synchronize(self.device)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), warmup=3)
    return 2 * nbytes / t


# contestants: each returns (update, bytes per element it must move, note) ------------------


def ours(kind: str, fused_ok: bool, device: torch.device):
    def setup(model: nn.Module):
        src = averaged(model)
        avg = [t.float().clone() for t in src]
        comp = [torch.zeros_like(a) for a in avg] if "comp" in kind else None
        bpe = src[0].element_size() + 8 + (8 if comp is not None else 0)
        if "fused" in kind:
            if not fused_ok:
                raise RuntimeError("torch.compile (inductor) is unavailable here")
            kernel = FUSED  # one instance: one compile per dtype combination, for every row
        else:
            kernel = lerp_
        if kind.startswith("CUDA graph"):
            if device.type != "cuda":
                raise RuntimeError("needs CUDA")
            if "baked" in kind:  # the weight is a constant in the graph
                graph = CUDAGraphUpdate(lambda _w: kernel(avg, src, W, comp), device)
            else:
                graph = CUDAGraphUpdate(lambda w: kernel(avg, src, w, comp), device)
            return (lambda: graph(W)), bpe
        return (lambda: kernel(avg, src, W, comp)), bpe

    return setup


def emakit_ema(**kwargs):
    def setup(model: nn.Module):
        ema = emakit.EMA(model, smoothing=DECAY, **kwargs)
        ema.update()  # starts the average
        comp = ema.config.compensated
        bpe = averaged(model)[0].element_size() + 8 + (8 if comp else 0)
        return ema.update, bpe

    return setup


def emakit_store(executor: str, compensated: bool):
    """The engine with one executor (emakit.EMA picks "auto": graph on CUDA, eager on CPU)."""

    def setup(model: nn.Module):
        store = _store(model, executor=executor, compensated=compensated)
        store.update(W)  # compiles and captures outside the timing
        bpe = averaged(model)[0].element_size() + 8 + (8 if compensated else 0)
        return (lambda: store.update(W)), bpe

    return setup


def peer(fn):
    def setup(model: nn.Module):
        update, _ = fn(model)
        return update, averaged(model)[0].element_size() * 3

    return setup


def torch_ema_update(model: nn.Module):
    from torch_ema import ExponentialMovingAverage

    params = [p for p in model.parameters() if p.requires_grad]
    ema = ExponentialMovingAverage(params, decay=DECAY)
    return (lambda: ema.update(params)), None


def contestants(fused_ok: bool, device: torch.device) -> dict[str, Callable]:
    rows = {
        "lerp_ eager": ours("eager", fused_ok, device),
        "lerp_ eager + comp": ours("eager comp", fused_ok, device),
        "FusedLerp": ours("fused", fused_ok, device),
        "FusedLerp + comp": ours("fused comp", fused_ok, device),
        "CUDA graph: lerp_ (w baked)": ours("CUDA graph baked", fused_ok, device),
        "CUDA graph: lerp_ (w tensor)": ours("CUDA graph", fused_ok, device),
        "CUDA graph: lerp_ + comp": ours("CUDA graph comp", fused_ok, device),
        "CUDA graph: FusedLerp": ours("CUDA graph fused", fused_ok, device),
        "CUDA graph: FusedLerp + comp": ours("CUDA graph fused comp", fused_ok, device),
        "emakit.EMA (default: compensated, executor auto)": emakit_ema(),
        "emakit.EMA compensated=False": emakit_ema(compensated=False),
        **{
            f"Store executor={ex}{' + comp' if comp else ''}": emakit_store(ex, comp)
            for ex in ("eager", "fused", "graph")
            for comp in (False, True)
        },
        "timm ModelEmaV3": peer(timm_update),
        "torch AveragedModel": peer(torch_update),
        "ema-pytorch": peer(ema_pytorch_update),
        "diffusers EMAModel": peer(diffusers_update),
        "torch_ema": peer(torch_ema_update),
    }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller GPT")
    parser.add_argument("--reps", type=int, default=None, help="timed updates per row")
    parser.add_argument("--models", nargs="*", default=None, help="subset of model names")
    parser.add_argument("--rows", nargs="*", default=None, help="subset of row names")
    parser.add_argument("--traceback", action="store_true", help="print errors in full")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu")
    if device.type == "cpu":  # see docs/performance.md, "Threads"
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    reps = args.reps or (5 if args.quick else 20)
    timer = Timer(device, reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {reps} timed updates per row (median)")
    bw = copy_bandwidth(device, timer, (1 << 28) if args.quick else (1 << 30))
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s (read + write)\n")
    fused_ok = compilation_available(device)
    rows = contestants(fused_ok, device)
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows}
    models = build_models(args.quick, small=device.type == "cpu")
    if args.models:
        models = {k: v for k, v in models.items() if k in args.models}
    summary = []
    for mname, build in models.items():
        t0 = time.perf_counter()
        try:
            with torch.device(device):  # initialized where it lives: fast for the 1.3B GPT
                model = build()
        except Exception as e:
            print(f"## {mname}: could not be built: {type(e).__name__}: {e}\n", flush=True)
            continue
        tensors = averaged(model)
        numel = sum(t.numel() for t in tensors)
        floor_bpe = tensors[0].element_size() + 8
        floor = floor_bpe * numel / bw
        print(
            f"## {mname}: {numel / 1e6:.1f}M in {len(tensors)} tensors, floor {floor * 1e3:.3f} ms"
        )
        print("| row | ms | x floor | x own bytes |")
        print("|---|---|---|---|")
        for rname, setup in rows.items():
            try:
                update, bpe = setup(model)
                t = timer(update, warmup=3)
                own = bpe * numel / bw
                print(
                    f"| {rname} | {t * 1e3:.3f} | {t / floor:.2f}x | {t / own:.2f}x |", flush=True
                )
                summary.append((mname, rname, t, t / floor))
            except Exception as e:
                msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:150]
                print(f"| {rname} | error: {msg} |  |  |", flush=True)
                if args.traceback:
                    traceback.print_exc()
            finally:
                update = setup = None  # noqa: F841 (free the row's copies)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del model, tensors
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"({time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
