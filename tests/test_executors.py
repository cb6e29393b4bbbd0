"""The executors (eager, fused, CUDA graph) against a float64 replay of the same updates.

The fused path compiles through inductor's CPU backend here (one compile per dtype
combination, shared by every store of the process; tensors of at least 64Ki elements take
the compiled kernel, smaller ones the eager chain), so CI covers its arithmetic. CUDA graph
tests skip without CUDA; on a CPU ``executor="graph"`` launches the operations directly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from internals import make_store, store_of
from torch import nn

import emakit
from emakit._engine import executors, views
from emakit._engine.executors import Eager, Fused, Graphed, select
from emakit._engine.kernels import compilation_available
from emakit._engine.plan import Foreach, Staged
from emakit._engine.store import Store

CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
compiles = pytest.mark.skipif(
    not compilation_available("cpu"), reason="torch.compile (inductor) cannot build CPU kernels"
)
WEIGHTS = [0.3, 0.01, 0.5, 1e-4, 0.07]


def _model(dtype: torch.dtype, device: str = "cpu", many: int = 0) -> nn.Module:
    """Linear(256, 256): its weight (65536 elements) takes the compiled kernel, the bias and
    the LayerNorm the eager chain; ``many`` extra small layers for the graph tests."""
    torch.manual_seed(1)
    layers = [nn.Linear(256, 256), nn.LayerNorm(256)] + [nn.Linear(8, 8) for _ in range(many)]
    return nn.Sequential(*layers).to(device, dtype)


class Replay:
    """A float64 replay of the average, and its path length (the sum over updates of the
    largest increment ``w * |src - avg|``), which bounds a compensated average's error:
    ``|avg + comp - exact| <= about 2**-24 * path`` (see emakit._engine.kernels)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.ref = {n: p.detach().double().clone() for n, p in self.params.items()}
        self.path = dict.fromkeys(self.ref, 0.0)

    def run(self, store: Store, weights, seed: int, scale: float = 1e-3) -> Replay:
        g = torch.Generator().manual_seed(seed)
        for w in weights:
            with torch.no_grad():
                for p in self.params.values():
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * scale
                    p.add_(noise.to(p.device, p.dtype))
            store.update(w)
            for n, p in self.params.items():
                step = (p.detach().double() - self.ref[n]) * w
                self.path[n] += step.abs().max().item()
                self.ref[n] += step
        store.synchronize()
        return self

    def check(self, store: Store) -> None:
        """avg + comp within 4 unit roundoffs of the path (an uncompensated fp32 average
        misses by about half an ulp of the average per update: 100x more here)."""
        got, comp = views.tensors(store), views.compensation(store)
        assert comp, "expected a compensated store"
        for n, r in self.ref.items():
            total = got[n].double() + comp[n].double()
            err = (total.cpu() - r.cpu()).abs().max().item()
            bound = 2**-22 * self.path[n] + 1e-15
            assert err <= bound, (n, err, self.path[n])
            # the stored average is that value rounded to fp32
            torch.testing.assert_close(got[n].double().cpu(), r.cpu(), rtol=2**-24, atol=bound)


@compiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_store_tracks_float64_without_staging(dtype):
    """One pass per tensor, converting a bf16 source inside it: no Staged op, no staging
    workspace, and average + compensation equal to the float64 replay within 1e-12."""
    model = _model(dtype)
    store = make_store(model, compensated=True, executor="fused")
    assert isinstance(store.executor, Fused) and store.workspace_nbytes() == 0
    assert all(isinstance(op, Foreach) for op in store.plan.main)
    Replay(model).run(store, WEIGHTS, seed=3).check(store)
    assert store.executor.kernel.compiled, "the fused kernel fell back to eager"


@compiles
def test_fused_store_matches_eager_store_without_compensation():
    """Plain fp32 average of a bf16 model: the fused and the eager (staged) executors agree
    to an fp32 rounding per update, and both follow float64."""
    a, b = _model(torch.bfloat16), _model(torch.bfloat16)
    sa = make_store(a, executor="eager")
    sb = make_store(b, executor="fused")
    assert any(isinstance(op, Staged) for op in sa.plan.main) and sa.workspace_nbytes() > 0
    ra = Replay(a).run(sa, WEIGHTS, seed=4, scale=1.0).ref
    rb = Replay(b).run(sb, WEIGHTS, seed=4, scale=1.0).ref
    for n in ra:
        assert torch.equal(ra[n], rb[n])
        for s in (sa, sb):
            torch.testing.assert_close(views.tensors(s)[n].double(), ra[n], rtol=1e-6, atol=1e-6)


@compiles
def test_fused_store_replans_when_a_parameter_moves():
    model = _model(torch.bfloat16)
    store = make_store(model, compensated=True, executor="fused")
    replay = Replay(model).run(store, WEIGHTS[:2], seed=5)
    old = store.plan
    with torch.no_grad():  # new storage, same values: the plan's views are stale
        model[0].weight.data = model[0].weight.data.clone()
    replay.params = dict(model.named_parameters())
    replay.run(store, WEIGHTS[2:], seed=6)
    assert store.plan is not old and store.workspace_nbytes() == 0
    replay.check(store)


def test_graph_executor_on_cpu_runs_the_plan_directly():
    """No CUDA operations: nothing to capture; the result is the eager executor's, bitwise."""
    a, b = _model(torch.float32, many=10), _model(torch.float32, many=10)
    sa, sb = make_store(a, executor="eager", compensated=True), make_store(b, executor="graph",
                                                                 compensated=True)
    assert isinstance(sb.executor, Graphed)
    Replay(a).run(sa, WEIGHTS, seed=7)
    Replay(b).run(sb, WEIGHTS, seed=7)
    assert sb.executor.graphs == {}
    for n, t in views.tensors(sa).items():
        assert torch.equal(views.tensors(sb)[n], t), n


def test_select_defaults_and_errors():
    fused_cpu = Fused if compilation_available("cpu") else Eager
    assert type(select("auto", [torch.device("cpu")])) is fused_cpu  # plain: eager is 3 passes
    assert type(select("auto", [torch.device("cpu")], compensated=True)) is fused_cpu
    assert type(make_store(nn.Linear(2, 2), compensated=True).executor) is fused_cpu
    assert type(select("eager", [torch.device("cpu")])) is Eager
    assert type(select("fused", [torch.device("cpu")])) is Fused
    with pytest.raises(ValueError, match="executor: expected one of"):
        make_store(nn.Linear(2, 2), executor="triton")
    # every store shares one compiled kernel: a dtype combination compiles once
    assert executors.shared_fused() is executors.shared_fused()


def test_side_stream_warns_future_and_is_ignored():
    with pytest.warns(FutureWarning, match="side_stream=True is deprecated"):
        make_store(nn.Linear(2, 2), side_stream=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_store(nn.Linear(2, 2))  # no warning without it


# CUDA ------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_auto_is_a_graph_and_tracks_float64(dtype):
    model = _model(dtype, "cuda", many=40)
    store = make_store(model, compensated=True)
    assert isinstance(store.executor, Graphed)
    replay = Replay(model).run(store, WEIGHTS, seed=8)
    assert list(store.executor.graphs) == [torch.device("cuda", torch.cuda.current_device())]
    assert store.executor.graphs[next(iter(store.executor.graphs))].graph is not None
    replay.check(store)


@cuda
def test_cuda_graph_recaptures_after_a_replan():
    """The graph holds the planned addresses: after a parameter moves, the store re-plans
    and the next update captures afresh (a replay of the old graph would read freed memory
    and miss the new values)."""
    model = _model(torch.bfloat16, "cuda", many=20)
    store = make_store(model, compensated=True, executor="graph")
    replay = Replay(model).run(store, WEIGHTS[:2], seed=9)
    first = store.executor.graphs[torch.device("cuda", torch.cuda.current_device())].graph
    with torch.no_grad():
        model[0].weight.data = model[0].weight.data.clone().mul_(2.0)
    replay.params = dict(model.named_parameters())
    replay.run(store, WEIGHTS[2:], seed=10)
    assert store.executor.plan is store.plan
    graph = store.executor.graphs[torch.device("cuda", torch.cuda.current_device())].graph
    assert graph is not None and graph is not first
    replay.check(store)


@cuda
def test_cuda_graph_tensor_weight_equals_float_weight():
    a, b = _model(torch.bfloat16, "cuda", many=10), _model(torch.bfloat16, "cuda", many=10)
    sa, sb = make_store(a, executor="graph"), make_store(b, executor="graph")
    for w in WEIGHTS:
        sa.update(w)
        sb.update(torch.tensor(w, device="cuda"))
    for n, t in views.tensors(sa).items():
        torch.testing.assert_close(views.tensors(sb)[n], t, rtol=1e-6, atol=1e-7)


@cuda
def test_cuda_offload_warns_once_when_the_host_falls_behind():
    """A CPU average of a large CUDA model updated twice in a row: the second update finds
    the first's CPU arithmetic still running and says so, once."""
    model = nn.Linear(4096, 4096).cuda()
    ema = emakit.EMA(model, smoothing=0.9, device="cpu", compensated=True)
    with pytest.warns(RuntimeWarning, match="still running") as record:
        for _ in range(4):
            ema.step()
    assert sum("still running" in str(r.message) for r in record) == 1
    store_of(ema).synchronize()
