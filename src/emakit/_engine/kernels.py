"""EMA arithmetic on lists of tensors: plain, compensated, fused (compiled) and CUDA-graphed.

The update of every kernel here is, for each index ``i``::

    avg[i] <- avg[i] + w * (src[i] - avg[i])          (w = 1 - smoothing)

**Compensated accumulation.** When ``w * |src - avg|`` falls under half a unit in the last
place (ulp) of ``avg``, a rounded update loses it every time and the average stops moving:
an fp32 average of a weight at 1.0 freezes for good once ``w * |src - avg| < 2**-25``, e.g.
a move of 1e-3 at a half-life above about 2.3e4 updates. With ``comp`` (a second tensor of
the same shape) the pair keeps the exact EMA as the unevaluated sum ``e = avg + comp``, with
the invariant ``avg == fl(avg + comp)`` (``avg`` is the average rounded to its dtype, ready
to export or swap without reading ``comp``) and ``|comp| <= ulp(avg) / 2``. One update
(``hi = avg``, ``lo = comp``, in the arithmetic precision ``W`` below)::

    d  = src - hi                  # rel. error <= u: an error on the *increment*, not on e
    y  = lo + w * (d - lo)         # = lo + w * (src - e): the new low part, not yet absorbed
    t  = fl(hi + y)                # the new average, rounded
    lo = y - (t - hi)              # Fast2Sum: exact when |hi| >= |y|, so t + lo == hi + y
    hi = t

Why it tracks the exact EMA: ``hi + y = e + w * (src - e)`` up to the rounding of ``d`` and
of ``y``, both relative to the increment ``w * |src - e|`` (or to ``|lo| <= ulp(hi)/2``), so
each update commits an error of at most about ``u * (w * |src - e| + ulp(hi))`` where ``u``
is the unit roundoff (2**-24 for fp32); nothing is rounded relative to ``|e|`` any more.
Summed over a run of ``n`` updates, the error of ``e`` against a float64 EMA of the same
weights is bounded by ``u * (path length of the average) + n * u * ulp(avg)``: for fp32,
1e7 updates of a weight near 1 add at most ``1e7 * 2**-24 * 2**-23 ~ 7e-8``, and the
rounded ``avg`` is always within half an ulp of ``e``. ``(t - hi)`` is exact by Sterbenz's
lemma whenever ``t`` and ``hi`` are within a factor 2 (always so when ``|y| <= |hi| / 2``);
otherwise the update is large relative to ``avg`` and a plain rounding was harmless anyway.
(The fused kernel uses TwoSum, exact for any magnitudes.)

**Arithmetic precision.** ``W`` is the widest of the average's, the source's and a floating
compensation's dtypes and fp32: fp32 for 16-bit and fp32 storage, fp64 as soon as one of
them is fp64, and the weight is used in ``W`` (a float weight is never rounded to fp32 for
an fp64 average). Where the average is narrower than ``W`` (fp16, bf16 storage) ``t`` is
rounded to the average's grid inside the arithmetic and the remainder joins the low part,
``lo = (t - round(t)) + (y - (t - hi))`` (``t - round(t)`` is exact). A compiled kernel keeps
16-bit values in fp32 registers and drops an fp32 -> bf16 -> fp32 round trip as a no-op
(that lost the whole compensation of fp16/bf16 storage), so the fused kernel rounds with
integer operations on the bits (:func:`round_to`, round half to even like a conversion),
which no compiler removes. A ``comp`` of a narrower dtype (a bf16 compensation of an fp32
average) stores ``lo`` rounded: it keeps 8 more bits, not 24, and itself freezes once
``w * |src - e|`` falls under ``2**-9 * |lo|`` (measured in ``benchmarks/accuracy.py``).

**Range: no overflow from finite values.** ``src - avg`` overflows when both lie near the
largest finite value ``M`` with opposite signs (+-4e4 in fp16, +-2e38 in fp32 and bf16), and
``y`` can exceed ``M`` when ``w`` is near 1. Where ``W``'s range is not twice the operands'
(fp32 arithmetic of bf16 or fp32 values, fp64 of fp64) the kernels carry every quantity at
half its value: ``d/2 = src/2 - hi/2``, ``y/2 = lo/2 + w * (d/2 - lo/2)``,
``t/2 = fl(hi/2 + y/2)``, then ``t = 2 * (t/2)``. Halving is exact for every value of
magnitude at least twice the smallest normal (2**-125 in fp32), so there the halved
arithmetic is the plain one bit for bit; below it a halving errs by at most half the
smallest subnormal (2**-150 in fp32). No halved quantity exceeds ``M``: ``|d/2| <= M`` and
``|y/2| <= |lo|/2 + w * |d|/2 <= M``. Both kernels halve every element of such lists (a
per-element choice costs a compare and two selects, more than the halving). Doubling back
cannot overflow: with ``src >= avg`` (the other case is its mirror) the computed ``t/2`` is
``hi/2 + fl(w * d/2)``, and ``fl(w * d/2) <= d/2 - ulp(d/2)/2`` for ``w <= 1 - 2u`` while
``d/2`` is at most ``(src - hi)/2 + ulp(d/2)/2``, so ``t/2 <= src/2 <= M/2`` before rounding
and after it; a low part adds at most ``(1 - w) |lo|/2``, under half an ulp of ``M/2``.
``w = 1 - u``, the one weight above, was swept with low parts of 0, +-ulp/4 and +-ulp/2 at
``+-M``, ``+-(M - ulp)``, ``+-M/2`` and 0 in every kernel and dtype: no overflow
(``tests/test_kernel_dtypes.py`` runs part of the sweep). The eager plain update
with a float weight uses ``torch.lerp``'s two forms on the halved difference (``avg + w * d``
below 1/2, ``src - (1 - w) * d`` from 1/2 on), so on a CPU its result is lerp's, bit for bit.
A source beyond the storage's range (an fp32 model into an fp16 average) still gives
``+-inf``, as the conversion would.

**A 16-bit compensation** (``comp`` of dtype int8 and shape ``(2, *avg.shape)`` beside an
fp32 average: 6 bytes per element instead of 8). ``comp`` holds ``q``, the low part as a
signed 16-bit count of the quantum ``s = ulp(avg) * 2**-16 = 2**(e - 39)`` for ``avg`` in
``[2**e, 2**(e+1))`` (``e`` clamped at -87 so that ``s`` and ``1/s`` are normal floats:
averages under 2**-87 share the step 2**-126), stored as two byte planes,
``q = 256 * comp[0] + (comp[1] mod 256)``. (Two int8 planes rather than one int16 tensor:
inductor's CPU backend does not vectorize int16, and a compiled kernel that selects int8
lanes or writes rows of one 2-row tensor runs 10-100x slower, so the kernel selects the
count in int32 and takes the planes as two tensors.) ``lo = q * s`` is exact in fp32. An
update decodes ``lo``, runs the compensated update above in fp32 and encodes the new low
part as ``q = floor(lo / s + r)``, ``r`` in ``[0, 1)`` a hash of the element's stored state
(its old ``q`` and the low 15 bits of its old average, in int32 arithmetic). This is
stochastic rounding without a random number generator: the rounding error is below one
quantum, unbiased over the states an element visits, reproducible (the same state gets the
same offset on every device and placement, integer arithmetic being exact everywhere; a GPU
that fuses ``lo / s + r`` into one multiply-add may still round a rare count the other way)
and draws nothing from torch's generators. Rounding to nearest instead errs the same way at
every update while ``w * |src - e|`` changes slowly, a bias of up to half a quantum per
update (``benchmarks/accuracy.py`` measures both). ``|lo| <= ulp(avg)/2`` keeps
``|q| <= 2**15`` (stored clamped to ``2**15 - 1``). An element stalls (``q`` and ``avg``
unchanged, so the same ``r`` next time) once ``w * |src - e|`` is under about one quantum,
``2**-16`` of a plain fp32 average's threshold; it moves again when ``src`` does.

**Weights.** ``weight`` is a Python float or a 0-d floating tensor on the average's device;
a tensor is read on the device (no host synchronization: masking steps a GradScaler skipped,
CUDA graphs). A float weight of exactly 0 leaves ``avg`` and ``comp`` untouched (even when
``src`` holds NaN); exactly 1 copies: ``avg == src`` (converted) and ``comp`` the
conversion's remainder (0 when ``src`` converts exactly). The fused kernel gives the same for
a tensor weight; the eager kernel with a tensor weight of 1 lands within ``ulp(avg)`` of
``src`` instead, and a tensor weight of 0 leaves the average unchanged only where ``src`` is
finite (no branch on a device value without a sync).

**Lists.** Each list is one ``torch._foreach_*`` call chain, no Python loop per tensor, so
the caller groups: within ``avg``, ``src`` and ``comp`` every tensor has the list's dtype and
device (``check_operands`` says so with a clear error; it loops, so call it when planning,
not every update). ``src`` may have another floating dtype than ``avg`` (a bf16 model into
an fp32 average): it is converted inside the arithmetic. An int8 (16-bit fixed-point)
``comp`` runs the fused kernel's body tensor by tensor (integer operations on the bits have
no ``_foreach`` form).
"""

from __future__ import annotations

import logging
import os
import shutil
import types
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "lerp_",
    "check_operands",
    "arithmetic_dtype",
    "round_to",
    "fixed_comp",
    "float_comp",
    "comp_nbytes",
    "COMP_DTYPES",
    "FusedLerp",
    "CUDAGraphUpdate",
    "compilation_available",
    "compiler_present",
]

_log = logging.getLogger(__name__)

Weight = float | Tensor

F16, BF16, F32, F64, I8 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8

#: compensation dtypes by average dtype: a floating one of at most the average's width, or
#: int8 (the 16-bit fixed-point compensation, shape ``(2, *avg.shape)``) beside fp32
COMP_DTYPES: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    F64: (F64, F32, BF16, F16),
    F32: (F32, BF16, F16, I8),
    BF16: (BF16,),
    F16: (F16,),
}


def comp_nbytes(avg_dtype: torch.dtype, comp_dtype: torch.dtype | None) -> int:
    """Bytes per element of an average of ``avg_dtype`` with a compensation of ``comp_dtype``
    (``None``: none; int8: two planes, 2 bytes).

    >>> import torch
    >>> comp_nbytes(torch.float32, torch.int8), comp_nbytes(torch.float32, None)
    (6, 4)
    """
    if comp_dtype is None:
        return avg_dtype.itemsize
    return avg_dtype.itemsize + (2 if comp_dtype == I8 else comp_dtype.itemsize)


def arithmetic_dtype(
    avg: torch.dtype, src: torch.dtype, comp: torch.dtype | None = None
) -> torch.dtype:
    """The dtype the update computes in: the widest of ``avg``, ``src``, a floating ``comp``
    and fp32.

    >>> import torch
    >>> arithmetic_dtype(torch.bfloat16, torch.bfloat16)
    torch.float32
    >>> arithmetic_dtype(torch.float32, torch.float64)
    torch.float64
    """
    wide = torch.promote_types(torch.promote_types(avg, src), F32)
    if comp is not None and comp.is_floating_point:
        wide = torch.promote_types(wide, comp)
    return wide


def _halves(wide: torch.dtype, *dtypes: torch.dtype) -> bool:
    """Whether differences of values of ``dtypes`` can overflow ``wide`` (see Range)."""
    top = torch.finfo(wide).max / 2
    return any(torch.finfo(d).max > top for d in dtypes if d.is_floating_point)


def check_operands(
    avg: Sequence[Tensor], src: Sequence[Tensor], comp: Sequence[Tensor] | None = None
) -> None:
    """Raise a clear error unless ``lerp_(avg, src, w, comp)`` may run on these lists.

    Every list is homogeneous (one dtype, one device), ``avg`` and ``src`` are floating,
    ``src`` is on ``avg``'s device with the same shapes, ``comp`` (if any) is on ``avg``'s
    device with a dtype of ``COMP_DTYPES[avg.dtype]`` and ``avg``'s shapes (an int8 one
    ``(2, *avg.shape)``: two byte planes). Loops over the tensors: call it when building a
    plan.

    >>> import torch
    >>> check_operands([torch.zeros(2)], [torch.zeros(3)])
    Traceback (most recent call last):
    ...
    ValueError: src[0]: expected shape (2,) like avg[0], got (3,)
    """
    lists = {"avg": avg, "src": src}
    if comp is not None:
        lists["comp"] = comp
    for name, ts in lists.items():
        if len(ts) != len(avg):
            raise ValueError(f"{name}: expected {len(avg)} tensors like avg, got {len(ts)}")
        for i, t in enumerate(ts):
            _check_tensor(name, i, t, ts[0], avg[i])
    if comp and avg:
        _check_comp_dtype(avg[0].dtype, comp[0].dtype)


def _check_tensor(name: str, i: int, t: Tensor, first: Tensor, like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}[{i}]: expected a Tensor, got {type(t).__name__}")
    if name != "comp" and not t.is_floating_point():
        raise TypeError(f"{name}[{i}]: expected a floating dtype, got {t.dtype}")
    if (t.dtype, t.device) != (first.dtype, first.device):
        raise ValueError(
            f"{name}[{i}]: expected {first.dtype} on {first.device} like {name}[0] "
            f"(group lists by dtype and device), got {t.dtype} on {t.device}"
        )
    if t.device != like.device:
        raise ValueError(f"{name}[{i}]: expected device {like.device}, got {t.device}")
    shape = (2, *like.shape) if name == "comp" and t.dtype == I8 else tuple(like.shape)
    if tuple(t.shape) != shape:
        raise ValueError(
            f"{name}[{i}]: expected shape {shape} like avg[{i}]"
            + (" (two byte planes)" if len(shape) > like.dim() else "")
            + f", got {tuple(t.shape)}"
        )


def _check_comp_dtype(avg: torch.dtype, comp: torch.dtype) -> None:
    allowed = COMP_DTYPES.get(avg, ())
    if comp not in allowed:
        raise TypeError(
            f"comp: expected a dtype of {[str(d) for d in allowed]} beside a {avg} average "
            f"(a floating compensation no wider than the average, or int8 planes beside "
            f"fp32), "
            f"got {comp}"
        )


def _check_weight(weight: Weight, avg: Sequence[Tensor]) -> None:
    if isinstance(weight, Tensor):
        if weight.dim() != 0 or not weight.is_floating_point():
            raise ValueError(
                f"weight: expected a float or a 0-d floating tensor, got a {weight.dtype} "
                f"tensor of shape {tuple(weight.shape)}"
            )
        if avg and weight.device != avg[0].device:
            raise ValueError(
                f"weight: expected a tensor on {avg[0].device} like avg, got {weight.device}"
            )
    elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight: expected a float or a 0-d tensor, got {type(weight).__name__}")
    elif not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight: expected a value in [0, 1], got {weight}")


def _check_call(avg: Sequence[Tensor], src: Sequence[Tensor], weight: Weight, comp) -> None:
    """The checks every update pays for: lengths, the weight, the comp dtype (no loop)."""
    if len(src) != len(avg):
        raise ValueError(f"src: expected {len(avg)} tensors like avg, got {len(src)}")
    if comp is not None and len(comp) != len(avg):
        raise ValueError(f"comp: expected {len(avg)} tensors like avg, got {len(comp)}")
    _check_weight(weight, avg)
    if comp and avg:
        _check_comp_dtype(avg[0].dtype, comp[0].dtype)


# elementwise pieces of the fused kernel (also run eagerly, tensor by tensor) --------------


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to the grid of ``dtype`` (round half to even, like a conversion), kept
    in ``x``'s dtype.

    For fp32 ``x`` and a 16-bit ``dtype`` the rounding is done on the bits with integer
    operations: a compiled kernel keeps 16-bit values in fp32 and treats
    ``x.to(bfloat16).to(float32)`` as ``x``, which would lose the rounding's remainder.
    Values beyond ``dtype``'s range stay finite here (a conversion makes them inf).

    >>> import torch
    >>> round_to(torch.tensor([1.0 + 2**-9, 1.0 + 3 * 2**-9]), torch.bfloat16).tolist()
    [1.0, 1.0078125]
    """
    if dtype == x.dtype:
        return x
    if x.dtype != F32 or dtype not in (BF16, F16):
        return x.to(dtype).to(x.dtype)  # compilers keep round trips from fp64
    finite = torch.isfinite(x)
    bits = torch.where(finite, x, 0.0).view(torch.int32)  # no integer overflow from NaN
    drop = 16 if dtype == BF16 else 13  # fp32 significand bits the 16-bit format lacks
    bits = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) & -(1 << drop)
    out = bits.view(F32)
    if dtype == F16:  # fp16 subnormals (under 2**-14) are multiples of 2**-24
        out = torch.where(x.abs() < 2.0**-14, torch.round(x * 2.0**24) * 2.0**-24, out)
    return torch.where(finite, out, x)


_Q_MAX = (1 << 15) - 1  # the 16-bit compensation counts quanta in [-2**15, 2**15 - 1]


def _quantum(avg32: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, 1/s)`` for fp32 values ``avg32``: ``s = 2**(e - 39)`` (``2**-16`` of the ulp)
    for ``avg32`` in ``[2**e, 2**(e+1))``, ``e`` at least -87 (exact powers of two)."""
    power = (avg32.view(torch.int32) & 0x7F800000).view(F32)  # 2**e: the exponent bits alone
    power = torch.clamp(power, min=2.0**-87)
    return power * 2.0**-39, 2.0**39 / power


Planes = tuple[Tensor, Tensor]  # the (high, low) int8 planes of a 16-bit compensation


def _count(c: Planes) -> Tensor:
    """The signed 16-bit count held in the int8 planes ``c`` (high, low), as int32."""
    return c[0].to(torch.int32) * 256 + (c[1].to(torch.int32) & 0xFF)


def _dither(q: Tensor, avg32: Tensor) -> Tensor:
    """A number in [0, 1) hashed from an element's stored state (its count ``q`` and the
    low 15 bits of its fp32 average): the offset of the stochastic rounding of ``q``.
    Multiply-xorshift rounds on 16-bit halves: every product stays under 2**31 (int32
    arithmetic, no overflow on any device)."""
    x = (q & 0xFFFF) ^ ((avg32.view(torch.int32) & 0x7FFF) * 0x9E3)
    x = ((x & 0xFFFF) * 0x7FEB) ^ (x >> 12)
    x = ((x & 0xFFFF) * 0x6A09) ^ (x >> 13)
    return (x & 0xFFFF).to(F32) * 2.0**-16


def _decode(c: Tensor | Planes | None, a: Tensor, wide: torch.dtype) -> Tensor | None:
    if c is None:
        return None
    if isinstance(c, tuple):
        return _count(c).to(wide) * _quantum(a)[0].to(wide)
    return c.to(wide, copy=True)  # never an alias of a mutated input


def _encode(lo: Tensor, hi32: Tensor, q: Tensor, a: Tensor) -> Tensor:
    """The count (int32) for the low part ``lo`` of the new average ``hi32``, rounded up or
    down by the dither of the old state (count ``q``, average ``a``)."""
    count = torch.floor(lo * _quantum(hi32)[1].to(lo.dtype) + _dither(q, a).to(lo.dtype))
    count = torch.clamp(count, -_Q_MAX - 1, _Q_MAX)
    return torch.where(torch.isfinite(count), count, 0.0).to(torch.int32)


def _planes(q: Tensor) -> Planes:
    """The int8 planes (high, low) of the int32 counts ``q`` in [-2**15, 2**15)."""
    return (q >> 8).to(I8), (((q & 0xFF) + 128) & 0xFF).sub(128).to(I8)




def fixed_comp(avg: Tensor, lo: Tensor) -> Tensor:
    """The 16-bit compensation (int8, shape ``(2, *avg.shape)``) nearest to the low part
    ``lo`` of the fp32 average ``avg``, e.g. to load an fp32 compensation into a 6-byte
    state (a low part beyond the count's range is clamped to it).

    >>> import torch
    >>> avg = torch.tensor([1.0])
    >>> float_comp(avg, fixed_comp(avg, torch.tensor([2.0**-30]))).item() == 2.0**-30
    True
    """
    if avg.dtype != F32:
        raise TypeError(f"avg: expected torch.float32 for a 16-bit compensation, got {avg.dtype}")
    count = torch.round(lo.to(F32) * _quantum(avg)[1])
    count = torch.clamp(count, -_Q_MAX - 1, _Q_MAX)
    return torch.stack(_planes(torch.where(torch.isfinite(count), count, 0.0).to(torch.int32)))


def float_comp(avg: Tensor, comp: Tensor) -> Tensor:
    """The low part (fp32) held by the 16-bit compensation ``comp`` of the fp32 ``avg``:
    ``avg + float_comp(avg, comp)`` is the stored average to 40 bits."""
    if comp.dtype != I8 or tuple(comp.shape) != (2, *avg.shape):
        raise ValueError(f"comp: expected int8 of shape {(2, *avg.shape)}, got {comp.dtype} "
                         f"of shape {tuple(comp.shape)}")
    return _count((comp[0], comp[1])).to(F32) * _quantum(avg)[0]


def _fused_one(a: Tensor, s: Tensor, c: Tensor | Planes | None, weight: Tensor) -> None:
    # One pass over one tensor: read a, s, c once, write a and c once (the module docstring
    # has the algorithm). ``c``: a floating compensation, or the two int8 planes of a
    # 16-bit one as separate tensors (writing rows of one 2-row tensor compiles to a loop
    # 100x slower). Every quantity is carried at ``k`` times its value (1/2 where W has no
    # room for the differences: exact, see Range; a per-element select cost more).
    wide = arithmetic_dtype(a.dtype, s.dtype, c.dtype if isinstance(c, Tensor) else None)
    k = 0.5 if _halves(wide, a.dtype, s.dtype) else 1.0
    hi, x = a.to(wide, copy=True), s.to(wide, copy=True)  # never an alias of a mutated input
    w = weight.to(wide)
    hi_k, x_k = (hi * k, x * k) if k != 1.0 else (hi, x)
    lo = _decode(c, a, wide)
    if lo is None:
        t = torch.where(w == 1.0, x_k, hi_k + w * (x_k - hi_k))
        a.copy_(torch.where(w == 0.0, a, (t * (1.0 / k)).to(a.dtype)))
        return
    lo_k = lo * k if k != 1.0 else lo
    y = lo_k + w * ((x_k - hi_k) - lo_k)
    t = hi_k + y
    bp = t - hi_k
    err = (hi_k - (t - bp)) + (y - bp)  # TwoSum: t + err == hi_k + y exactly
    t = torch.where(w == 1.0, x_k, t)
    err = torch.where(w == 1.0, torch.zeros_like(err), err)
    r = round_to(t, a.dtype)  # on the average's grid; t - r is exact
    # times 1/k, not divided by k: the same value (k is a power of two) without a division,
    # the slowest vector instruction of the loop on a CPU
    new_hi, new_lo = r * (1.0 / k), ((t - r) + err) * (1.0 / k)
    keep = w == 0.0
    if isinstance(c, tuple):  # selected as int32: a select of int8 lanes compiles 10x slower
        q = _count(c)
        high, low = _planes(torch.where(keep, q, _encode(new_lo, new_hi.to(F32), q, a)))
        c[1].copy_(low)
        c[0].copy_(high)
    elif c is not None:
        c.copy_(torch.where(keep, c, new_lo.to(c.dtype)))
    a.copy_(torch.where(keep, a, new_hi.to(a.dtype)))


# the eager kernel ------------------------------------------------------------------------


@torch.no_grad()
def lerp_(
    avg: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Weight,
    comp: Sequence[Tensor] | None = None,
) -> None:
    """In place, ``avg[i] <- avg[i] + weight * (src[i] - avg[i])``; with ``comp``, compensated
    so that ``avg[i] + comp[i]`` follows the exact EMA (see the module docstring). The dtype
    of ``comp`` selects the scheme: a floating one holds the low part itself, int8 (shape
    ``(2, *avg.shape)``) holds it as a 16-bit fixed-point count in two byte planes (6 bytes
    per element with an fp32 average).

    ``weight`` (= 1 - smoothing) is a float in [0, 1] or a 0-d float tensor on ``avg``'s
    device. Lists must be homogeneous (``check_operands``). Eager ``torch._foreach_*`` calls:
    without ``comp`` one ``lerp`` for fp16, three passes for an fp32 or fp64 average and a
    float weight (``d/2``, then ``avg + 2w * d/2``: no overflow, bit for bit ``torch.lerp``'s
    result on a CPU); with a floating ``comp`` about ten passes (use ``FusedLerp`` for one);
    with an int8 ``comp`` the fused kernel's body, tensor by tensor.

    >>> import torch
    >>> avg, comp = [torch.ones(1)], [torch.zeros(1)]
    >>> for _ in range(1000):  # 1000 increments of 6.9e-11, each under half an fp32 ulp
    ...     lerp_(avg, [torch.full((1,), 1.001)], 6.9e-8, comp)
    >>> round((avg[0].double() + comp[0].double()).item() - 1.0, 10)  # plain fp32: 0.0
    6.9e-08
    """
    _check_call(avg, src, weight, comp)
    if not avg:
        return
    avg, src = list(avg), list(src)
    comp = None if comp is None else list(comp)
    if not isinstance(weight, Tensor):
        weight = float(weight)
        if weight == 0.0:
            return
    if comp is not None and comp[0].dtype == I8:
        _fixed(avg, src, weight, comp)
    elif not isinstance(weight, Tensor) and weight == 1.0:  # (a tensor is never compared)
        torch._foreach_copy_(avg, src)
        if comp is not None:
            torch._foreach_copy_(comp, torch._foreach_sub(src, avg))  # the conversion's rest
    elif comp is None:
        _plain(avg, src, weight)
    elif comp[0].dtype == avg[0].dtype in (F32, F64) and _narrower(src[0].dtype, avg[0].dtype):
        _by_pieces(_compensated, avg, src, weight, comp)
    else:
        _by_pieces(_wide, avg, src, weight, comp)


def _narrower(a: torch.dtype, b: torch.dtype) -> bool:
    """Whether every value of ``a`` is one of ``b``."""
    return torch.promote_types(a, b) == b and (a != BF16 or b != F16)


def _by_pieces(fn, avg: list[Tensor], src: list[Tensor], weight: Weight, comp) -> None:
    """``fn(avg, src, weight, comp)``, big contiguous tensors in pieces of ``_PIECE``
    elements (their temporaries stay in the cache instead of faulting in fresh pages)."""
    big = {i for i in _big(avg, src) if comp is None or comp[i].is_contiguous()}
    if not big:
        fn(avg, src, weight, comp)
        return
    rest = [i for i in range(len(avg)) if i not in big]
    if rest:
        fn([avg[i] for i in rest], [src[i] for i in rest], weight,
           None if comp is None else [comp[i] for i in rest])
    for i in big:
        _in_pieces(fn, avg[i], src[i], weight, None if comp is None else comp[i])


def _in_pieces(fn, avg: Tensor, src: Tensor, weight: Weight, comp: Tensor | None) -> None:
    a, s = avg.view(-1), src.view(-1)
    c = None if comp is None else comp.view(-1)
    for start in range(0, a.numel(), _PIECE):
        p = slice(start, start + _PIECE)
        fn([a[p]], [s[p]], weight, None if c is None else [c[p]])


def _half_diff(avg: list[Tensor], src: list[Tensor]) -> list[Tensor]:
    """``(src - avg) / 2`` in the wider dtype of the two, without forming ``src - avg``."""
    wide = torch.promote_types(avg[0].dtype, src[0].dtype)
    d: list[Tensor]
    if wide == avg[0].dtype:
        d = list(torch._foreach_mul(avg, -0.5))
        torch._foreach_add_(d, src, alpha=0.5)
    else:
        d = list(torch._foreach_mul(src, 0.5)) if wide == src[0].dtype else [
            s.to(wide) * 0.5 for s in src
        ]
        torch._foreach_sub_(d, avg, alpha=0.5)
    return d


def _plain(avg: list[Tensor], src: list[Tensor], weight: Weight) -> None:
    dtype = avg[0].dtype
    if isinstance(weight, Tensor) or dtype == F16 and src[0].dtype != F16:
        _wide(avg, src, weight, None)
    elif dtype == F16:  # computed in fp32: |src - avg| <= 2 * 65504 cannot overflow
        torch._foreach_lerp_(avg, src, weight)
    elif dtype == BF16 and src[0].dtype == BF16:  # 2 * lerp(avg/2, src/2): lerp's own rounding
        torch._foreach_mul_(avg, 0.5)
        torch._foreach_lerp_(avg, torch._foreach_mul(src, 0.5), weight)
        torch._foreach_mul_(avg, 2.0)
    else:
        _lerp_halved(avg, src, weight)


# Big tensors are done in pieces of _PIECE elements through one scratch buffer: a fresh
# full-size temporary costs more in page faults than the arithmetic (8M fp32: 25 ms against
# 2.7 ms for torch.lerp), a piece stays in the cache.
_PIECE = 1 << 17


def _lerp_halved(avg: list[Tensor], src: list[Tensor], weight: float) -> None:
    """``avg + w * d`` below 1/2, ``src - (1 - w) * d`` from 1/2 on (``torch.lerp``'s forms,
    one fused multiply-add each on a CPU), from ``d/2``; ``1 - w`` is exact in the weight's
    dtype."""
    wide = torch.promote_types(avg[0].dtype, src[0].dtype)
    if weight >= 0.5:
        weight = torch.tensor(weight, dtype=wide).item()  # as lerp rounds it
    big = _big(avg, src)
    small = [i for i in range(len(avg)) if i not in big] if big else range(len(avg))
    if small:
        sa, ss = (avg, src) if not big else ([avg[i] for i in small], [src[i] for i in small])
        d = _half_diff(sa, ss)
        if weight < 0.5:
            torch._foreach_add_(sa, d, alpha=2.0 * weight)
        else:
            torch._foreach_copy_(sa, torch._foreach_add(ss, d, alpha=2.0 * weight - 2.0))
    if big:
        scratch = torch.empty(_PIECE, dtype=wide, device=avg[0].device)
        for i in big:
            a, s = avg[i].view(-1), src[i].view(-1)
            for start in range(0, a.numel(), _PIECE):
                _lerp_piece(a[start:start + _PIECE], s[start:start + _PIECE], weight, scratch)


def _big(avg: list[Tensor], src: list[Tensor]) -> set[int]:
    """Indices of the contiguous tensors of at least ``_PIECE`` elements."""
    if max(a.numel() for a in avg) < _PIECE:
        return set()
    return {i for i, (a, s) in enumerate(zip(avg, src, strict=True))
            if a.numel() >= _PIECE and a.is_contiguous() and s.is_contiguous()}


def _lerp_piece(a: Tensor, s: Tensor, weight: float, scratch: Tensor) -> None:
    d = scratch[: a.numel()]
    if d.dtype == a.dtype:
        torch.mul(a, -0.5, out=d)
        d.add_(s, alpha=0.5)
    else:
        torch.mul(s, 0.5, out=d)
        d.sub_(a, alpha=0.5)
    if weight < 0.5:
        a.add_(d, alpha=2.0 * weight)
    else:
        a.copy_(torch.add(s, d, alpha=2.0 * weight - 2.0, out=d))


def _scaled(ts: list[Tensor], wide: torch.dtype, factor: float) -> list[Tensor]:
    """A new list: ``ts`` times ``factor`` (exact: 1 or 1/2) in ``wide``."""
    if ts[0].dtype == wide:
        return list(torch._foreach_mul(ts, factor))
    out = [t.to(wide) for t in ts]
    if factor != 1.0:
        torch._foreach_mul_(out, factor)
    return out


def _mix_(lo: list[Tensor], d: list[Tensor], weight: Weight) -> None:
    """``lo <- lo + weight * (d - lo)`` (``d`` is spent with a tensor weight)."""
    if isinstance(weight, Tensor):
        torch._foreach_sub_(d, lo)
        torch._foreach_mul_(d, weight)
        torch._foreach_add_(lo, d)
    else:
        torch._foreach_lerp_(lo, d, weight)


def _compensated(avg: list[Tensor], src: list[Tensor], weight: Weight, comp: list[Tensor]):
    """fp32 or fp64 average and compensation, a source no wider: the update at half scale
    (the average's own dtype has no room for ``src - avg``)."""
    d = _half_diff(avg, src)  # d/2
    torch._foreach_mul_(comp, 0.5)
    _mix_(comp, d, weight)  # comp = y/2
    t = torch._foreach_add(comp, avg, alpha=0.5)  # t/2 = fl(hi/2 + y/2)
    moved = torch._foreach_sub(t, avg, alpha=0.5)  # t/2 - hi/2, exact (Sterbenz)
    torch._foreach_sub_(comp, moved)  # the rounding's error, halved
    torch._foreach_mul_(comp, 2.0)
    torch._foreach_mul_(t, 2.0)
    torch._foreach_copy_(avg, t)


def _wide(avg: list[Tensor], src: list[Tensor], weight: Weight, comp: list[Tensor] | None):
    """Every other combination: the arithmetic in ``W`` (new lists), at half scale where
    ``W`` has no room for the differences; the rounding into a narrower average goes into
    the compensation."""
    dtype = avg[0].dtype
    wide = arithmetic_dtype(dtype, src[0].dtype, None if comp is None else comp[0].dtype)
    scale = 0.5 if _halves(wide, dtype, src[0].dtype) else 1.0
    hi = _scaled(avg, wide, scale)
    d = list(torch._foreach_mul(hi, -1.0))
    torch._foreach_add_(d, src, alpha=scale)  # scale * (src - avg)
    if comp is None:
        if isinstance(weight, Tensor):
            torch._foreach_mul_(d, weight)
            torch._foreach_add_(hi, d)
        else:
            torch._foreach_add_(hi, d, alpha=weight)
        lo = None
    else:
        lo = _scaled(comp, wide, scale)
        _mix_(lo, d, weight)  # scale * y
        t = list(torch._foreach_add(hi, lo))  # scale * t
        torch._foreach_sub_(hi, t)
        torch._foreach_add_(lo, hi)  # scale * (y - (t - hi))
        hi = t
    if scale != 1.0:
        torch._foreach_mul_(hi, 1.0 / scale)
    torch._foreach_copy_(avg, hi)
    if lo is None:
        return
    if scale != 1.0:
        torch._foreach_mul_(lo, 1.0 / scale)
    if dtype != wide:
        torch._foreach_add_(lo, torch._foreach_sub(hi, avg))  # t - round(t), exact
    if comp is not None:
        torch._foreach_copy_(comp, lo)


def _fixed(avg: list[Tensor], src: list[Tensor], weight: Weight, comp: list[Tensor]) -> None:
    """16-bit fixed-point compensation: the fused kernel's body, tensor by tensor."""
    wide = arithmetic_dtype(avg[0].dtype, src[0].dtype, comp[0].dtype)
    if isinstance(weight, Tensor):
        w = weight.to(wide)
    else:
        w = torch.tensor(weight, dtype=wide, device=avg[0].device)
    for a, s, c in zip(avg, src, comp, strict=True):
        if a.numel() > _PIECE and a.is_contiguous() and s.is_contiguous() and _flat(c):
            a, s, c = a.view(-1), s.view(-1), c.view(2, -1)  # pieces: cache-sized temporaries
            for i in range(0, a.numel(), _PIECE):
                piece = slice(i, i + _PIECE)
                _fused_one(a[piece], s[piece], (c[0, piece], c[1, piece]), w)
        elif a.numel():
            _fused_one(a, s, (c[0], c[1]), w)


def compiler_present(device: torch.device | str) -> bool:
    """Whether a compiler for ``device`` is at hand: Triton for CUDA, a C++ compiler for the
    CPU. Cheap and loads no compiler stack (``import emakit`` and building an average stay
    light); :func:`compilation_available` says the rest when the fused kernel first runs."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            import importlib.util

            return importlib.util.find_spec("triton") is not None
        if device.type == "cpu":
            return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))
    except Exception:  # an incomplete build: no compiler at all
        return False
    return False


def compilation_available(device: torch.device | str) -> bool:
    """Whether ``torch.compile`` (inductor) can be expected to build kernels for ``device``:
    Triton for CUDA, a C++ compiler for the CPU, and dynamo supporting this Python. Loads
    ``torch._dynamo``: called when a fused kernel first runs. A failure at the first compile
    is still caught by ``FusedLerp``, which then falls back to ``lerp_``."""
    if not compiler_present(device):
        return False
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return False
        if torch.device(device).type == "cuda":
            from torch.utils._triton import has_triton

            return bool(has_triton())
    except Exception:  # an incomplete torch build: no compiler stack at all
        return False
    return True


def _dynamo_errors() -> type[Exception]:
    """dynamo's exception base (imported only once a compiled kernel runs)."""
    from torch._dynamo.exc import TorchDynamoException

    return TorchDynamoException


class FusedLerp:
    """``lerp_`` (same arguments, same semantics) as one compiled kernel per tensor: the
    source is read once, the average (and compensation) read once and written once, e.g.
    10 bytes per element for a bf16 model into an fp32 average (about 18 eagerly), 20 for
    an fp32 model with an fp32 compensation (about 100 eagerly), 16 with a 16-bit one.

    One kernel serves every tensor of a dtype combination: it is compiled with dynamic
    shapes over 1-D views, so the compile count does not grow with the model (a compile
    over a whole list of tensors took minutes for 292 tensors), and each dtype combination
    has its own compiled function (its own dynamo cache). The weight always reaches
    it as a 0-d device tensor in the arithmetic dtype (fp64 for an fp64 average or source,
    else fp32; a float is written into one kept per device and dtype), so a new weight value
    never recompiles: warmup and schedules reuse one kernel. Each call still launches one
    kernel per tensor from Python (tens of microseconds each on a host): on CUDA put it in a
    ``CUDAGraphUpdate`` when there are many tensors, or call it on flat buffers.

    Tensors of fewer than ``eager_below`` elements go to the eager ``lerp_`` instead, as one
    ``_foreach`` call chain for all of them: for small tensors launches cost more than bytes
    (ResNet-50's BatchNorm vectors), and a few foreach launches beat one launch each (a
    16-bit compensation has no foreach form: every tensor takes the compiled kernel). Where
    compiling is unavailable or fails, calls fall back to the eager ``lerp_`` and
    ``compiled`` reads False.

    >>> import torch
    >>> fused = FusedLerp(compile=False)  # eager here, to keep the doctest fast
    >>> avg, src = [torch.zeros(3)], [torch.ones(3, dtype=torch.bfloat16)]
    >>> fused(avg, src, torch.tensor(0.25)); avg[0]
    tensor([0.2500, 0.2500, 0.2500])
    """

    _count = 0

    def __init__(self, *, compile: bool = True, eager_below: int = 1 << 16) -> None:
        self.compiled = bool(compile)
        self.eager_below = int(eager_below)
        self._weights: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._checked: set[torch.device] = set()
        self._fns: dict[tuple, Callable[..., None]] = {}

    def _kernel(self, key: tuple) -> Callable[..., None]:
        """The compiled body for one dtype combination ``key``. Each is a fresh code object:
        dynamo keeps its compile cache (and its recompile limit) per code object, so dtype
        combinations and instances never evict each other's kernels."""
        fn = self._fns.get(key)
        if fn is None:
            FusedLerp._count += 1
            code = _fused_one.__code__.replace(co_name=f"_fused_lerp_{FusedLerp._count}")
            body = types.FunctionType(code, _fused_one.__globals__, code.co_name)
            fn = self._fns[key] = torch.compile(body, fullgraph=True, dynamic=True)
        return fn

    def _device_weight(self, weight: Weight, device: torch.device, dtype: torch.dtype) -> Tensor:
        if isinstance(weight, Tensor):
            return weight if weight.dtype == dtype else weight.to(dtype)
        w = self._weights.get((device, dtype))
        if w is None:
            w = self._weights[device, dtype] = torch.empty((), dtype=dtype, device=device)
        w.fill_(float(weight))  # a device-side fill: no synchronization
        return w

    def _ready(self, device: torch.device) -> bool:
        if self.compiled and device not in self._checked:
            if not compilation_available(device):
                self.compiled = False
            self._checked.add(device)
        return self.compiled

    @torch.no_grad()
    def __call__(
        self,
        avg: Sequence[Tensor],
        src: Sequence[Tensor],
        weight: Weight,
        comp: Sequence[Tensor] | None = None,
    ) -> None:
        _check_call(avg, src, weight, comp)
        if not avg:
            return
        if not self._ready(avg[0].device):
            lerp_(avg, src, weight, comp)
            return
        wide = arithmetic_dtype(avg[0].dtype, src[0].dtype, None if not comp else comp[0].dtype)
        w = self._device_weight(weight, avg[0].device, wide)
        below = self.eager_below if comp is None or comp[0].dtype != I8 else 1
        rest = self._compiled(avg, src, w, comp, below)
        if rest:
            lerp_(
                [avg[i] for i in rest],
                [src[i] for i in rest],
                w if isinstance(weight, Tensor) else weight,
                None if comp is None else [comp[i] for i in rest],
            )

    def _compiled(self, avg, src, w: Tensor, comp, below: int) -> list[int]:
        """Run the compiled kernel on each tensor of at least ``below`` elements; return the
        indices left to the eager ``lerp_``."""
        rest: list[int] = []
        key = (avg[0].dtype, src[0].dtype, None if comp is None else comp[0].dtype, w.dtype)
        fn = self._kernel(key)
        for i in range(len(avg)):
            a, s = avg[i], src[i]
            if a.numel() < below:
                rest.append(i)
                continue
            c = None if comp is None else comp[i]
            if a.is_contiguous() and s.is_contiguous() and _flat(c):
                a, s = a.view(-1), s.view(-1)  # one compiled kernel for every shape
                c = None if c is None else c.view(-1) if c.dtype != I8 else c.view(2, -1)
            if c is not None and c.dtype == I8:
                c = (c[0], c[1])
            try:
                fn(a, s, c, w)
            except _dynamo_errors() as e:
                # raised while compiling tensor i, before its kernel ran: the tensors
                # before i are updated, i and the rest are done eagerly, so the update
                # is whole either way
                _log.warning("FusedLerp: compiling failed (%s); using the eager lerp_", e)
                self.compiled = False
                return rest + list(range(i, len(avg)))
        return rest


def _flat(c: Tensor | None) -> bool:
    """Whether ``c`` (or each of its byte planes) is contiguous."""
    if c is None:
        return True
    return c[0].is_contiguous() and c[1].is_contiguous() if c.dtype == I8 else c.is_contiguous()


class CUDAGraphUpdate:
    """An update captured once in a CUDA graph and replayed: one launch for a fixed list of
    kernel calls, whatever the number of tensors.

    ``fn(weight)`` runs the update (e.g. ``lambda w: lerp_(avg, src, w, comp)`` or a
    ``FusedLerp`` call) with ``weight`` a 0-d tensor of ``dtype`` (float64 by default, so
    that an fp64 average gets its factor unrounded; the kernels use it in their arithmetic
    dtype); it must leave the average unchanged at weight 0 (``lerp_`` and ``FusedLerp``
    do, for finite sources), because it is warmed up (compiled, allocated) at weight 0 on a
    side stream before the capture. ``update(weight)`` writes ``weight`` into the static
    tensor and replays; ``recapture()`` drops the graph, so that the next update captures
    ``fn`` again: call it when the tensors ``fn`` reads or writes change (the graph holds
    their addresses).
    """

    def __init__(
        self,
        fn: Callable[[Tensor], None],
        device: torch.device | str,
        warmup: int = 2,
        dtype: torch.dtype = F64,
    ):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device: expected a CUDA device, got {device}")
        self.fn = fn
        self.device = device
        self.warmup = int(warmup)
        self.weight = torch.zeros((), dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def capture(self) -> None:
        """Warm ``fn`` up at weight 0 (compiles, allocator pools) and capture it."""
        with torch.cuda.device(self.device):
            self.weight.fill_(0.0)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self.fn(self.weight)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.fn(self.weight)
        self.graph = graph

    def recapture(self) -> None:
        self.graph = None

    def update(self, weight: Weight) -> None:
        _check_weight(weight, [self.weight])
        if self.graph is None:
            self.capture()
        if isinstance(weight, Tensor):
            self.weight.copy_(weight)
        else:
            self.weight.fill_(float(weight))
        graph = self.graph
        assert graph is not None  # captured just above
        graph.replay()

    __call__ = update
