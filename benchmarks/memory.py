"""Bytes of EMA state per averaged element, for fp32 and bf16 models and each option.

Measured from the store's own buffers on ResNet-50 (parameters and BatchNorm statistics)
and 1000 x Linear(32, 32): ``state`` is the flat average and its compensation (padding
included; the default ``compensated=True`` holds both), ``workspace``
the staging buffers an update uses. Rows for a CUDA model are measured where a GPU is
present and computed from the same rules otherwise (marked "rule").

    python benchmarks/memory.py
"""

from __future__ import annotations

import copy

import torch
from _common import ResNet50, averaged_numel, many_linear, table

import emakit
from emakit._engine.store import Store  # noqa: E402
from emakit.config import StoreConfig  # noqa: E402


def _store(model, **storage):
    """A bare store of the private engine (benchmarks measure it apart from any face), with
    the faces' defaults (compensated)."""
    return Store(model, StoreConfig(**storage))



def row(label, model, **kw):
    model = copy.deepcopy(model)
    flatten = kw.pop("flatten", False)
    if flatten:
        emakit.flatten_parameters(model)
    sh = _store(model, **kw)
    n = averaged_numel(model)
    state = sh.state_nbytes()
    work = sh.workspace_nbytes()
    where = ", ".join(sorted({str(k[0]) for k in sh.flat}))
    return [label, f"{state / n:.3f}", f"{work / n:.3f} ({work / 2**20:.1f} MiB)", where]


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name, build in (("ResNet-50", ResNet50), ("1000 x Linear(32,32)", many_linear)):
        fp32 = build()
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        rows += [
            row(f"{name}, fp32 model, default (dtype=float32, compensated)", fp32),
            row(f"{name}, fp32 model, compensated=False", fp32, compensated=False),
            row(f"{name}, fp32 model, flatten_parameters", fp32, flatten=True),
            row(f"{name}, fp32 model, buffers='copy'", fp32, buffers="copy"),
            row(f"{name}, bf16 model, default (dtype=float32, compensated)", bf16),
            row(f"{name}, bf16 model, compensated=False", bf16, compensated=False),
            row(f"{name}, bf16 model, dtype=None (bf16 average + bf16 comp)", bf16,
                dtype=None),
            row(f"{name}, bf16 model, flatten_parameters", bf16, flatten=True),
        ]
        if torch.cuda.is_available():
            for label, m in (("fp32", fp32), ("bf16", bf16)):
                rows.append(
                    row(f"{name}, {label} CUDA model, device='cpu'", m.cuda(), device="cpu")
                )
    if not torch.cuda.is_available():
        rule = "rule"
        rows += [
            ["fp32 CUDA model, device='cpu'", "8 (host; 4 with compensated=False)",
             "4 pinned host (1 copy of the model in its dtype)", rule],
            ["bf16 CUDA model, device='cpu'", "8 (host; 4 with compensated=False)",
             "2 pinned host + conversion staging <= 4 MiB host", rule],
        ]
    print(table(["model and option", "state B/element", "workspace B/element", "device"], rows))


if __name__ == "__main__":
    main()
