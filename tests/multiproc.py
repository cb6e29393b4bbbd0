"""Launch a worker script as ``world`` local gloo processes and collect what rank 0 wrote.

Used by the mesh and DeepSpeed tests: each worker reads RANK, WORLD_SIZE and MASTER_* from
the environment (as ``torchrun`` sets them), writes ``OUTDIR/<scenario>.pt`` on rank 0, and
turns a failed per-rank check into a non-zero exit. A rank that fails or hangs fails the
test with its log, never hangs the suite.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HALF_LIFE = "4ba"  # one update per batch: s = 2 ** (-1 / 4)
SMOOTHING = 2.0 ** (-1.0 / 4.0)
TOL = 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, scenario: str, out: Path, world: int, *args: str,
              timeout: float = 180.0, env: dict[str, str] | None = None) -> None:
    """Run ``world`` ranks of ``worker SCENARIO OUT ARGS...`` to completion; a rank that
    fails or hangs fails the test with its log."""
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1",
                **(env or {}))
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), scenario, str(out), *args],
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{scenario} on {world} processes timed out after {timeout} s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} of {scenario} failed:\n{logs[r][-6000:]}"


def launch(worker: Path, scenario: str, out: Path, world: int, *args: str,
           timeout: float = 180.0, env: dict[str, str] | None = None,
           result: str | None = None) -> dict:
    """:func:`run_ranks`, then what rank 0 wrote to ``OUT/<result>.pt`` (``result``
    defaults to the scenario)."""
    run_ranks(worker, scenario, out, world, *args, timeout=timeout, env=env)
    return torch.load(out / f"{result or scenario}.pt", weights_only=True)


def expected_outputs(want: dict[str, torch.Tensor], trained_state: dict[str, torch.Tensor],
                     make_model, eval_input) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs on ``eval_input()`` of a fresh model holding the averaged weights
    ``want`` and of one holding the trained weights ``trained_state``."""
    avg_model = make_model()
    avg_model.load_state_dict({k: v.float() for k, v in want.items()})
    trained = make_model()
    trained.load_state_dict(trained_state)
    with torch.no_grad():
        return avg_model(eval_input()), trained(eval_input())


def replay(weights: list[dict[str, torch.Tensor]], averaged: set[str],
           smoothing: float = SMOOTHING) -> dict[str, torch.Tensor]:
    """The float64 EMA of a sequence of full state dicts (one per update), computed here
    in one process: ``avg_1 = w_1, avg_k = s * avg_{k-1} + (1 - s) * w_k`` for the names in
    ``averaged``; every other name takes its last value (frozen tensors are not averaged)."""
    avg: dict[str, torch.Tensor] = {}
    for k, state in enumerate(weights):
        for name, w in state.items():
            w64 = w.double()
            if k == 0 or name not in averaged:
                avg[name] = w64.clone()
            else:
                avg[name] = smoothing * avg[name] + (1 - smoothing) * w64
    return avg


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                 tol: float = TOL) -> None:
    """Same names, same shapes, and every element within ``tol``."""
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        err = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        assert err <= tol, f"{name}: off by {err}"
