"""One rank of the conformance matrix's distributed tier (gloo, CPU). Run by
``tests/test_conformance.py`` through ``tests/multiproc.py``:

    python tests/conformance_worker.py PLACEMENT OUTDIR CASES.json
    (RANK, WORLD_SIZE, MASTER_* in the environment)

Every rank runs every case of ``CASES.json`` (:func:`conformance.run`) on its part of the
placement, with the same model values (each rank computes them from the case's seed and
writes its part through torch's own API); exports, swaps and forward passes are collectives,
so every rank checks the oracle alike. Rank 0 writes ``OUTDIR/<placement>.json``: one report
per case.

Placements (one class each): ``shard`` (``shard=True`` over a replicated model), ``fsdp2``
(``fully_shard`` on every part, then the root), ``fsdp1`` and ``fsdp1-orig``
(``FullyShardedDataParallel`` with a unit per part, ``use_orig_params`` False and True).
"""

from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from conformance import Case, Harness, MatrixModel, Part, run
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

WRAPPERS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _clean(name: str) -> str:
    return ".".join(a for a in name.split(".") if a not in WRAPPERS)


class Shard(Harness):
    """``shard=True``: a replicated model, each rank keeping 1/world of the average."""

    def pickles(self) -> bool:
        return False


class FSDP2(Harness):
    def build(self, case: Case) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = MatrixModel(case)
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for part in model.parts.values():
            if list(part.parameters()):
                fully_shard(part, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def values(self, model: nn.Module) -> dict[str, Tensor]:
        out = {}
        for n, t in model.state_dict().items():
            t = t.detach()
            out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().clone()
        return out

    @torch.no_grad()
    def write(self, model: nn.Module, new: dict[str, Tensor]) -> None:
        state = model.state_dict(keep_vars=True)
        for name, value in new.items():
            t = state[name]
            if isinstance(t, DTensor):
                local = distribute_tensor(value, t.device_mesh, t.placements, src_data_rank=None)
                t._local_tensor.copy_(local.to_local())
            else:
                t.copy_(value)

    def pickles(self) -> bool:
        return False


class FSDP1(Harness):
    def __init__(self, orig: bool) -> None:
        self.orig = orig

    def build(self, case: Case) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        return FSDP(MatrixModel(case), device_id=torch.device("cpu"),
                    auto_wrap_policy=ModuleWrapPolicy({Part}), use_orig_params=self.orig)

    def values(self, model: nn.Module) -> dict[str, Tensor]:
        # FSDP1's full state dict (the default type): gathered, original names
        return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}

    @torch.no_grad()
    def write(self, model: nn.Module, new: dict[str, Tensor]) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=True):
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                value = new.get(_clean(name))
                if value is not None:
                    t.copy_(value)

    def pickles(self) -> bool:
        return False


HARNESSES = {
    "shard": Shard(),
    "fsdp2": FSDP2(),
    "fsdp1": FSDP1(orig=False),
    "fsdp1-orig": FSDP1(orig=True),
}


def main() -> None:
    placement, out, cases_file = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        cases = [Case.from_json(c) for c in json.loads(Path(cases_file).read_text())]
        results = []
        for case in cases:
            try:
                report = run(case, HARNESSES[placement])
                failures = report.failures
                errors = [[*k, v] for k, v in report.errors.items()]
                ratios = [[*k, v] for k, v in report.ratios.items()]
                checks = report.checks
            except Exception:  # every rank raises alike: the case is deterministic
                failures = [traceback.format_exc(limit=8)]
                errors, ratios, checks = [], [], 0
            results.append({"case": case.to_json(), "failures": failures, "errors": errors,
                            "ratios": ratios, "checks": checks})
        if dist.get_rank() == 0:
            Path(out, f"{placement}.json").write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The work is done and checked: leave without the interpreter's teardown, where gloo's
    # threads can abort the process ("terminate called without an active exception").
    import os as _os
    import sys as _sys

    _sys.stdout.flush()
    _sys.stderr.flush()
    _os._exit(0)
