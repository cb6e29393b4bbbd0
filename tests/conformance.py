"""One conformance case: a model, an EMA configuration and a sequence of training events, run
beside the float64 oracle of ``tests/oracle.py`` with every export, swap, forward pass and
resumed state checked against it. ``tests/test_conformance.py`` draws the cases (hypothesis);
``tests/conformance_worker.py`` runs them on several gloo processes (``shard=True``, FSDP2,
FSDP1), where each rank applies the same model values to its part.

A case is plain data (JSON for the worker). Its model holds one tensor per
:class:`TensorSpec`, each in its own submodule ``parts.<name>`` (one dtype per FSDP unit), plus
an integer buffer; its forward pass is linear in every floating tensor (``sum_t <t, x_t>`` in
float64), so the oracle's output is exact and its error bound follows from the elements'.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import io
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from oracle import BOUNDS, Law, Oracle, Timing, element_bound
from torch import Tensor, nn

import emakit
from emakit.schedules import RatioRamp

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}

#: The size thresholds of the engine, which every size class straddles: runs of at least 8
#: tensors of at most GATHER_MAX elements are gathered; the fused kernel compiles for tensors
#: of 65,536 elements and more; sources of another dtype are staged in chunks of 2**20.
GATHER_MAX = 2048
EAGER_BELOW = 1 << 16
STAGING = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the case's model.

    ``role``: ``"param"`` (trains), ``"frozen"`` (a parameter that does not), ``"buffer"`` (a
    floating buffer). ``magnitude``: ``"normal"`` (values near 1 that move by 1e-3 per step
    at random), ``"drift"`` (values near 1 that grow by 1e-3 per step), ``"denormal"``
    (subnormal in the narrower of the model and storage dtypes), ``"large"`` (90% of the
    largest finite value of the narrower of the two, signs flipping)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    role: str = "param"
    transposed: bool = False
    magnitude: str = "normal"


@dataclass(frozen=True)
class Case:
    tensors: tuple[TensorSpec, ...]
    executor: str = "eager"
    storage: str | None = "float32"
    compensated: bool = True
    buffers: str = "average"
    law: tuple[str, float] = ("half_life", 10.0)  # or ("smoothing", s), ("cosine", total),
    #                                               ("ratio", decay)
    warmup: tuple[float, float, float] | None = None
    start: int = 0
    interval: int = 1
    switch_every: int | None = None
    grad_scaler: bool = False
    exclude: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    flat: bool = False
    tie: bool = False
    events: tuple[str, ...] = ("step",) * 5
    seed: int = 0
    placement: str = "whole"
    device: str = "cpu"  # "cuda" for the graph executor

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Case:
        data = dict(data)
        data["tensors"] = tuple(TensorSpec(**{**t, "shape": tuple(t["shape"])})
                                for t in data["tensors"])
        for key in ("law", "warmup", "exclude", "include", "events"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    def storage_of(self, spec: TensorSpec) -> torch.dtype:
        """The storage dtype of this tensor, as documented: the one asked for (``None``: the
        tensor's own), except that ``float32`` (the default) is never narrower than the
        model's dtype (an fp64 tensor gets an fp64 average)."""
        model = DTYPES[spec.dtype]
        if self.storage is None:
            return model
        asked = DTYPES[self.storage]
        return torch.float64 if asked == torch.float32 and model == torch.float64 else asked


# the model --------------------------------------------------------------------------------


class Part(nn.Module):
    """One tensor, ``t``: a parameter (trainable or frozen) or a buffer."""

    def __init__(self, spec: TensorSpec, value: Tensor) -> None:
        super().__init__()
        if spec.role == "buffer":
            self.register_buffer("t", value)
        else:
            self.t = nn.Parameter(value, requires_grad=spec.role == "param")

    def forward(self, x: Tensor) -> Tensor:
        return (self.t.detach().double() * x).sum()


class MatrixModel(nn.Module):
    def __init__(self, case: Case) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(case.seed)
        self.parts = nn.ModuleDict({
            s.name: Part(s, _initial(s, case, g)) for s in case.tensors
        })
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        if case.tie:  # one parameter under a second name
            first = next(s.name for s in case.tensors if s.role != "buffer")
            self.tied = nn.Module()
            self.tied.t = self.parts[first].t

    def forward(self, xs: dict[str, Tensor]) -> Tensor:
        # through each part's own forward: FSDP gathers a unit's parameters there
        out = torch.zeros((), dtype=torch.float64, device=self.count.device)
        for name, part in self.parts.items():
            out = out + part(xs[name])
        return out


def _limits(spec: TensorSpec, case: Case) -> tuple[float, float]:
    """(subnormal scale, large scale) of the narrower of the model and storage dtypes."""
    dtypes = [DTYPES[spec.dtype], case.storage_of(spec)]
    tiny = max(BOUNDS[d].tiny for d in dtypes)
    top = min(torch.finfo(d).max for d in dtypes)
    return tiny, top


def _value(spec: TensorSpec, case: Case, g: torch.Generator, base: Tensor | None) -> Tensor:
    """The tensor's next value in float64 (``base``: its current value, or None at first)."""
    tiny, top = _limits(spec, case)
    if spec.magnitude == "denormal":
        return torch.randint(-64, 65, spec.shape, generator=g).double() * tiny
    if spec.magnitude == "large":
        signs = torch.randint(0, 2, spec.shape, generator=g).double() * 2 - 1
        return signs * 0.9 * top
    if base is None:
        return torch.randn(spec.shape, generator=g, dtype=torch.float64)
    if spec.magnitude == "drift":
        return base + 1e-3
    return base + 1e-3 * torch.randn(spec.shape, generator=g, dtype=torch.float64)


def _initial(spec: TensorSpec, case: Case, g: torch.Generator) -> Tensor:
    value = _value(spec, case, g, None).to(DTYPES[spec.dtype])
    if spec.transposed and len(spec.shape) == 2:
        value = value.t().contiguous().t()  # same values, column-major: not contiguous
    return value


def moved(now: dict[str, Tensor], case: Case, g: torch.Generator, optimizer_ran: bool
          ) -> dict[str, Tensor]:
    """The model's values after one training step (``now``: its values before, by name):
    parameters move when the optimizer ran (all of them: frozen ones are changed too, as a
    user may, to show that exports read them live); buffers move anyway (a forward pass
    ran); the integer buffer counts. Every rank computes the same values."""
    new = {"count": now["count"] + 1}
    for spec in case.tensors:
        if spec.role != "buffer" and not optimizer_ran:
            continue
        name = f"parts.{spec.name}.t"
        new[name] = _value(spec, case, g, now[name].double()).to(now[name].dtype)
    return new


class Harness:
    """How a placement builds the case's model, reads its full values and writes new ones
    (the ``whole`` placement here: one process; ``tests/conformance_worker.py`` has the
    others). Reads and writes go through torch's own API, never through emakit."""

    def build(self, case: Case) -> nn.Module:
        model = MatrixModel(case).to(case.device)
        if case.flat:
            emakit.flatten_parameters(model)
        return model

    def values(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's state dict, detached clones on the CPU (what the oracle reads)."""
        return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}

    @torch.no_grad()
    def write(self, model: nn.Module, new: dict[str, Tensor]) -> None:
        state = model.state_dict(keep_vars=True)
        for name, value in new.items():
            state[name].copy_(value)

    def pickles(self) -> bool:
        """Whether an EMA of this placement pickles (distributed ones are refused)."""
        return True


WHOLE = Harness()


def _kind(case: Case, spec: TensorSpec | None, names: tuple[str, ...]) -> str:
    def matched(patterns: tuple[str, ...]) -> bool:
        return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)

    if spec is None or matched(case.exclude) or spec.role == "frozen":
        return "live"  # the integer buffer, excluded tensors (both select: excluded), frozen
    if spec.role == "param" or case.buffers == "average" or matched(case.include):
        return "average"
    return "copy"


def kinds(case: Case, names: list[str]) -> dict[str, str]:
    """What README says each state-dict name is: averaged, copied or live."""
    by_name = {f"parts.{s.name}.t": s for s in case.tensors}
    out = {}
    for name in names:
        if name == "tied.t":  # a second name of the first parameter: both its names match
            first = next(s for s in case.tensors if s.role != "buffer")
            out[name] = _kind(case, first, (name, f"parts.{first.name}.t"))
        else:
            out[name] = _kind(case, by_name.get(name), (name,))
    return out


# the configuration, twice: as emakit takes it, and as the oracle's own law ------------------


def _cosine(total: int) -> Callable[[int], float]:
    """DINO's momentum for iteration ``k - 2`` from 0.9 to 1 (written from DINO's formula)."""
    return lambda k: 1.0 - 0.1 * (1.0 + math.cos(math.pi * min(max(k - 2, 0), total) / total)) / 2


def _ratio(decay: float) -> Callable[[int], float]:
    """diffusers' and timm's ramp ``min(decay, (1 + n) / (10 + n))``, n = k - 1."""
    return lambda k: min(decay, (1.0 + (k - 1)) / (10.0 + (k - 1)))


def oracle_law(case: Case) -> Law:
    kind, value = case.law
    if kind == "half_life":
        return Law(half_life=value, warmup=case.warmup)
    if kind == "smoothing":
        return Law(smoothing=value, warmup=case.warmup)
    schedule = _cosine(int(value)) if kind == "cosine" else _ratio(value)
    return Law(schedule=schedule, warmup=case.warmup)


def ema_kwargs(case: Case, scaler: Any = None) -> dict[str, Any]:
    kind, value = case.law
    kw: dict[str, Any] = {}
    if kind == "half_life":
        kw["half_life"] = f"{value!r}ba"
    elif kind == "smoothing":
        kw["smoothing"] = value
    elif kind == "cosine":
        kw["smoothing"] = emakit.CosineSmoothing(start=0.9, end=1.0, total=int(value))
    else:
        kw["smoothing"] = RatioRamp(decay=value)
    if case.warmup is not None:
        inv_gamma, power, floor = case.warmup
        kw["warmup"] = emakit.PowerWarmup(inv_gamma=inv_gamma, power=power, min_smoothing=floor)
    storage = None if case.storage is None else DTYPES[case.storage]
    kw.update(start=f"{case.start}ba", update_interval=f"{case.interval}ba", dtype=storage,
              compensated=case.compensated, buffers=case.buffers, executor=case.executor,
              exclude=list(case.exclude) or None, include=list(case.include) or None)
    if case.switch_every is not None:
        kw["switch_every"] = f"{case.switch_every}ba"
    if scaler is not None:
        kw["grad_scaler"] = scaler
    if case.placement == "shard":
        kw["shard"] = True
    return kw


# checking ---------------------------------------------------------------------------------


@dataclass
class Report:
    """What a case measured: per (storage dtype, executor, compensated), the largest error of
    a stored average relative to its tensor's scale, and of any export against its bound;
    ``failures`` says what did not hold."""

    errors: dict[tuple[str, str, bool], float] = field(default_factory=dict)
    ratios: dict[tuple[str, str, bool], float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    checks: int = 0
    events: int = 0

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def merge(self, other: Report) -> None:
        for key, v in other.errors.items():
            self.errors[key] = max(self.errors.get(key, 0.0), v)
        for key, v in other.ratios.items():
            self.ratios[key] = max(self.ratios.get(key, 0.0), v)
        self.failures += other.failures
        self.checks += other.checks
        self.events += other.events


class Checker:
    """Compares what an EMA hands out with the oracle, within each element's bound."""

    def __init__(self, case: Case, report: Report, harness: Harness) -> None:
        self.case = case
        self.report = report
        self.harness = harness
        self.specs = {f"parts.{s.name}.t": s for s in case.tensors}
        if case.tie:
            first = next(s for s in case.tensors if s.role != "buffer")
            self.specs["tied.t"] = first

    def bound(self, oracle: Oracle, name: str, storage: torch.dtype, model: torch.dtype
              ) -> Tensor:
        alias = name
        if name == "tied.t":
            spec = self.specs[name]
            alias = f"parts.{spec.name}.t"
        e = oracle.avg[alias]
        peak = oracle.peak[alias]
        top = peak.max() if peak.numel() else torch.zeros((), dtype=torch.float64)
        return element_bound(storage, model, self.case.compensated, oracle.updates, e,
                             oracle.paths[alias], oracle.sources[alias], top.expand_as(e))

    def compare(self, what: str, got: dict[str, Tensor], want: dict[str, Tensor],
                model: dict[str, Tensor], oracle: Oracle, storage: dict[str, torch.dtype]
                ) -> None:
        """``got`` (an export or the model inside a swap) against ``want`` (the oracle's),
        live tensors bitwise against ``model``."""
        self.report.checks += 1
        if list(got) != list(model):
            self.report.fail(f"{what}: names {list(got)}, expected {list(model)}")
            return
        for n, t in got.items():
            t, ref = t.detach().cpu(), model[n]
            if t.dtype != ref.dtype or t.shape != ref.shape:
                self.report.fail(f"{what}: {n} is {t.dtype} {tuple(t.shape)}, expected "
                                 f"{ref.dtype} {tuple(ref.shape)}")
                continue
            kind = oracle.kinds[n]
            if kind == "live" or not oracle.started:
                if not torch.equal(t, ref):
                    self.report.fail(f"{what}: {n} ({kind}) is not the model's value")
                continue
            self._within(what, n, t, want[n], oracle, storage[n], t.dtype)

    def _within(self, what: str, n: str, got: Tensor, want: Tensor, oracle: Oracle,
                storage: torch.dtype, model: torch.dtype) -> float:
        if got.numel() == 0:
            return 0.0
        err = (got.double() - want).abs()
        if not torch.isfinite(got).all():
            self.report.fail(f"{what}: {n} holds NaN or Inf (oracle max |e| "
                             f"{want.abs().max().item():.3g})")
            return math.inf
        bound = self.bound(oracle, n, storage, model)
        ratio = (err / bound).max().item()
        if ratio > 1.0:
            i = int((err / bound).argmax())
            self.report.fail(f"{what}: {n} off by {err.flatten()[i].item():.3g} > bound "
                             f"{bound.flatten()[i].item():.3g} (value "
                             f"{want.flatten()[i].item():.6g}, got "
                             f"{got.double().flatten()[i].item():.6g})")
        key = (str(storage).removeprefix("torch."), self.case.executor, self.case.compensated)
        self.report.ratios[key] = max(self.report.ratios.get(key, 0.0), ratio)
        return ratio

    def state(self, ema: Any, oracle: Oracle) -> dict[str, torch.dtype]:
        """The stored averages (``state_dict()["average"]``) against the oracle; returns each
        stored name's storage dtype, checked to be the documented one (``Case.storage_of``)."""
        state = ema.state_dict()
        average = {n: _full(t) for n, t in state["average"].items()}
        storage: dict[str, torch.dtype] = {}
        stored = [n for n in oracle.kinds if oracle.kinds[n] != "live"]
        canonical = [n for n in stored if n != "tied.t" or "tied.t" in average]
        if sorted(average) != sorted(canonical):
            self.report.fail(f"state: averages of {sorted(average)}, expected {sorted(canonical)}")
            return storage
        for n, t in list(average.items()):
            average[n] = t = t.detach().cpu()
            spec = self.specs[n]
            documented = self.case.storage_of(spec)
            if t.dtype != documented:
                self.report.fail(f"state: {n} stored in {t.dtype}, documented {documented}")
            storage[n] = t.dtype
        if oracle.kinds.get("tied.t", "live") != "live" and "tied.t" not in average:
            storage["tied.t"] = storage[f"parts.{self.specs['tied.t'].name}.t"]
        if oracle.started:
            for n, t in average.items():
                self.report.checks += 1
                self._within("state", n, t, oracle.avg[n], oracle, t.dtype, t.dtype)
                self._record(n, t, oracle)
        return storage

    def _record(self, n: str, t: Tensor, oracle: Oracle) -> None:
        if t.numel() == 0 or not torch.isfinite(t).all():
            return
        scale = oracle.peak[n].max().item()
        if scale < torch.finfo(t.dtype).smallest_normal:  # subnormal: absolute errors
            return
        err = (t.double() - oracle.avg[n]).abs().max().item() / scale
        key = (str(t.dtype).removeprefix("torch."), self.case.executor, self.case.compensated)
        self.report.errors[key] = max(self.report.errors.get(key, 0.0), err)

    def forward(self, ema: Any, oracle: Oracle, model: dict[str, Tensor],
                storage: dict[str, torch.dtype], g: torch.Generator) -> None:
        """``ema.module(xs)`` against the oracle's weights: the forward pass is linear."""
        self.report.checks += 1
        xs = {s.name: _input(s, g) for s in self.case.tensors}
        device = torch.device(self.case.device)
        want = torch.zeros((), dtype=torch.float64)
        tol = torch.zeros((), dtype=torch.float64)
        exported = oracle.export(model)
        for s in self.case.tensors:
            n = f"parts.{s.name}.t"
            x = xs[s.name]
            want = want + (exported[n] * x).sum()
            if oracle.started and oracle.kinds[n] != "live":
                b = self.bound(oracle, n, storage[n], DTYPES[s.dtype])
                tol = tol + (b * x.abs()).sum()
            tol = tol + 1e-15 * (exported[n] * x).abs().sum()
        with torch.no_grad():
            got = ema.module({k: x.to(device) for k, x in xs.items()}).cpu()
        if not (got - want).abs() <= tol:
            self.report.fail(f"module: {got.item():.17g}, oracle {want.item():.17g} "
                             f"(tolerance {tol.item():.3g})")


def _input(spec: TensorSpec, g: torch.Generator) -> Tensor:
    """A forward input for ``spec``'s tensor; for weights near the dtype's maximum, in
    [-1, 1] scaled by a power of two (exactly) so that the sum over every part stays finite."""
    if spec.magnitude != "large":
        return torch.randn(spec.shape, generator=g, dtype=torch.float64)
    numel = _numel(spec)
    x = torch.rand(spec.shape, generator=g, dtype=torch.float64) * 2 - 1
    return x * 2.0 ** -(numel.bit_length() + 5)


def _numel(spec: TensorSpec) -> int:
    n = 1
    for d in spec.shape:
        n *= d
    return n


# running ----------------------------------------------------------------------------------


def _full(t: Tensor) -> Tensor:
    """A DTensor's full value (a collective), or the tensor."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def new_scaler() -> Any:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(torch.ones(()))  # the scale tensor exists from the first scale() on
    return scaler


class Runner:
    """One case on this process or rank: the model, its EMA, the oracle beside them, and one
    method per event (every rank calls the same ones: exports and swaps may be
    collectives)."""

    def __init__(self, case: Case, harness: Harness) -> None:
        self.case, self.harness = case, harness
        self.report = Report()
        self.checker = Checker(case, self.report, harness)
        self.g = torch.Generator().manual_seed(case.seed + 1)
        self.model = harness.build(case)
        self.scaler = new_scaler() if case.grad_scaler else None
        self.ema = emakit.EMA(self.model, **ema_kwargs(case, self.scaler))
        timing = Timing(case.start, case.interval, case.switch_every)
        self.oracle = Oracle(oracle_law(case), timing, kinds(case, list(self.values())))
        self.storage = self.checker.state(self.ema, self.oracle)

    def values(self) -> dict[str, Tensor]:
        return self.harness.values(self.model)

    def step(self, where: str, skip: bool) -> None:
        """An optimizer step (``skip``: one the GradScaler skipped), then ``ema.step()``."""
        skipped = skip and self.scaler is not None
        new = moved(self.values(), self.case, self.g, optimizer_ran=not skipped)
        self.harness.write(self.model, new)
        if self.scaler is not None:
            self.scaler.scale(torch.ones(()))
            if skipped:
                self.scaler.update(new_scale=self.scaler.get_scale() / 2)
        before = self.values()
        done = self.oracle.step(before, scaler_skipped=skipped)
        self.ema.step()
        if "switch" in done:  # the model's averaged tensors hold the average now, the
            # others (copied, live) what they held
            self.checker.compare(f"{where}: switch", self.values(), self.oracle.export(before),
                                 before, _switch_view(self.oracle), self.storage)

    def update(self, where: str) -> None:
        self.oracle.update(self.values())
        self.ema.update()

    def reset(self, where: str) -> None:
        self.oracle.reset(self.values())
        self.ema.reset()

    def resume(self, where: str) -> None:
        """state_dict -> torch.save -> torch.load(weights_only=True) -> a fresh EMA."""
        buffer = io.BytesIO()
        torch.save(self.ema.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        self.ema = emakit.EMA(self.model, **ema_kwargs(self.case, self.scaler))
        self.ema.load_state_dict(state)

    def pickle(self, where: str) -> None:
        if self.harness.pickles():
            self.model, self.ema = pickle.loads(pickle.dumps((self.model, self.ema)))
            self.scaler = self.ema.config.grad_scaler
            return
        try:
            pickle.dumps(self.ema)
            self.report.fail(f"{where}: a distributed EMA pickled (it must be refused)")
        except TypeError:
            pass

    def check(self, where: str) -> None:
        check_all(self.ema, self.model, self.oracle, self.checker, self.storage, self.g, where)

    def counts(self, where: str) -> None:
        """``num_updates`` and ``smoothing`` against the oracle's, after every event."""
        ema, oracle = self.ema, self.oracle
        if ema.num_updates != oracle.num_updates:
            self.report.fail(f"{where}: num_updates {ema.num_updates}, oracle "
                             f"{oracle.num_updates}")
        want = oracle.next_smoothing()
        if not math.isclose(ema.smoothing, want, rel_tol=1e-12, abs_tol=1e-15):
            self.report.fail(f"{where}: smoothing {ema.smoothing!r}, oracle {want!r}")


def run(case: Case, harness: Harness | None = None) -> Report:
    """Run ``case`` (in this process, or on this rank of the placement) and check it
    throughout."""
    runner = Runner(case, harness or WHOLE)
    for i, event in enumerate(case.events):
        where = f"event {i} ({event})"
        if event in ("step", "skip"):
            runner.step(where, skip=event == "skip")
        else:
            getattr(runner, event)(where)
        runner.report.events += 1
        runner.counts(where)
        if runner.report.failures:
            break
    if not runner.report.failures:
        runner.check("end")
    return runner.report


def _switch_view(oracle: Oracle) -> Oracle:
    """The oracle as the model sees it right after a switch: averaged tensors hold the
    average; copied ones keep the model's own (README: "the model's averaged tensors take
    the average")."""
    kinds = {n: ("live" if k == "copy" else k) for n, k in oracle.kinds.items()}
    return dataclasses.replace(oracle, kinds=kinds)


def check_all(ema: Any, model: nn.Module, oracle: Oracle, checker: Checker,
              storage: dict[str, torch.dtype], g: torch.Generator, where: str) -> None:
    values = checker.harness.values
    now = values(model)
    want = oracle.export(now)
    storage.update(checker.state(ema, oracle))
    checker.compare(f"{where}: ema_state_dict", ema.ema_state_dict(), want, now, oracle, storage)
    with ema.swapped():
        inside = values(model)
    checker.compare(f"{where}: swapped", inside, want, now, oracle, storage)
    after = values(model)
    checker.report.checks += 1
    for n, t in now.items():
        if not torch.equal(after[n], t):
            checker.report.fail(f"{where}: {n} not restored bitwise after swapped()")
    checker.forward(ema, oracle, now, storage, g)
