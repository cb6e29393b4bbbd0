"""The 16-bit fixed-point compensation (an int8 ``comp`` of two byte planes beside an fp32
average: 6 bytes per element) against float64, decoded here from its definition
(``q = 256 * high + (low mod 256)``, ``lo = q * 2**(e - 39)`` for an average in
``[2**e, 2**(e+1))``), not by the kernel."""

from __future__ import annotations

import math

import pytest
import torch

from emakit._engine.kernels import (
    FusedLerp,
    check_operands,
    comp_nbytes,
    compilation_available,
    fixed_comp,
    float_comp,
    lerp_,
)

F32, F64, I8, BF16 = torch.float32, torch.float64, torch.int8, torch.bfloat16

needs_compiler = pytest.mark.skipif(
    not compilation_available("cpu"), reason="no C++ compiler for inductor"
)
FUSED = FusedLerp()  # a 16-bit compensation takes the compiled kernel at every size
KERNELS = [
    pytest.param(lerp_, id="eager"),
    pytest.param(FUSED, id="fused", marks=needs_compiler),
]


def quantum(hi: torch.Tensor) -> torch.Tensor:
    _, e = torch.frexp(hi.double())  # hi = m * 2**e, m in [0.5, 1): hi in [2**(e-1), 2**e)
    return torch.ldexp(torch.ones_like(hi, dtype=F64), torch.clamp(e - 1, min=-87) - 39)


def count(comp: torch.Tensor) -> torch.Tensor:
    return comp[0].to(torch.int64) * 256 + (comp[1].to(torch.int64) & 0xFF)


def planes(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.int64)
    return torch.stack([(q >> 8).to(I8), (((q & 0xFF) + 128) % 256 - 128).to(I8)])


def value(hi: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    return hi.double() + count(comp).double() * quantum(hi)


def split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 value as stored: the fp32 average and the nearest count."""
    hi = v.to(F32)
    q = torch.round((v - hi.double()) / quantum(hi)).clamp(-(2**15), 2**15 - 1)
    return hi, planes(q)


def frozen_error(half_life: float, segments: int, kernel) -> float:
    """A weight moving 1.0 -> 1.001, read after one half-life, error relative to the 0.0005
    it should have moved; the half-life's updates replayed as ``segments`` elements side by
    side, each from the exact EMA at its start (see tests/test_kernels.py)."""
    w = -math.expm1(-math.log(2.0) / half_life)
    m = round(half_life) // segments
    x = torch.tensor(1.001, dtype=F32)
    xd, log_s = float(x), math.log1p(-w)
    j = torch.arange(segments, dtype=F64)
    hi, comp = split(xd - (xd - 1.0) * torch.exp(j * m * log_s))
    start = value(hi, comp)
    src = [x.expand(segments).contiguous()]
    for _ in range(m):
        kernel([hi], src, w, [comp])
    exact = xd - (xd - start) * math.exp(m * log_s)
    err = (value(hi, comp) - exact) * torch.exp((segments - 1 - j) * m * log_s)
    return abs(float(err.sum())) / ((xd - 1.0) * -math.expm1(round(half_life) * log_s))


def test_six_bytes_per_element():
    assert comp_nbytes(F32, I8) == 6 and comp_nbytes(F32, F32) == 8


@pytest.mark.parametrize(
    "half_life, segments, kernel",
    [
        (1e5, 100, lerp_),
        (1e6, 1000, lerp_),
        pytest.param(1e7, 1000, FUSED, marks=needs_compiler),
    ],
)
def test_frozen_weight_within_target(half_life, segments, kernel):
    """The issue's target: within 1e-3 of float64 at a half-life of 1e7 (plain fp32 is off
    by 0.69 there, a bf16 compensation of the same 6 bytes by 0.69 too)."""
    assert frozen_error(half_life, segments, kernel) < 1e-4


@pytest.mark.parametrize("kernel", KERNELS)
def test_random_walk_tracks_float64(kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g)
    x[:10_000] = 1.0 + 0.01 * x[:10_000]
    w = -math.expm1(-math.log(2.0) / 1e5)
    avg, comp = [x.clone()], [torch.zeros(2, 20_000, dtype=I8)]
    ref = start = x.double()
    for _ in range(300):
        x = x + 1e-4 * torch.randn(20_000, generator=g)
        src = x.to(BF16)
        kernel(avg, [src], w, comp)
        ref = ref + w * (src.double() - ref)
    moved = (ref - start).abs().max().item()
    err = (value(avg[0], comp[0]) - ref).abs()
    # per update at most one quantum (2**-16 ulp, under 2**-39 |avg| here): 300 of them
    assert (err <= 300 * 2.0**-39 * ref.abs().clamp(min=1.0)).all()
    assert err.max().item() < 1e-3 * moved  # plain fp32: about 1.0 (frozen)


@needs_compiler
def test_eager_and_fused_agree_bit_for_bit():
    """One elementwise body, run eagerly (in cache-sized pieces past 2**17 elements) and
    compiled (no contraction on a CPU)."""
    g = torch.Generator().manual_seed(1)
    n = (1 << 17) + 5000
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, n).float()
    hi, comp = split(x.double() + 1e-9 * x.double() * torch.randn(n, dtype=F64, generator=g))
    a1, c1 = [hi.clone()], [comp.clone()]
    a2, c2 = [hi.clone()], [comp.clone()]
    for k, w in enumerate([0.3, 1e-6, 0.5, 0.9, 1e-3]):
        src = x + 1e-4 * x * torch.randn(n, generator=g)
        weight = torch.tensor(w) if k % 2 else w
        lerp_(a1, [src], weight, c1)
        FUSED(a2, [src], weight, c2)
        assert torch.equal(a1[0], a2[0]) and torch.equal(c1[0], c2[0]), k
    assert FUSED.compiled


@pytest.mark.parametrize("kernel", KERNELS)
def test_invariants_weight_zero_and_one(kernel):
    """avg is the pair rounded to fp32; weight 0 keeps everything (even over NaN), weight 1
    copies with a zero count."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, generator=g)
    avg, comp = [x.clone()], [torch.zeros(2, 3000, dtype=I8)]
    for _ in range(20):
        kernel(avg, [x + 1e-3 * torch.randn(3000, generator=g)], 0.01, comp)
    e = value(avg[0], comp[0])
    half_ulp = quantum(avg[0]) * 2**15
    assert ((e - avg[0].double()).abs() <= half_ulp + quantum(avg[0])).all()
    assert count(comp[0]).abs().max() > 1000  # the low part is in use
    a0, c0 = avg[0].clone(), comp[0].clone()
    nan = x.clone()
    nan[5] = float("nan")
    kernel(avg, [nan], 0.0, comp)
    assert torch.equal(avg[0], a0) and torch.equal(comp[0], c0)
    kernel(avg, [x], 1.0, comp)
    assert torch.equal(avg[0], x) and not comp[0].any()


@pytest.mark.parametrize("kernel", KERNELS)
def test_top_of_the_fp32_range(kernel):
    m = torch.finfo(F32).max
    a = torch.tensor([-m, m, -m, m, 0.5 * m], dtype=F32)
    b = torch.tensor([m, -m, 0.5 * m, m, -m], dtype=F32)
    avg, comp = [a.clone()], [torch.zeros(2, 5, dtype=I8)]
    for w in (0.25, 0.999, torch.tensor(0.75)):
        kernel(avg, [b], w, comp)
        assert torch.isfinite(avg[0]).all()
    ref = a.double()
    for w in (0.25, 0.999, 0.75):
        ref = ref + w * (b.double() - ref)
    assert ((value(avg[0], comp[0]) - ref).abs() <= 8 * 2.0**-24 * m).all()


def test_no_index_dependence():
    """The dither hashes each element's own state: permuting the elements permutes the
    result (placements and shards get the same bits)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4000, generator=g)
    hi, comp = split(x.double() * (1 + 1e-9 * torch.randn(4000, dtype=F64, generator=g)))
    src = x + 1e-5 * torch.randn(4000, generator=g)
    perm = torch.randperm(4000, generator=g)
    a1, c1 = [hi.clone()], [comp.clone()]
    a2, c2 = [hi[perm].clone()], [comp[:, perm].clone()]
    for _ in range(5):
        lerp_(a1, [src], 1e-3, c1)
        lerp_(a2, [src[perm]], 1e-3, c2)
    assert torch.equal(a1[0][perm], a2[0]) and torch.equal(c1[0][:, perm], c2[0])


def test_dither_is_unbiased():
    """The rounding offset, over the states an element passes through (every count, a few
    averages): rounding ``q + f`` down after adding it gives ``f`` on average."""
    from emakit._engine.kernels import _dither

    q = torch.arange(-(2**15), 2**15, dtype=torch.int32)
    for avg in (1.0, 1.2345678, -3.75e-3, 6.1e5):
        r = _dither(q, torch.full((2**16,), avg))
        assert ((r >= 0) & (r < 1)).all()
        for f in (0.1, 0.25, 0.5, 0.9):
            assert abs(torch.floor(f + r).mean().item() - f) < 5e-3, (avg, f)


def test_bad_compensations_are_named():
    with pytest.raises(TypeError, match=r"comp: expected a dtype of .* beside a torch.bfloat16"):
        lerp_([torch.zeros(3, dtype=BF16)], [torch.zeros(3)], 0.5, [torch.zeros(2, 3, dtype=I8)])
    with pytest.raises(ValueError, match=r"comp\[0\]: expected shape \(2, 3\) like avg\[0\]"):
        check_operands([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3, dtype=I8)])
    with pytest.raises(TypeError, match=r"comp: expected a dtype of"):
        lerp_([torch.zeros(3)], [torch.zeros(3)], 0.5, [torch.zeros(3, dtype=torch.int16)])


def test_conversion_from_and_to_a_float_compensation():
    """For loading an fp32-compensated state into the 6-byte one and back: the nearest count,
    decoded exactly as defined."""
    g = torch.Generator().manual_seed(5)
    avg = torch.randn(10_000, generator=g) * torch.logspace(-35, 35, 10_000).float()
    lo = (torch.rand(10_000, generator=g, dtype=F64) - 0.5) * quantum(avg) * 2**16
    comp = fixed_comp(avg, lo.float())
    assert comp.dtype == I8 and comp.shape == (2, 10_000)
    got = value(avg, comp) - avg.double()
    assert ((got - lo).abs() <= quantum(avg) * 0.5 + lo.abs() * 2.0**-24).all()
    assert torch.equal(float_comp(avg, comp).double(), got)
    with pytest.raises(ValueError, match=r"comp: expected int8 of shape \(2, 3\)"):
        float_comp(torch.zeros(3), torch.zeros(3, dtype=I8))
