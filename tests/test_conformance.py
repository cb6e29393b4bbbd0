"""One conformance matrix (issue 19, item 6): every combination of executor x storage dtype x
model dtypes (mixed in one model) x compensated x placement x start / interval / warmup /
schedule x exclude / include / switch_every / reset / grad_scaler x tensor sizes (0-d, empty,
around every size threshold) x magnitudes (subnormal, normal, near the dtype's maximum) is
checked against ONE float64 oracle written apart from the engine (``tests/oracle.py``):
every export (``ema_state_dict``), swap (``swapped()``), forward pass (``ema.module``),
stored average, resumed state (``state_dict`` -> a fresh EMA -> ``load_state_dict`` ->
continue) and pickled copy, within the bound of each storage dtype (``oracle.BOUNDS``,
the table ``docs/semantics.md`` prints).

Tiers:

- fast (``make test``): a fixed set of drawn cases (``derandomize=True``, no example
  database), the ``whole`` placement, the cases that showed the kernel bugs of issue 19,
  item 4 (:data:`PINNED`, fixed by the kernels merge), and the known bugs as strict xfails;
- full (``EMAKIT_CONFORMANCE=full``, by hand): many more cases, and the placements on two
  gloo processes (``shard=True``, FSDP2, FSDP1: ``tests/conformance_worker.py``); it prints
  how many cases it ran and the largest error measured per storage dtype and executor.
  ``EMAKIT_CONFORMANCE=slow`` runs the fast draws plus a few distributed cases.

A new executor, placement or storage dtype joins with one line: :data:`EXECUTORS`,
:data:`PLACEMENTS` or :data:`STORAGES` (and ``oracle.BOUNDS`` for a new dtype).

Known bugs not fixed yet: :data:`KNOWN` lists them with the part of the matrix each one
covers. Drawn cases are kept out of those parts (``repair``) and one pinned case per bug is a
strict xfail: when a fix merges, the xfail fails (XPASS), and the entry leaves :data:`KNOWN`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from conformance import EAGER_BELOW, GATHER_MAX, STAGING, Case, Report, TensorSpec, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import BOUNDS, bound_table

import emakit

TIER = os.environ.get("EMAKIT_CONFORMANCE", "fast")

#: Executors the matrix runs (one line each); "graph" captures CUDA graphs: CUDA only.
EXECUTORS = ["eager", "fused"] + (["graph"] if torch.cuda.is_available() else [])
#: Storage dtypes (None: each tensor's own).
STORAGES: list[str | None] = [None, "float16", "bfloat16", "float32", "float64"]
#: Model dtypes, mixed in one model.
MODEL_DTYPES = ["float16", "bfloat16", "float32", "float64"]
#: Placements: "whole" in this process; the others on two gloo processes (the slow and full
#: tiers; ``tests/conformance_worker.py`` has a class for each).
PLACEMENTS = ["whole", "shard", "fsdp2", "fsdp1", "fsdp1-orig"]

# sizes straddling every threshold of the engine (gathered runs, the fused kernel's
# compiled path, the staging chunks), weighted toward the cheap ones
SHAPES = {
    "0-d": [()],
    "empty": [(0,), (3, 0)],
    "small": [(1,), (7,), (16, 5), (2, 3)],
    "gather-edge": [(GATHER_MAX,), (GATHER_MAX + 1,), (32, 64)],
    "below-fused": [(3000,), (EAGER_BELOW - 1,)],
    "fused": [(EAGER_BELOW,), (260, 260)],
    "staging": [(STAGING + 1,)],
}
SIZE_WEIGHTS = {"0-d": 2, "empty": 2, "small": 8, "gather-edge": 3, "below-fused": 2,
                "fused": 0 if TIER == "fast" else 2, "staging": 0 if TIER == "fast" else 1}


# pinned regressions and known bugs ----------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """A bug the matrix finds that is not fixed yet (the lead decides on it): where it shows
    in a case, how a drawn case is kept out of it (``repair``), and pinned cases that show it
    (a strict xfail each)."""

    reason: str
    applies: Callable[[Case], bool]
    repair: Callable[[Case], Case]
    pinned: tuple[Case, ...]


_DRIFT = TensorSpec("w", (EAGER_BELOW,), "float16", magnitude="drift")
_PINNED_16 = Case(tensors=(_DRIFT,), executor="fused", storage=None, law=("half_life", 200.0),
                  events=("step",) * 200)


def _every_combination(compensated: bool) -> Case:
    specs = tuple(TensorSpec(f"{d}{t}", (260, 260), d, transposed=bool(t))
                  for d in ("float16", "bfloat16", "float32", "float64") for t in (0, 1))
    return Case(tensors=specs, executor="fused", storage="float32", compensated=compensated,
                events=("step",) * 3)


#: Cases that showed the kernel bugs of issue 19, item 4 (fixed by the kernels merge), kept
#: as regressions: the drawn cases of the full tier reach these parts of the matrix too, these
#: always do. The fast tier runs the first one only (each compiled kernel costs seconds): the
#: compiled kernel's compensation of fp16 and bf16 storage, its fp64 weight, and fp16
#: weights near the maximum, in one model.
PINNED = {
    "fused-every-storage": replace(
        _PINNED_16, tensors=(_DRIFT, replace(_DRIFT, name="b", dtype="bfloat16"),
                             replace(_DRIFT, name="d", dtype="float64"),
                             TensorSpec("big", (EAGER_BELOW,), "float16", magnitude="large"))),
    # the fused kernel dropped the compensation of fp16 and bf16 storage
    "fused-fp16-compensation": _PINNED_16,
    "fused-bf16-compensation": replace(_PINNED_16, tensors=(replace(_DRIFT, dtype="bfloat16"),)),
    # the fused executor passed the weight as float32 (to its compiled kernel, and a tensor
    # weight on every path): a float64 average had a float32-accurate factor
    "fused-fp64-weight": replace(_PINNED_16, tensors=(replace(_DRIFT, dtype="float64"),),
                                 storage="float64", events=("step",) * 20),
    "fused-fp64-scaler-weight": replace(_PINNED_16,
                                        tensors=(replace(_DRIFT, shape=(), dtype="float64"),),
                                        storage="float64", grad_scaler=True,
                                        events=("step",) * 20),
    # finite weights near the dtype's maximum overflowed in the update (src - avg)
    "fp16-near-max": Case(tensors=(TensorSpec("w", (4,), "float16", magnitude="large"),),
                          storage=None, events=("step",) * 4),
    "fp16-near-max-fused": Case(tensors=(TensorSpec("w", (EAGER_BELOW,), "float16",
                                                    magnitude="large"),),
                                executor="fused", storage=None, events=("step",) * 4),
    # the process's one compiled kernel raised FailOnRecompileLimitHit after 8 dtype/layout
    # combinations (dynamo's recompile limit)
    "fused-16-combinations": _every_combination(True),
    "fused-16-combinations-plain": _every_combination(False),
}


def _resumed_after_skip(case: Case) -> bool:
    return case.grad_scaler and "skip" in case.events and "resume" in case.events


# The scaler's skipped step left out after a resume (fixed: the state keeps the scale the next
# update compares against, ``grad_scaler_scale``) is pinned by test_a_resume_after_a_skip.
KNOWN: list[Known] = []

#: A resume between a step the GradScaler skipped and the next update: the resumed run must
#: leave that update out as the run that never stopped does.
RESUMED_AFTER_SKIP = Case(tensors=(replace(_DRIFT, shape=(5,), dtype="float32"),),
                          grad_scaler=True, interval=3, law=("smoothing", 0.5),
                          events=("step", "step", "step", "skip", "resume", "step", "step"))


def repair(case: Case) -> Case:
    """``case`` kept out of the parts of the matrix where a known bug shows (a repair may
    uncover another bug's part: repeated until none applies)."""
    while any(k.applies(case) for k in KNOWN):
        for known in KNOWN:
            if known.applies(case):
                case = known.repair(case)
    return case


# the cases ----------------------------------------------------------------------------------


#: what the distributed tier draws: sizes of a few thousand elements at most (every rank
#: runs every case); no 0-d tensor under FSDP2 (it shards dim 0), no 0-d or empty one under
#: FSDP1 (torch's FSDP1 refuses scalar parameters and cannot flatten an empty one)
DISTRIBUTED_SIZES = {"whole": None, "shard": ["0-d", "empty", "small", "gather-edge"],
                     "fsdp2": ["empty", "small", "gather-edge"],
                     "fsdp1": ["small", "gather-edge"],
                     "fsdp1-orig": ["small", "gather-edge"]}


@st.composite
def tensor_specs(draw, name: str, dtype: str | None = None, small: bool = False,
                 placement: str = "whole") -> TensorSpec:
    if small:
        shape = draw(st.sampled_from([(7,), (100,), (GATHER_MAX,), (3, 5)]))
    else:
        allowed = DISTRIBUTED_SIZES[placement] or list(SIZE_WEIGHTS)
        sizes = [k for k, w in SIZE_WEIGHTS.items() if k in allowed for _ in range(w)]
        shape = draw(st.sampled_from(SHAPES[draw(st.sampled_from(sizes))]))
    role = draw(st.sampled_from(["param"] * 6 + ["frozen", "buffer", "buffer"]))
    magnitude = draw(st.sampled_from(["normal"] * 5 + ["drift"] * 3
                                     + ["denormal", "denormal", "large"]))
    # shard=True needs contiguous tensors (a refusal tested elsewhere), FSDP2 too
    transposed = len(shape) == 2 and placement not in ("shard", "fsdp2") and draw(st.booleans())
    return TensorSpec(
        name=name,
        shape=shape,
        dtype=dtype or draw(st.sampled_from(MODEL_DTYPES)),
        role=role,
        transposed=transposed,
        magnitude=magnitude,
    )


LAWS = st.one_of(
    st.tuples(st.just("half_life"), st.sampled_from([1.0, 3.0, 50.0, 1e4, 1e7])),
    st.tuples(st.just("smoothing"), st.sampled_from([0.0, 0.5, 0.9, 0.999, 1.0])),
    st.tuples(st.just("cosine"), st.sampled_from([5.0, 50.0])),
    st.tuples(st.just("ratio"), st.sampled_from([0.9, 0.9999])),
)
WARMUPS = st.one_of(st.none(), st.tuples(st.sampled_from([1.0, 5.0]),
                                         st.sampled_from([2 / 3, 1.0]),
                                         st.sampled_from([0.0, 0.3])))


@st.composite
def _tensors(draw, storage: str | None, placement: str) -> list[TensorSpec]:
    """1 to 5 tensors, and maybe a run of 9 small ones of one dtype (gathered when it is
    the storage dtype)."""
    specs = [draw(tensor_specs(f"t{i}", placement=placement))
             for i in range(draw(st.integers(1, 5)))]
    if draw(st.booleans()):
        dtype = storage or draw(st.sampled_from(MODEL_DTYPES))
        specs += [draw(tensor_specs(f"g{i}", dtype, small=True, placement=placement))
                  for i in range(9)]
    return specs


@st.composite
def _selectors(draw, specs: list[TensorSpec], buffers: str) -> tuple[tuple[str, ...], ...]:
    """``exclude`` patterns over any tensors, ``include`` over buffers with ``"copy"``."""
    exclude = draw(st.lists(st.sampled_from([s.name for s in specs]), max_size=2, unique=True))
    floating = [s.name for s in specs if s.role == "buffer"]
    include = (draw(st.lists(st.sampled_from(floating), max_size=2, unique=True))
               if buffers == "copy" and floating else [])
    return tuple(f"parts.{n}.*" for n in exclude), tuple(f"parts.{n}.*" for n in include)


@st.composite
def cases(draw, placement: str = "whole") -> Case:
    storage = draw(st.sampled_from(STORAGES))
    specs = draw(_tensors(storage, placement))
    buffers = draw(st.sampled_from(["average", "copy"]))
    exclude, include = draw(_selectors(specs, buffers))
    scaler = draw(st.booleans())
    kinds = ["step"] * 8 + ["update", "reset", "resume", "pickle", "check", "check"]
    kinds += ["skip", "skip"] if scaler else []
    executor = draw(st.sampled_from(EXECUTORS))
    laid_out = placement in ("whole", "shard")  # flatten_parameters and tied weights
    case = Case(
        tensors=tuple(specs),
        executor=executor,
        storage=storage,
        compensated=draw(st.booleans()),
        buffers=buffers,
        law=draw(LAWS),
        warmup=draw(WARMUPS),
        start=draw(st.sampled_from([0, 1, 2, 5])),
        interval=draw(st.sampled_from([1, 1, 2, 3])),
        switch_every=draw(st.sampled_from([None, None, 2, 3, 4])),
        grad_scaler=scaler,
        exclude=exclude,
        include=include,
        flat=laid_out and draw(st.booleans()),
        tie=laid_out and any(s.role != "buffer" for s in specs) and draw(st.booleans()),
        events=tuple(draw(st.lists(st.sampled_from(kinds), min_size=3, max_size=24))),
        seed=draw(st.integers(0, 2 ** 16)),
        placement=placement,
        device="cuda" if executor == "graph" and placement == "whole" else "cpu",
    )
    return repair(case)


# counting -----------------------------------------------------------------------------------


class Tally:
    """What a tier ran: cases, checks, and the largest errors per storage dtype and executor."""

    def __init__(self) -> None:
        self.cases = 0
        self.report = Report()

    def add(self, report: Report) -> None:
        self.cases += 1
        self.report.merge(report)

    def summary(self, title: str) -> str:
        lines = [f"{title}: {self.cases} cases, {self.report.checks} checks"]
        lines.append("  largest error of a stored average (relative to the tensor's largest "
                     "|value|) and of any export against its bound, per storage dtype, "
                     "executor, compensated:")
        for key in sorted(self.report.errors.keys() | self.report.ratios.keys(), key=str):
            err = self.report.errors.get(key, 0.0)
            ratio = self.report.ratios.get(key, 0.0)
            lines.append(f"    {key[0]:>9} {key[1]:>6} compensated={key[2]!s:5} "
                         f"error {err:.3g}  (bound used up to {100 * ratio:.3g}%)")
        return "\n".join(lines)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=TIER != "full",
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def _check(case: Case, report: Report) -> None:
    assert not report.failures, (
        "conformance failures for\n" + json.dumps(case.to_json()) + "\n"
        + "\n".join(report.failures[:10])
    )


def _write(tally: Tally, title: str) -> None:
    text = tally.summary(title)
    print("\n" + text)
    out = os.environ.get("EMAKIT_CONFORMANCE_REPORT")
    if out:
        with Path(out).open("a") as f:
            f.write(text + "\n")


# the tests ----------------------------------------------------------------------------------

FAST_EXAMPLES = 40
FULL_EXAMPLES = 1500


def test_matrix_whole():
    """The ``whole`` placement (one process), every other dimension drawn."""
    tally = Tally()
    examples = FULL_EXAMPLES if TIER == "full" else FAST_EXAMPLES

    @_settings(examples)
    @given(case=cases())
    def one(case: Case) -> None:
        report = run(case)
        tally.add(report)
        _check(case, report)

    one()
    _write(tally, f"conformance ({TIER} tier, whole placement)")
    assert tally.cases >= min(examples, 10)


def test_the_docs_print_the_bound_table():
    """docs/semantics.md prints oracle.BOUNDS, the table the matrix checks against."""
    text = (Path(__file__).parents[1] / "docs" / "semantics.md").read_text()
    printed = text.split("<!-- bounds:start")[1].split("-->", 1)[1]
    assert printed.split("<!-- bounds:end -->")[0].strip() == bound_table()


@pytest.mark.parametrize("compensated", [False, True])
@pytest.mark.parametrize("dtype", list(BOUNDS))
def test_the_bytes_per_element_of_the_table_are_measured(dtype: torch.dtype, compensated: bool):
    """The table's bytes per element are what ``ema.nbytes()`` counts (1024 elements)."""
    model = torch.nn.Linear(64, 16, bias=False).to(dtype)
    ema = emakit.EMA(model, dtype=None, compensated=compensated, executor="eager")
    assert ema.nbytes() == 1024 * BOUNDS[dtype].element_size * (2 if compensated else 1)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=[pytest.mark.skipif(TIER == "fast" and i > 0, reason="compiles "
                                              "more kernels: EMAKIT_CONFORMANCE=slow or full")])
    for i, n in enumerate(PINNED)])
def test_pinned_regressions(name: str):
    """The cases that showed the kernel bugs of issue 19, item 4, within their bounds."""
    report = run(PINNED[name])
    assert report.checks > 0
    _check(PINNED[name], report)


@pytest.mark.parametrize("known", [
    pytest.param(k, id=f"known{i}", marks=pytest.mark.xfail(reason=k.reason, strict=True))
    for i, k in enumerate(KNOWN)])
def test_known_bugs(known: Known):
    """Each known bug, pinned: a strict xfail, so a fix turns it into a failure (XPASS) and
    the lead removes the entry from KNOWN (and with it the repair of drawn cases)."""
    report = Report()
    for case in known.pinned:
        report.merge(run(case))
    assert not report.failures, "\n".join(report.failures[:5])


def test_the_pinned_cases_are_what_repair_keeps_out():
    """Each pinned case lies in its bug's region, and ``repair`` takes drawn cases out of
    every region: removing an entry from KNOWN puts its region back into the matrix."""
    for known in KNOWN:
        assert all(known.applies(case) for case in known.pinned), known.reason
        for case in known.pinned:
            assert not any(k.applies(repair(case)) for k in KNOWN)


DISTRIBUTED_EXAMPLES = {"fast": 0, "slow": 6, "full": 60}
WORKER = Path(__file__).with_name("conformance_worker.py")


@pytest.mark.multiprocess
@pytest.mark.skipif(TIER == "fast", reason="the distributed tier runs with "
                    "EMAKIT_CONFORMANCE=slow or full (two gloo processes per placement)")
@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p != "whole"])
def test_matrix_distributed(placement: str, tmp_path: Path):
    """The other placements on two gloo processes: the cases are drawn here, run on every
    rank by ``tests/conformance_worker.py`` and checked there against the oracle."""
    from multiproc import run_ranks

    drawn: list[Case] = []

    @_settings(DISTRIBUTED_EXAMPLES[TIER])
    @given(case=cases(placement))
    def draw(case: Case) -> None:
        drawn.append(case)

    draw()
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps([c.to_json() for c in drawn]))
    run_ranks(WORKER, placement, tmp_path, 2, str(cases_file), timeout=60.0 + 30.0 * len(drawn),
              env={"CUDA_VISIBLE_DEVICES": ""})
    results = json.loads((tmp_path / f"{placement}.json").read_text())
    tally = Tally()
    failed = []
    for r in results:
        report = Report(checks=r["checks"], failures=r["failures"])
        report.errors = {(a, b, c): v for a, b, c, v in r["errors"]}
        report.ratios = {(a, b, c): v for a, b, c, v in r["ratios"]}
        tally.add(report)
        if r["failures"]:
            failed.append(json.dumps(r["case"]) + "\n" + "\n".join(r["failures"][:5]))
    _write(tally, f"conformance ({TIER} tier, {placement} placement on 2 processes)")
    assert len(results) == len(drawn)
    assert not failed, f"{len(failed)} of {len(drawn)} cases failed:\n" + "\n".join(failed[:5])


def test_a_resume_after_a_skip():
    """Was a known bug: the scale of the last update lived only in memory, so a run resumed
    after a skipped step averaged the update the uninterrupted run left out."""
    assert _resumed_after_skip(RESUMED_AFTER_SKIP)
    report = run(RESUMED_AFTER_SKIP)
    assert report.checks > 0
    _check(RESUMED_AFTER_SKIP, report)
