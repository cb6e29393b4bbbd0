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
(``hi = avg``, ``lo = comp``, all in the storage precision)::

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
A ``comp`` of a narrower dtype (bf16) stores ``lo`` rounded: it keeps 8 more bits, not 24,
and itself freezes once ``w * |src - e|`` falls under ``2**-9 * |lo|`` (measured in
``benchmarks/accuracy.py``).

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
an fp32 average): it is converted inside the arithmetic.
"""

from __future__ import annotations

import logging
import os
import shutil
import types
from collections.abc import Callable, Sequence

import torch
import torch._dynamo
from torch import Tensor

__all__ = [
    "lerp_",
    "check_operands",
    "FusedLerp",
    "CUDAGraphUpdate",
    "compilation_available",
]

_log = logging.getLogger(__name__)

Weight = float | Tensor


def check_operands(
    avg: Sequence[Tensor], src: Sequence[Tensor], comp: Sequence[Tensor] | None = None
) -> None:
    """Raise a clear error unless ``lerp_(avg, src, w, comp)`` may run on these lists.

    Every list is homogeneous (one dtype, one device), ``avg`` is floating, ``src`` is
    floating on ``avg``'s device with the same shapes, ``comp`` (if any) has ``avg``'s
    shapes and device. Loops over the tensors: call it when building a plan.

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
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}]: expected a Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}]: expected a floating dtype, got {t.dtype}")
            if (t.dtype, t.device) != (ts[0].dtype, ts[0].device):
                raise ValueError(
                    f"{name}[{i}]: expected {ts[0].dtype} on {ts[0].device} like {name}[0] "
                    f"(group lists by dtype and device), got {t.dtype} on {t.device}"
                )
            if t.device != avg[i].device:
                raise ValueError(f"{name}[{i}]: expected device {avg[i].device}, got {t.device}")
            if t.shape != avg[i].shape:
                raise ValueError(
                    f"{name}[{i}]: expected shape {tuple(avg[i].shape)} like avg[{i}], "
                    f"got {tuple(t.shape)}"
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


def _check_lengths(avg: Sequence[Tensor], src: Sequence[Tensor], comp) -> None:
    if len(src) != len(avg):
        raise ValueError(f"src: expected {len(avg)} tensors like avg, got {len(src)}")
    if comp is not None and len(comp) != len(avg):
        raise ValueError(f"comp: expected {len(avg)} tensors like avg, got {len(comp)}")


@torch.no_grad()
def lerp_(
    avg: Sequence[Tensor],
    src: Sequence[Tensor],
    weight: Weight,
    comp: Sequence[Tensor] | None = None,
) -> None:
    """In place, ``avg[i] <- avg[i] + weight * (src[i] - avg[i])``; with ``comp``, compensated
    so that ``avg[i] + comp[i]`` follows the exact EMA (see the module docstring).

    ``weight`` (= 1 - smoothing) is a float in [0, 1] or a 0-d float tensor on ``avg``'s
    device. Lists must be homogeneous (``check_operands``). Eager ``torch._foreach_*`` calls:
    without ``comp`` one ``lerp`` for a float weight and a same-dtype ``src``; with ``comp``
    six passes (use ``FusedLerp`` for one).

    >>> import torch
    >>> avg, comp = [torch.ones(1)], [torch.zeros(1)]
    >>> for _ in range(1000):  # 1000 increments of 6.9e-11, each under half an fp32 ulp
    ...     lerp_(avg, [torch.full((1,), 1.001)], 6.9e-8, comp)
    >>> round((avg[0].double() + comp[0].double()).item() - 1.0, 10)  # plain fp32: 0.0
    6.9e-08
    """
    _check_lengths(avg, src, comp)
    _check_weight(weight, avg)
    if not avg:
        return
    avg, src = list(avg), list(src)
    tensor_w = isinstance(weight, Tensor)
    if not tensor_w:
        weight = float(weight)
        if weight == 0.0:
            return
        if weight == 1.0:
            torch._foreach_copy_(avg, src)
            if comp is not None:
                torch._foreach_copy_(list(comp), torch._foreach_sub(src, avg))
            return
    same = src[0].dtype == avg[0].dtype
    if comp is None:
        if same and not tensor_w:
            torch._foreach_lerp_(avg, src, weight)
            return
        d = torch._foreach_sub(src, avg)  # promotes a narrower src without a staging copy
        if tensor_w:
            torch._foreach_mul_(d, weight)
            torch._foreach_add_(avg, d)
        else:
            torch._foreach_add_(avg, d, alpha=weight)
        return
    comp = list(comp)
    d = torch._foreach_sub(src, avg)  # d = src - hi, in the wider of the two precisions
    wide = d[0].dtype
    if comp[0].dtype == wide == avg[0].dtype:
        if tensor_w:
            torch._foreach_sub_(d, comp)
            torch._foreach_mul_(d, weight)
            torch._foreach_add_(comp, d)  # comp = y = lo + w (d - lo)
        else:
            torch._foreach_lerp_(comp, d, weight)  # comp = y
        t = torch._foreach_add(avg, comp)  # t = fl(hi + y)
        torch._foreach_sub_(avg, t)  # avg = hi - t, exact (Sterbenz)
        torch._foreach_add_(comp, avg)  # comp = y - (t - hi)
        torch._foreach_copy_(avg, t)
        return
    # A comp or an average narrower than the arithmetic: y, t and the remainder stay wide
    # until they are stored, and the rounding of t into avg goes into comp too.
    torch._foreach_sub_(d, comp)
    torch._foreach_mul_(d, weight)
    torch._foreach_add_(d, comp)  # d = y
    t = torch._foreach_add(d, avg)
    rest = torch._foreach_sub(avg, t)
    torch._foreach_add_(rest, d)  # rest = y - (t - hi)
    torch._foreach_copy_(avg, t)
    if avg[0].dtype != wide:
        torch._foreach_sub_(t, avg)  # t - round(t), exact
        torch._foreach_add_(rest, t)
    torch._foreach_copy_(comp, rest)


def _fused_one(a: Tensor, s: Tensor, c: Tensor | None, weight: Tensor) -> None:
    # One fused pass over one tensor: read a, s, c once, write a and c once. The arithmetic
    # runs in at least fp32 (``acc``); TwoSum (not Fast2Sum) because it is exact for any
    # magnitudes and costs nothing in a memory-bound kernel.
    acc = torch.promote_types(a.dtype, torch.float32)
    hi, x = a.to(acc, copy=True), s.to(acc, copy=True)  # never an alias of a mutated input
    w = weight.to(acc)
    if c is None:
        new = torch.where(w == 1.0, x, hi + w * (x - hi)).to(a.dtype)
        a.copy_(torch.where(w == 0.0, a, new))
        return
    lo = c.to(acc, copy=True)
    y = lo + w * ((x - hi) - lo)
    t = hi + y
    bp = t - hi
    err = (hi - (t - bp)) + (y - bp)  # TwoSum: t + err == hi + y exactly
    t = torch.where(w == 1.0, x, t)
    err = torch.where(w == 1.0, torch.zeros_like(err), err)
    new_hi = t.to(a.dtype)
    new_lo = ((t - new_hi.to(acc)) + err).to(c.dtype)
    keep = w == 0.0
    a.copy_(torch.where(keep, a, new_hi))
    c.copy_(torch.where(keep, c, new_lo))


def compilation_available(device: torch.device | str) -> bool:
    """Whether ``torch.compile`` (inductor) can be expected to build kernels for ``device``:
    Triton for CUDA, a C++ compiler for the CPU. A failure at the first compile is still
    caught by ``FusedLerp``, which then falls back to ``lerp_``."""
    device = torch.device(device)
    try:
        if not torch._dynamo.is_dynamo_supported():
            return False
        if device.type == "cuda":
            from torch.utils._triton import has_triton

            return has_triton()
        if device.type == "cpu":
            return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++"))
    except Exception:  # an incomplete torch build: no compiler stack at all
        return False
    return False


class FusedLerp:
    """``lerp_`` (same arguments, same semantics) as one compiled kernel per tensor: the
    source is read once, the average (and compensation) read once and written once, e.g.
    10 bytes per element for a bf16 model into an fp32 average (about 18 eagerly), 20 for
    an fp32 model with an fp32 compensation (about 68 eagerly).

    One kernel serves every tensor of a dtype combination: it is compiled with dynamic
    shapes over 1-D views, so the compile count does not grow with the model (a compile
    over a whole list of tensors took minutes for 292 tensors). The weight always reaches
    it as a 0-d float32 device tensor (a float is written into one kept per device), so a
    new weight value never recompiles: warmup and schedules reuse one kernel. Each call
    still launches one kernel per tensor from Python (tens of microseconds each on a host):
    on CUDA put it in a ``CUDAGraphUpdate`` when there are many tensors, or call it on flat
    buffers. Each instance compiles its own copy of the body (its own dynamo cache).

    Tensors of fewer than ``eager_below`` elements go to the eager ``lerp_`` instead, as one
    ``_foreach`` call chain for all of them: for small tensors launches cost more than bytes
    (ResNet-50's BatchNorm vectors), and a few foreach launches beat one launch each. Where
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
        self._weights: dict[torch.device, Tensor] = {}
        self._checked: set[torch.device] = set()
        self._fn: Callable[..., None] | None = None
        if compile:
            FusedLerp._count += 1
            # A fresh code object: dynamo keeps its compile cache per code object, so
            # instances never evict each other's kernels.
            code = _fused_one.__code__.replace(co_name=f"_fused_lerp_{FusedLerp._count}")
            body = types.FunctionType(code, _fused_one.__globals__, code.co_name)
            self._fn = torch.compile(body, fullgraph=True, dynamic=True)

    def _device_weight(self, weight: Weight, device: torch.device) -> Tensor:
        if isinstance(weight, Tensor):
            return weight if weight.dtype == torch.float32 else weight.float()
        w = self._weights.get(device)
        if w is None:
            w = self._weights[device] = torch.empty((), dtype=torch.float32, device=device)
        w.fill_(float(weight))  # a device-side fill: no synchronization
        return w

    @torch.no_grad()
    def __call__(
        self,
        avg: Sequence[Tensor],
        src: Sequence[Tensor],
        weight: Weight,
        comp: Sequence[Tensor] | None = None,
    ) -> None:
        _check_lengths(avg, src, comp)
        _check_weight(weight, avg)
        if not avg:
            return
        device = avg[0].device
        if self.compiled and device not in self._checked:
            if not compilation_available(device):
                self.compiled = False
            self._checked.add(device)
        if not self.compiled:
            lerp_(avg, src, weight, comp)
            return
        w = self._device_weight(weight, device)
        fn = self._fn
        small: list[int] = []
        for i in range(len(avg)):
            a, s = avg[i], src[i]
            if a.numel() < self.eager_below:
                small.append(i)
                continue
            c = None if comp is None else comp[i]
            if a.is_contiguous() and s.is_contiguous() and (c is None or c.is_contiguous()):
                a, s = a.view(-1), s.view(-1)  # one compiled kernel for every shape
                c = None if c is None else c.view(-1)
            try:
                fn(a, s, c, w)
            except torch._dynamo.exc.TorchDynamoException as e:
                # raised while compiling tensor i, before its kernel ran: the tensors
                # before i are updated, i and the rest are done eagerly, so the update
                # is whole either way
                _log.warning("FusedLerp: compiling failed (%s); using the eager lerp_", e)
                self.compiled = False
                small.extend(range(i, len(avg)))
                break
        if small:
            lerp_(
                [avg[i] for i in small],
                [src[i] for i in small],
                w if isinstance(weight, Tensor) else weight,
                None if comp is None else [comp[i] for i in small],
            )


class CUDAGraphUpdate:
    """An update captured once in a CUDA graph and replayed: one launch for a fixed list of
    kernel calls, whatever the number of tensors.

    ``fn(weight)`` runs the update (e.g. ``lambda w: lerp_(avg, src, w, comp)`` or a
    ``FusedLerp`` call) with ``weight`` a 0-d float32 tensor; it must leave the average
    unchanged at weight 0 (``lerp_`` and ``FusedLerp`` do, for finite sources), because it
    is warmed up (compiled, allocated) at weight 0 on a side stream before the capture.
    ``update(weight)`` writes ``weight`` into the static tensor and replays; ``recapture()``
    drops the graph, so that the next update captures ``fn`` again: call it when the tensors
    ``fn`` reads or writes change (the graph holds their addresses).
    """

    def __init__(self, fn: Callable[[Tensor], None], device: torch.device | str, warmup: int = 2):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device: expected a CUDA device, got {device}")
        self.fn = fn
        self.device = device
        self.warmup = int(warmup)
        self.weight = torch.zeros((), dtype=torch.float32, device=device)
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
        self.graph.replay()

    __call__ = update
