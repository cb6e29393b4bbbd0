"""The EMA kernels against float64: compensated accumulation that does not freeze, weight
edge cases, tensor weights, mixed dtypes, the fused (compiled) kernel and CUDA graphs."""

from __future__ import annotations

import math

import pytest
import torch

from emakit._engine.kernels import (
    CUDAGraphUpdate,
    FusedLerp,
    check_operands,
    compilation_available,
    lerp_,
)

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
U32 = 2.0**-24  # fp32 unit roundoff

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def weight_for(half_life: float) -> float:
    return -math.expm1(-math.log(2.0) / half_life)  # 1 - 2**(-1/h)


def split(value: torch.Tensor, dtype, comp_dtype):
    hi = value.to(dtype)
    return hi, (value - hi.double()).to(comp_dtype)


def frozen_error(half_life: float, segments: int, comp_dtype=F32, kernel=lerp_) -> float:
    """Error of the average after one half-life of a weight that moved from 1.0 to 1.001,
    relative to the 0.0005 it should have moved.

    The half-life's h updates are replayed as ``segments`` elements of h/segments updates
    each, run side by side: element j starts where the exact EMA is after j*h/segments
    updates (split into average + compensation as stored), and its own error (result minus
    the exact EMA from its stored start) is carried to the end by the exact map, a factor
    (1 - w)**k <= 1. An update depends only on the stored state, the source and w, so the
    segments run every update a full run does; with errors this small, first order is exact.
    """
    w = weight_for(half_life)
    steps = round(half_life)
    m = steps // segments
    x = torch.tensor(1.001, dtype=F32)
    xd, log_s = float(x), math.log1p(-w)
    j = torch.arange(segments, dtype=F64)
    starts = xd - (xd - 1.0) * torch.exp(j * m * log_s)
    hi, lo = split(starts, F32, comp_dtype or F32)
    comp = None if comp_dtype is None else [lo]
    start = hi.double() + (0.0 if comp is None else lo.double())
    src = [x.expand(segments).contiguous()]
    for _ in range(m):
        kernel([hi], src, w, comp)
    got = hi.double() + (0.0 if comp is None else lo.double())
    err = (got - (xd - (xd - start) * math.exp(m * log_s))) * torch.exp(
        (segments - 1 - j) * m * log_s
    )
    moved = (xd - 1.0) * -math.expm1(steps * log_s)
    return abs(float(err.sum())) / moved


@pytest.mark.parametrize("half_life, segments", [(1e4, 1), (1e5, 100), (1e6, 1000), (1e7, 1000)])
def test_frozen_weight_moves_at_every_half_life(half_life, segments):
    # plain fp32 reads 1.00014 at 1e4 and exactly 1.0 from 1e5 on
    assert frozen_error(half_life, segments) < 1e-3


def test_frozen_weight_check_fails_without_compensation():
    assert frozen_error(1e5, 100, comp_dtype=None) > 0.5


def test_frozen_weight_full_run_reads_the_exact_value():
    # one real run of h = 1e4 updates, read as the user would: the fp32 average itself
    avg, comp = [torch.ones(3)], [torch.zeros(3)]
    src = [torch.full((3,), 1.001)]
    w = weight_for(1e4)
    for _ in range(10_000):
        lerp_(avg, src, w, comp)
    exact = 1.0 + (float(src[0][0]) - 1.0) / 2
    assert abs(avg[0].double() - exact).max() <= 2.0**-24  # within half an fp32 ulp
    assert abs(avg[0].double() + comp[0].double() - exact).max() < 1e-3 * 5e-4


def random_walk(model_dtype, steps=1000, n=2000, half_life=1e5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=g)
    x[: n // 2] = 1.0 + 0.01 * x[: n // 2]  # LayerNorm-like gains near 1
    walk = [x]
    for _ in range(steps):
        walk.append(walk[-1] + 1e-4 * torch.randn(n, generator=g))
    return [s.to(model_dtype) for s in walk], weight_for(half_life)


def float64_ema(walk, w):
    ref = walk[0].double()
    for s in walk[1:]:
        ref = ref + w * (s.double() - ref)
    return ref


@pytest.mark.parametrize("model_dtype", [F32, BF16])
def test_random_walk_within_the_compensated_bound(model_dtype):
    walk, w = random_walk(model_dtype)
    avg, comp = [walk[0].float().clone()], [torch.zeros(walk[0].shape)]
    for s in walk[1:]:
        lerp_(avg, [s], w, comp)
    ref = float64_ema(walk, w)
    moved = (ref - walk[0].double()).abs().max().item()
    # per update at most ~u * (w |src - e| + ulp(avg)): summed over the run
    bound = len(walk) * U32 * (2 * U32 * ref.abs().max().item()) + 4 * U32 * moved
    err = (avg[0].double() + comp[0].double() - ref).abs().max().item()
    assert err <= bound
    assert (avg[0].double() - ref).abs().max() <= U32 * ref.abs().max() + err
    plain = [walk[0].float().clone()]
    for s in walk[1:]:
        lerp_(plain, [s], w)
    assert (plain[0].double() - ref).abs().max().item() > 100 * bound  # the bound can fail


@pytest.mark.parametrize("weight", [0.0, 1.0])
@pytest.mark.parametrize("src_dtype", [F32, BF16])
def test_weight_zero_and_one_are_exact(weight, src_dtype):
    avg0 = torch.randn(50)
    comp0 = torch.randn(50) * 1e-9
    src = torch.randn(50).to(src_dtype)
    if weight == 0.0:
        src[3] = float("nan")
    avg, comp = [avg0.clone()], [comp0.clone()]
    lerp_(avg, [src], weight, comp)
    if weight == 0.0:
        assert torch.equal(avg[0], avg0) and torch.equal(comp[0], comp0)
    else:
        assert torch.equal(avg[0], src.float()) and not comp[0].any()
    plain = [avg0.clone()]
    lerp_(plain, [src], weight)
    assert torch.equal(plain[0], avg0 if weight == 0.0 else src.float())


@pytest.mark.parametrize("comp_dtype", [None, F32, BF16])
def test_tensor_weight_matches_float64(comp_dtype):
    walk, w = random_walk(F32, steps=200, n=300, half_life=50.0)
    weight = torch.tensor(w)
    avg = [walk[0].clone(), walk[0][:7].clone()]
    comp = (
        None
        if comp_dtype is None
        else [torch.zeros(300, dtype=comp_dtype), torch.zeros(7, dtype=comp_dtype)]
    )
    for s in walk[1:]:
        lerp_(avg, [s, s[:7]], weight, comp)
    ref = float64_ema(walk, w)
    got = avg[0].double() + (0.0 if comp is None else comp[0].double())
    tol = 1e-5 if comp is None else 1e-9  # the plain path rounds every update to fp32
    assert (got - ref).abs().max().item() < tol
    assert torch.equal(avg[1], avg[0][:7])


@pytest.mark.parametrize(
    "avg_dtype, comp_dtype, src_dtype, tol",
    [
        (F32, F32, BF16, 1e-9),
        (F32, F32, F16, 1e-9),
        (F32, BF16, BF16, 1e-8),
        (BF16, BF16, F32, 5e-4),  # a bf16 pair keeps ~16 bits: 100 x 2**-18 x |x| <= 4
        (F64, F64, F32, 1e-12),
        (F32, None, BF16, 1e-5),
    ],
)
def test_mixed_dtype_sources(avg_dtype, comp_dtype, src_dtype, tol):
    walk, w = random_walk(src_dtype, steps=100, n=500, half_life=20.0)
    hi, lo = split(walk[0].double(), avg_dtype, comp_dtype or F32)
    comp = None if comp_dtype is None else [lo]
    for s in walk[1:]:
        lerp_([hi], [s], w, comp)
    ref = float64_ema(walk, w)
    got = hi.double() + (0.0 if comp is None else lo.double())
    assert (got - ref).abs().max().item() < tol


def test_non_contiguous_source():
    base = torch.randn(40, 30)
    avg, comp = [torch.zeros(30, 40)], [torch.zeros(30, 40)]
    ref = torch.zeros(30, 40, dtype=F64)
    for k in range(20):
        src = (base + k).t()  # a transposed view
        assert not src.is_contiguous()
        lerp_(avg, [src], 0.1, comp)
        ref = ref + 0.1 * (src.double() - ref)
    # w = 0.1 is large: the rounding of d = src - avg (2**-24 of ~10, times w) dominates
    assert (avg[0].double() + comp[0].double() - ref).abs().max() < 20 * 2**-24 * 12 * 0.1


def test_bad_operands_are_named():
    with pytest.raises(ValueError, match="src: expected 2 tensors"):
        lerp_([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 0.5)
    with pytest.raises(ValueError, match=r"weight: expected a value in \[0, 1\], got 1.5"):
        lerp_([torch.zeros(1)], [torch.zeros(1)], 1.5)
    with pytest.raises(ValueError, match="weight: expected a float or a 0-d"):
        lerp_([torch.zeros(1)], [torch.zeros(1)], torch.ones(2))
    with pytest.raises(ValueError, match=r"comp\[1\]: expected torch.float32"):
        check_operands(
            [torch.zeros(1)] * 2, [torch.zeros(1)] * 2, [torch.zeros(1), torch.zeros(1, dtype=BF16)]
        )
    with pytest.raises(TypeError, match=r"src\[0\]: expected a floating dtype"):
        check_operands([torch.zeros(1)], [torch.zeros(1, dtype=torch.int64)])


# the fused (compiled) kernel ---------------------------------------------------------------

needs_compiler = pytest.mark.skipif(
    not compilation_available("cpu"), reason="no C++ compiler for inductor"
)


@needs_compiler
def test_fused_bf16_model_into_fp32_average_with_compensation():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    fused = FusedLerp(eager_below=6)  # the 5-element tensor goes to the eager lerp_
    walk, w = random_walk(BF16, steps=60, n=257, half_life=1e3)
    avg = [walk[0].float(), walk[0][:5].float()]
    comp = [torch.zeros(257), torch.zeros(5)]
    weights = [w * (1 + 0.01 * k) for k in range(len(walk) - 1)]  # a schedule: new values
    graphs = None
    ref = walk[0].double()
    for k, s in enumerate(walk[1:]):
        wk = weights[k] if k % 2 else torch.tensor(weights[k])
        fused(avg, [s, s[:5]], wk, comp)
        ref = ref + weights[k] * (s.double() - ref)
        if k == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert fused.compiled
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile for new weights
    for a, c, r in zip(avg, comp, (ref, ref[:5]), strict=True):
        err = (a.double() + c.double() - r).abs().max().item()
        assert err < 1e-9  # fp32 weights: the factor itself is rounded to 2**-24 relative
    # weight 0 (even over NaN) and 1 are exact, as tensors too
    a0, c0 = avg[0].clone(), comp[0].clone()
    nan_src = walk[-1].clone()
    nan_src[0] = float("nan")
    fused(avg, [nan_src, walk[-1][:5]], torch.tensor(0.0), comp)
    assert torch.equal(avg[0], a0) and torch.equal(comp[0], c0)
    fused(avg, [walk[-1], walk[-1][:5]], torch.tensor(1.0), comp)
    assert torch.equal(avg[0], walk[-1].float()) and not comp[0].any()
    assert counters["stats"]["unique_graphs"] == graphs


@needs_compiler
@pytest.mark.parametrize("comp_dtype", [None, F32])
def test_fused_fp32_model_matches_eager_and_float64(comp_dtype):
    fused = FusedLerp(eager_below=0)
    walk, w = random_walk(F32, steps=30, n=100, half_life=10.0)
    avg, eager = [walk[0].clone()], [walk[0].clone()]
    comp = None if comp_dtype is None else [torch.zeros(100)]
    eager_comp = None if comp_dtype is None else [torch.zeros(100)]
    for s in walk[1:]:
        fused(avg, [s], w, comp)
        lerp_(eager, [s], w, eager_comp)
    ref = float64_ema(walk, w)
    assert fused.compiled
    if comp is None:
        assert (avg[0].double() - ref).abs().max() < 1e-6
        assert (avg[0] - eager[0]).abs().max() <= 4 * U32 * eager[0].abs().max()
    else:
        got = avg[0].double() + comp[0].double()
        # the factor is rounded to fp32 (2**-25 of w = 0.07) and d = src - avg to 2**-24 of
        # itself (|d| < 2e-3): about 2e-12 per update, 30 updates
        assert (got - ref).abs().max() < 1e-10
        assert torch.equal(avg[0], eager[0])  # both the correctly rounded average


def test_fused_falls_back_to_eager_without_compiling():
    fused = FusedLerp(compile=False)
    avg, comp = [torch.ones(4)], [torch.zeros(4)]
    fused(avg, [torch.full((4,), 3.0)], 0.5, comp)
    assert not fused.compiled and torch.equal(avg[0], torch.full((4,), 2.0))


# CUDA --------------------------------------------------------------------------------------


@cuda
def test_cuda_tensor_weight_does_not_sync():
    avg, comp = [torch.zeros(1000, device="cuda")], [torch.zeros(1000, device="cuda")]
    src = [torch.ones(1000, device="cuda", dtype=BF16)]
    w = torch.tensor(0.25, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lerp_(avg, src, w, comp)
        lerp_(avg, src, w)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = 1 - 0.75**2
    assert (avg[0].double() + comp[0].double() - expected).abs().max().item() < 1e-7


@cuda
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_update_matches_float64(fused):
    n = [33, 1000, 7]
    src = [torch.randn(k, device="cuda", dtype=BF16) for k in n]
    avg = [s.float() for s in src]
    comp = [torch.zeros(k, device="cuda") for k in n]
    kernel = FusedLerp(eager_below=100) if fused else lerp_  # 33 and 7 eagerly
    graph = CUDAGraphUpdate(lambda w: kernel(avg, src, w, comp), "cuda")
    ref = [s.double() for s in src]
    for k in range(20):
        w = 0.01 * (k + 1)
        for s in src:
            s.copy_(torch.randn_like(s))  # the graph reads the same tensors in place
        graph(w)
        ref = [r + w * (s.double() - r) for r, s in zip(ref, src, strict=True)]
    for a, c, r in zip(avg, comp, ref, strict=True):
        assert (a.double() + c.double() - r).abs().max().item() < 1e-6
    # re-capture after the tensors change: the new tensor is written, the old one is not
    old = avg[0]
    avg[0] = avg[0].clone()
    before = old.clone()
    graph.recapture()
    graph(1.0)
    assert torch.equal(old, before)
    for a, c, s in zip(avg, comp, src, strict=True):
        assert (a.double() + c.double() - s.double()).abs().max() < 1e-6
    if fused:  # a tensor weight of 1 copies exactly in the compiled kernel (1000 elements)
        assert torch.equal(avg[1], src[1].float()) and not comp[1].any()


@cuda
def test_cuda_fused_matches_eager():
    # Both against a float64 replay: on a GPU the compiled kernel contracts multiply-adds
    # (one rounding fewer), so the two agree to the compensated bound, not bitwise.
    src = [torch.randn(10_000, device="cuda", dtype=BF16)]
    a1, c1 = [torch.zeros(10_000, device="cuda")], [torch.zeros(10_000, device="cuda")]
    a2, c2 = [t.clone() for t in a1], [t.clone() for t in c1]
    exact = torch.zeros(10_000, device="cuda", dtype=torch.float64)
    path = torch.zeros_like(exact)
    fused = FusedLerp(eager_below=0)
    for w in (0.1, 0.2, 1e-7):
        fused(a1, src, w, c1)
        lerp_(a2, src, w, c2)
        step = w * (src[0].double() - exact)
        exact += step
        path += step.abs()
    bound = 2.0**-22 * path + 1e-30
    for a, c in ((a1, c1), (a2, c2)):
        err = (a[0].double() + c[0].double() - exact).abs()
        assert (err <= bound).all(), float((err / bound).max())
    assert fused.compiled
