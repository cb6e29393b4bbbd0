"""What checksums and crash safety cost: emakit's file writers and readers against the plain
ones they wrap, side by side in one run, on the EMA state of ResNet-50 (25.6M parameters;
the fp32 average and its compensation, 205 MB).

- ``distributed.save`` (fresh data folder, read-back checksums, pointer switch) against
  ``torch.distributed.checkpoint.save`` into a folder; ``distributed.load`` (every checksum
  verified, restricted unpickling) against ``torch.distributed.checkpoint.load``;
- ``write_state`` / ``read_state`` (sealed safetensors) against ``torch.save`` /
  ``torch.load(weights_only=True)``.

One process, no process group, files on the same disk; the median of 5 runs each, files
removed between runs (the page cache stays warm, as it would right after a save), the
plain and emakit runs alternated.

    python benchmarks/checkpoint_cost.py
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from _common import ResNet50, machine, median, setup_threads, table, timed

import emakit
from emakit import checkpoint
from emakit.checkpoint import read_state, write_state

RUNS = 5


def state_mb(sd: dict) -> float:
    def walk(v):
        if isinstance(v, torch.Tensor):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        return 0

    return walk(sd) / 1e6


def main() -> None:
    warnings.simplefilter("ignore")
    setup_threads()
    torch.manual_seed(0)
    model = ResNet50()
    ema = emakit.EMA(model, half_life="100ba")
    ema.step()
    sd = ema.state_dict()
    root = Path(tempfile.mkdtemp())

    def fresh(name: str) -> Path:
        path = root / name
        shutil.rmtree(path, ignore_errors=True)
        if path.is_file():
            path.unlink()
        return path

    def dcp_save() -> None:
        dcp.save({"ema": sd}, storage_writer=dcp.FileSystemWriter(str(fresh("raw"))))

    def emakit_save() -> None:
        checkpoint.save(ema, fresh("ck"))

    dcp_save()
    emakit_save()
    target = {"ema": ema.state_dict()}

    def dcp_load() -> None:
        dcp.load(target, storage_reader=dcp.FileSystemReader(str(root / "raw")))

    def emakit_load() -> None:
        checkpoint.load(ema, root / "ck")

    def torch_save() -> None:
        torch.save(sd, fresh("s.pt"))

    def state_save() -> None:
        write_state(sd, fresh("s.safetensors"))

    torch_save()
    state_save()

    def torch_load() -> None:
        torch.load(root / "s.pt", weights_only=True)

    def state_load() -> None:
        read_state(root / "s.safetensors")

    pairs = [
        ("checkpoint save", "dcp.save", dcp_save, "distributed.save", emakit_save),
        ("checkpoint load", "dcp.load", dcp_load, "distributed.load", emakit_load),
        ("state file write", "torch.save", torch_save, "write_state", state_save),
        ("state file read", "torch.load", torch_load, "read_state", state_load),
    ]
    rows = []
    for what, base_name, base, ours_name, ours in pairs:
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(RUNS):  # alternated, so drift in the machine's load hits both
            times[0].append(timed(base))
            times[1].append(timed(ours))
        b, o = median(times[0]), median(times[1])
        rows.append([what, f"{base_name} {b * 1e3:.0f} ms", f"{ours_name} {o * 1e3:.0f} ms",
                     f"{o / b:.2f}"])
    shutil.rmtree(root, ignore_errors=True)
    print(f"{machine()}; EMA state {state_mb(sd):.0f} MB")
    print(table(["operation", "plain", "emakit", "ratio"], rows))


if __name__ == "__main__":
    main()
