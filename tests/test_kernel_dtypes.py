"""Every kernel right for every storage dtype (issue 19, item 4), against float64 replays
written here (or exact rational arithmetic where float64 itself would overflow).

- fp16/bf16 storage keeps its compensation in the eager and the compiled (fused) kernel;
- fp64 averages get their weight unrounded, fp64 sources their bits;
- no NaN or Inf from finite values at the top of every dtype's range, in every kernel;
- an fp64 model gets an fp64 average by default.

The compiled kernel is inductor's CPU build: one ``FusedLerp`` for the module, so each dtype
combination compiles once (seconds each; inductor caches them on disk across runs).
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import emakit
from emakit._engine.kernels import FusedLerp, compilation_available, lerp_

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

needs_compiler = pytest.mark.skipif(
    not compilation_available("cpu"), reason="no C++ compiler for inductor"
)
FUSED = FusedLerp(eager_below=0)  # every tensor through the compiled kernel
KERNELS = [
    pytest.param(lerp_, id="eager"),
    pytest.param(FUSED, id="fused", marks=needs_compiler),
]
# significand bits (with the implicit one) and the smallest subnormal of each dtype
BITS = {F16: 11, BF16: 8, F32: 24, F64: 53}
TINY = {F16: 2.0**-24, BF16: 2.0**-133, F32: 2.0**-149, F64: 2.0**-1074}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at the float64 values ``x`` (at least the smallest subnormal)."""
    _, e = torch.frexp(x.abs().double())
    return torch.ldexp(torch.ones_like(x, dtype=F64), e - BITS[dtype]).clamp(min=TINY[dtype])


def _check_fused(kernel) -> None:
    if kernel is FUSED:
        assert FUSED.compiled, "the fused kernel fell back to eager"


# 16-bit storage keeps its compensation --------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [F16, BF16])
def test_16bit_storage_keeps_its_compensation(kernel, dtype):
    """The issue's case: a weight moving 1e-3 per step, half-life 200 updates, 200 updates.
    Before, the compiled kernel rounded the new low part against an fp32 copy of the
    average it had never rounded, so the compensation was all zeros (fp16: 5.6e-2 off)."""
    n, steps = 4096, 200
    w = -math.expm1(-math.log(2.0) / 200)
    x0 = torch.empty(n, dtype=F64).uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(0))
    avg, comp = [x0.to(dtype)], [torch.zeros(n, dtype=dtype)]
    ref = avg[0].double()
    for k in range(1, steps + 1):
        src = (x0 + 1e-3 * k).to(dtype)
        kernel(avg, [src], w, comp)
        ref = ref + w * (src.double() - ref)
    _check_fused(kernel)
    got = avg[0].double() + comp[0].double()
    # per update the low part is stored rounded to 16 bits (half a unit of its own, at most
    # 2**-bits of ulp(avg), or half a subnormal step) plus fp32 arithmetic (2**-22 ulp)
    step_ulp = ulp(torch.tensor(4.0), dtype).item()
    bound = steps * (2.0 ** -BITS[dtype] * step_ulp + TINY[dtype] / 2 + 2.0**-22 * step_ulp)
    err = (got - ref).abs().max().item()
    assert err <= bound, (err, bound)
    assert comp[0].any()
    # the average itself is the pair rounded to the storage: within half an ulp of it
    assert ((avg[0].double() - got).abs() <= ulp(got, dtype) / 2 * (1 + 2.0**-10)).all()


# fp64 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("compensated", [False, True], ids=["plain", "comp"])
@pytest.mark.parametrize("tensor_weight", [False, True], ids=["float_w", "tensor_w"])
def test_fp64_average_uses_the_weight_unrounded(kernel, compensated, tensor_weight):
    """Before, the compiled kernel took every weight as an fp32 tensor: an fp64 average got
    a factor rounded to 2**-24 (2e-10 relative) instead of its own precision."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, dtype=F64, generator=g)
    avg = [x.clone()]
    comp = [torch.zeros_like(x)] if compensated else None
    ref = x.clone()
    for k in range(30):
        w = 0.1 + k * 1e-3 + 1e-12  # far from any fp32 value
        src = x + torch.randn(3000, dtype=F64, generator=g)
        kernel(avg, [src], torch.tensor(w, dtype=F64) if tensor_weight else w, comp)
        ref = ref + w * (src - ref)
    _check_fused(kernel)
    got = avg[0] + (comp[0] if compensated else 0.0)
    # float64 rounding of both sides over 30 updates of values under about 10
    assert (got - ref).abs().max().item() < 1e-13


@needs_compiler
def test_fp64_source_into_fp32_average_keeps_its_bits():
    """An fp64 model into an fp32 compensated average: the arithmetic is fp64, so the pair
    follows the float64 EMA of the fp64 weights (before, the compiled kernel rounded the
    source to fp32 first: an error of 2**-24 of the weight, not of the increment)."""
    g = torch.Generator().manual_seed(2)
    x = 1.0 + torch.rand(5000, dtype=F64, generator=g)
    avg, comp = [x.to(F32)], [(x - x.to(F32).double()).to(F32)]
    ref = x.clone()
    for _ in range(20):
        src = x + 1e-9 * torch.randn(5000, dtype=F64, generator=g)  # moves under an fp32 ulp
        FUSED(avg, [src], 0.05, comp)
        ref = ref + 0.05 * (src - ref)
    _check_fused(FUSED)
    err = (avg[0].double() + comp[0].double() - ref).abs().max().item()
    assert err < 2.0**-24 * 2.0**-23 * 20  # the fp32 low part's own rounding, per update


def test_fp64_model_gets_an_fp64_average_by_default():
    torch.manual_seed(3)
    model = nn.Linear(16, 8).double()
    ema = emakit.EMA(model, smoothing=0.9)
    assert {t.dtype for t in ema.state_dict()["average"].values()} == {F64}
    ref = None
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.step()
        sd = {n: t.detach().clone() for n, t in model.state_dict().items()}
        ref = sd if ref is None else {n: ref[n] + 0.1 * (sd[n] - ref[n]) for n in sd}
    for n, t in ema.ema_state_dict().items():
        assert t.dtype == F64
        assert (t - ref[n]).abs().max().item() < 1e-13, n  # an fp32 average: about 1e-7
    # an explicit narrower storage is still honoured; None is the model's own
    assert emakit.EMA(nn.Linear(2, 2), dtype=BF16).state_dict()["average"]["weight"].dtype == BF16
    none = emakit.EMA(nn.Linear(2, 2).double(), dtype=None)
    assert none.state_dict()["average"]["weight"].dtype == F64
    bf16 = emakit.EMA(nn.Linear(2, 2).to(BF16))
    assert bf16.state_dict()["average"]["weight"].dtype == F32


# the top of the range ---------------------------------------------------------------------


def _extremes(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(average, source) pairs at and near +-max, both signs, all representable."""
    m = torch.finfo(dtype).max
    a = [-m, m, -m, m, -0.75 * m, 0.9 * m, m, -m, 0.0, 0.5 * m, -m]
    b = [m, -m, 0.5 * m, m, 0.9 * m, -m, 0.99 * m, -m / 3, m, -m, -m]
    return torch.tensor(a, dtype=F64).to(dtype), torch.tensor(b, dtype=F64).to(dtype)


def _exact(a, b, weights) -> list[Fraction]:
    """The EMA of the sources ``b`` (one per weight) from ``a``, in rational arithmetic."""
    out = []
    for a0, b0 in zip(a.double().tolist(), b.double().tolist(), strict=True):
        e = Fraction(a0)
        for i, w in enumerate(weights):
            src = Fraction(b0) if i % 2 == 0 else Fraction(-b0)
            e += Fraction(float(w)) * (src - e)
        out.append(e)
    return out


WEIGHTS = [1e-3, 0.25, 0.5, 0.75, 0.999, "t0.3", "t0.999"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
@pytest.mark.parametrize("compensated", [False, True], ids=["plain", "comp"])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_no_overflow_at_the_top_of_the_range(kernel, dtype, compensated, weight):
    """Two updates, the sources at +-max and then their negatives, from averages at +-max:
    every result finite and within a few units of the exact value (before: NaN or Inf for
    fp32, bf16 and fp64 in every kernel, and for an fp16 compensated average at +-4e4)."""
    a, b = _extremes(dtype)
    w = float(weight[1:]) if isinstance(weight, str) else weight
    avg = [a.clone()]
    comp = [torch.zeros_like(a)] if compensated else None
    for src in (b, -b):
        kernel(avg, [src], torch.tensor(w, dtype=F64) if isinstance(weight, str) else w, comp)
    _check_fused(kernel)
    assert torch.isfinite(avg[0]).all(), avg[0]
    if compensated:
        assert torch.isfinite(comp[0]).all(), comp[0]
    exact = _exact(a, b, [w, w])
    m = torch.finfo(dtype).max
    u = 2.0 ** -BITS[dtype]
    for i, e in enumerate(exact):
        got = Fraction(avg[0][i].double().item())
        if compensated:
            got += Fraction(comp[0][i].double().item())
        # a few rounding units of the largest operand (an fp32 weight in fp32 arithmetic
        # adds 2**-24 of |src - avg| <= 2 max)
        assert abs(got - e) <= Fraction(6 * u * m), (i, float(got), float(e))


@pytest.mark.parametrize("kernel", KERNELS)
def test_plain_fp32_eager_is_torch_lerp_bit_for_bit(kernel):
    """The eager plain update halves the difference to stay in range, in lerp's two forms
    (``avg + w d`` below 1/2, ``src - (1 - w) d`` from 1/2 on): on a CPU it is
    ``torch.lerp``'s result, bit for bit, for normal values."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g)
    for w in (1e-4, 0.3, 0.5, 0.7):
        got, ref = [a.clone()], a.clone()
        kernel(got, [b], w)
        torch._foreach_lerp_([ref], [b], w)
        if kernel is lerp_:
            assert torch.equal(got[0], ref), w
        else:  # the compiled kernel rounds the product and the sum separately
            assert ((got[0] - ref).abs() <= 2.0**-22 * (a.abs() + b.abs())).all(), w


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
def test_any_floating_weight_tensor(kernel, dtype):
    """A 0-d weight of any floating dtype (CUDA graphs now pass float64) gives the same as
    the float weight."""
    x, y = torch.randn(300).to(dtype), torch.randn(300).to(dtype)
    out = {}
    for name, w in (("float", 0.25), ("f64", torch.tensor(0.25, dtype=F64)),
                    ("f32", torch.tensor(0.25))):
        avg, comp = [x.clone()], [torch.zeros_like(x)]
        kernel(avg, [y], w, comp)
        out[name] = avg[0].double() + comp[0].double()
    ref = x.double() + 0.25 * (y.double() - x.double())
    assert torch.equal(out["f64"], out["f32"])  # 0.25 is exact in both
    tol = {F16: 1e-6, BF16: 1e-4, F32: 1e-7}[dtype]  # the low part's own rounding
    for name, got in out.items():
        assert (got - ref).abs().max().item() < tol * ref.abs().max().item(), name


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
def test_worst_cases_at_the_top_of_the_range_stay_finite(dtype):
    """Part of the sweep behind the module docstring's no-overflow argument: the averages and
    sources at +-max, +-(max - ulp), +-max/2 and 0, low parts of 0 and +-ulp/2 of max, and
    the weights next to 1 and to 1/2 (where the argument's rounding bound is tight), in the
    eager kernel (float and tensor weights) and the compiled one."""
    m = torch.finfo(dtype).max
    top_ulp = m * torch.finfo(dtype).eps / 2
    vals = torch.tensor([m, m - top_ulp, m / 2, 0.0], dtype=F64)
    vals = torch.cat([vals, -vals])
    a = vals.repeat_interleave(len(vals)).to(dtype)
    b = vals.repeat(len(vals)).to(dtype)
    eps = torch.finfo(F64 if dtype == F64 else F32).eps
    weights = [1 - eps / 2, 1 - eps, 1 - 1.5 * eps, 0.5, 0.5 - eps / 4, 0.5 + eps / 2, eps]
    kernels = [("eager", lerp_, False), ("eager tensor weight", lerp_, True)]
    if compilation_available("cpu"):
        kernels.append(("fused", FUSED, True))
    for w in weights:
        for low in (None, 0.0, 0.5, -0.5):
            for name, kernel, tensor in kernels:
                avg = [a.clone()]
                comp = None if low is None else [torch.full_like(a, low * top_ulp)]
                weight = torch.tensor(w, dtype=F64) if tensor else w
                kernel(avg, [b], weight, comp)
                assert torch.isfinite(avg[0]).all(), (name, w, low)
                assert comp is None or torch.isfinite(comp[0]).all(), (name, w, low)
