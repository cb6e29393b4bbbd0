r"""The averager: what :class:`~emakit.EMA`, :class:`~emakit.BEMA` and
:class:`~emakit.PostHocEMA` are thin faces of.

An averager holds a configuration, the cadence state (:mod:`emakit.cadence`), one averaging
law per store (:mod:`emakit.laws`), the skip guards (:mod:`emakit.guards`) and the stores of
the private engine; it hands one store's weights out (export, swap, ``module``, ``copy_to``).
Data flows one way: the loop calls :meth:`Averager.step`; the cadence says what is due (the
start copy, an update and the span of training time it covers, a switch-back, a snapshot);
the guards admit the update; each law gives its store's smoothing; the store's executor runs
``avg <- s * avg + (1 - s) * model`` on this rank's part of every averaged tensor.

Process-global state, and why: :data:`_SWAPPED` (which averager's average a model holds, so
that a swap is never nested or overlapped by another averager's step).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import cadence as cad
from ._args import flag, path_arg
from ._engine import views
from ._engine.collectives import all_ranks, check_same_model, process_group, rank
from ._engine.flat_params import named_state
from ._engine.layout import Kind
from ._engine.store import Store
from ._engine.tensors import unwrap_model
from .cadence import Cadence, CadenceState, Counts, Span
from .config import StoreConfig, _Timing
from .guards import Context, Guard, Mask, NonFinite, ScalerSkipped
from .laws import Law
from .migrations import CURRENT, upgrade
from .time import check_count

__all__ = ["Averager", "EMAModule"]

# model -> the averager whose average it holds now (inside that averager's swapped() block)
_SWAPPED: weakref.WeakKeyDictionary[nn.Module, Averager] = weakref.WeakKeyDictionary()


def swapped_by(model: nn.Module) -> Averager | None:
    """The averager whose average ``model`` holds now (inside its ``swapped()``), or None."""
    return _SWAPPED.get(unwrap_model(model))


def check_initialized(model: nn.Module) -> None:
    """Raise a ValueError naming the first parameter or buffer that is not materialized yet
    (``nn.LazyLinear`` before its first forward pass, or a tensor on the meta device)."""
    for name, t in named_state(unwrap_model(model)):  # FSDP1's state_dict() would gather
        if isinstance(t, Tensor) and torch.nn.parameter.is_lazy(t):
            raise ValueError(f"model: {name} is not initialized yet (a lazy module): run one "
                             "forward pass before building the EMA")
        if isinstance(t, Tensor) and t.is_meta:
            raise ValueError(f"model: {name} is on the meta device and holds no values: "
                             "materialize the model (to_empty + init) before building the EMA")


def _guards(config: _Timing) -> list[Guard]:
    guards: list[Guard] = []
    if config.skip_nonfinite:
        guards.append(NonFinite())
    if config.grad_scaler is not None:
        guards.append(ScalerSkipped(config.grad_scaler))
    return guards


class Averager:
    """Averages of a model's weights, one per law, on one training clock.

    Args:
        model: the model being trained (DDP and ``torch.compile`` wrappers are seen through).
        config: the timing and storage (an :class:`~emakit.EMAConfig`,
            :class:`~emakit.BEMAConfig` or :class:`~emakit.PostHocEMAConfig`).
        laws: one :class:`~emakit.laws.Law` per store.
        cadence: when the start copy, updates, switch-backs and snapshots happen (built from
            ``config`` by default).

    Faces hand out the first store's weights unless they say otherwise
    (:meth:`_handout`), add their own state to :meth:`state_dict` (their tensors under
    the keys of :attr:`STATE_KIND`'s documented format), and call :meth:`_constructed` last
    in their ``__init__``.
    """

    #: which documented state format the face writes (see :mod:`emakit.migrations`)
    STATE_KIND = "ema"

    def __init__(
        self,
        model: nn.Module,
        config: _Timing,
        laws: Sequence[Law],
        cadence: Cadence | None = None,
    ) -> None:
        check_initialized(model)
        self.config = config
        self._group = process_group(model, config.shard)  # ValueError naming shard without one
        self.model = unwrap_model(model)
        if self._group is not None:
            check_same_model(self.model, self._group)
        self._laws = tuple(laws)
        self._stores = [Store(self.model, config.storage(), self._group) for _ in self._laws]
        self._cadence = cadence or config.cadence()
        self._state = CadenceState()
        self._guards = _guards(config)
        self._skipped_base = 0  # skipped updates loaded from a state, beyond the guards' own
        self.module = EMAModule(self)

    # what faces and users read ------------------------------------------------------------

    @property
    def num_updates(self) -> int:
        """Updates done: the start copy counts as the first (as ``AveragedModel.n_averaged``)."""
        return self._state.num_updates

    @property
    def started(self) -> bool:
        """Whether the start copy was taken."""
        return self._state.started

    @property
    def counts(self) -> dict[str, int]:
        """Training done so far: ``{"ba": batches (optimizer steps), "ep": epochs, "sp":
        samples, "tok": tokens}``, as counted by :meth:`step` and :meth:`epoch_end` (and
        restored by :meth:`load_state_dict`)."""
        return self._state.counts.as_dict()

    @property
    def skipped_updates(self) -> int:
        """Updates skipped: non-finite sources (``skip_nonfinite``) and optimizer steps the
        ``grad_scaler`` skipped (counted on the device; reading this synchronizes)."""
        return self._skipped_base + sum(g.skipped() for g in self._guards)

    @property
    def smoothing(self) -> float:
        """The smoothing of the next averaging update (schedule and warmup applied); before
        the start, that of the first averaging update after the start copy."""
        nxt = cad.next_span(self._cadence, self._state)
        n = max(self._state.num_updates, 1)
        return self._laws[0].smoothing(nxt, n)

    @property
    def update_interval(self) -> Any:
        """The time between updates (a :class:`~emakit.Time` in ``ba`` or ``ep``)."""
        return self._cadence.interval

    def nbytes(self) -> int:
        """Bytes of averaged state this rank holds: every average, its compensation and the
        staging and pinned buffers the updates use."""
        return sum(s.state_nbytes() + s.workspace_nbytes() for s in self._all_stores())

    def synchronize(self) -> None:
        """Wait for pending work (the CPU arithmetic of an average kept on the CPU for a CUDA
        model, ``device="cpu"``); exports, swaps and states wait by themselves."""
        for store in self._all_stores():
            store.synchronize()

    def _all_stores(self) -> list[Store]:
        """Every store this averager keeps (faces with further stores add theirs)."""
        return list(self._stores)

    def _new_store(self, storage: StoreConfig) -> Store:
        """A further store of the model, on this averager's process group."""
        return Store(self.model, storage, self._group)

    def _state_names(self) -> list[str]:
        """The model's state-dict names in order (FSDP1's ``state_dict()`` would gather)."""
        return [n for n, _ in named_state(self.model)]

    def _entries(self) -> list[views.EntryInfo]:
        """Every tensor of the model as the stores see it (for snapshot headers)."""
        return views.describe(self._stores[0])

    def _rank(self) -> int:
        return rank(self._group)

    def _gathered(
        self, index: int, averaged: bool
    ) -> list[tuple[str, str, Tensor]] | None:
        """(name, kind, full tensor) of store ``index``'s averaged entries, or of the model's
        copied and live ones; gathered to rank 0 (None on other ranks): a collective."""
        kinds = (Kind.AVERAGE,) if averaged else (Kind.COPY, Kind.LIVE)
        named = views.named(self._stores[index], kinds, rank0_only=True)
        return None if named is None else [(n, k.value, t) for n, k, t in named]

    @staticmethod
    def _named(store: Store, clone: bool = False) -> dict[str, Tensor]:
        """``store``'s averages by canonical name (views of its flats, or clones)."""
        values = views.tensors(store)
        return _clones(values) if clone else values

    def _handout(self) -> Store:
        """The store whose weights export, swap, ``module`` and ``copy_to`` hand out."""
        return self._stores[0]

    # the loop's side ----------------------------------------------------------------------

    def step(self, samples: int | None = None, tokens: int | None = None) -> None:
        """Call once per optimizer step. Advances the clock, updates when due.

        ``samples`` and ``tokens`` are the counts in this step's batch, needed only for
        times in ``sp`` or ``tok``."""
        self._check_not_swapped("step the EMA")
        self._check_counted(samples, tokens)
        self._state = cad.tick(self._state, "ba", samples, tokens)
        self._on_event("ba")

    def epoch_end(self) -> None:
        """Call once at the end of each epoch."""
        self._check_not_swapped("end an epoch of the EMA")
        self._state = cad.tick(self._state, "ep")
        self._on_event("ep")

    def resume_at(
        self, *, step: int, epoch: int = 0, samples: int | None = None,
        tokens: int | None = None,
    ) -> None:
        """Put the clock at ``step`` optimizer steps and ``epoch`` epochs (and ``samples`` and
        ``tokens`` when given), e.g. for a run resumed from a checkpoint that holds no state of
        this average: ``start`` and ``dur`` times keep their meaning. An average already
        started (``copy_at_construction``) keeps its training time: the next update covers
        the time after the counts given, not the time before them."""
        c = self._state.counts
        counts = Counts(
            ba=check_count(step, "step"), ep=check_count(epoch, "epoch"),
            sp=c.sp if samples is None else check_count(samples, "samples"),
            tok=c.tok if tokens is None else check_count(tokens, "tokens"),
        )
        self._state = cad.resumed(self._cadence, self._state, counts)

    def _check_counted(self, samples: int | None, tokens: int | None) -> None:
        c = self._cadence
        for unit, value in (("sp", samples), ("tok", tokens)):
            uses = c.start.unit == unit or (
                c.start.unit == "dur" and c.total is not None and c.total.unit == unit
            )
            if uses and value is None:
                raise ValueError(
                    f"{'samples' if unit == 'sp' else 'tokens'}: start={str(c.start)!r} "
                    f"counts {unit}, so step() needs that count"
                )

    def _on_event(self, unit: str) -> None:
        due = cad.due(self._cadence, self._state, unit)
        if due.start:
            self._begin()
        elif due.update:
            self._update()
        if self.started and due.switch:
            self._switch()
        if self.started and due.snapshot:
            self._snapshot_due()

    def _snapshot_due(self) -> None:
        """A snapshot is due now (faces that take snapshots override this)."""

    def _context(self, start: bool) -> Context:
        return Context(start=start, where=self._where(), sources_finite=self._sources_finite)

    def _admit(self, start: bool) -> Mask | None:
        """Every guard's verdict on the update now (each asked once), combined."""
        context = self._context(start)
        mask: Mask = 1.0
        for guard in self._guards:
            verdict = guard.admit(context)
            if verdict is None:
                return None
            mask = verdict if isinstance(mask, float) else mask * verdict
        return mask

    def _constructed(self) -> None:
        """The end of construction (faces call it last in ``__init__``, once every store
        exists): the start copy, with ``copy_at_construction``."""
        if cad.constructed(self._cadence, self._state).start:
            self._begin()

    def _begin(self) -> None:
        """The start copy: every average takes the model's weights (update 1, k = 1)."""
        self._check_not_swapped("start the average")
        if self._admit(start=True) is None:
            return
        for store in self._all_stores():
            store.synchronize()
            store.reset()
        self._state = cad.begin(self._cadence, self._state)

    def update(self) -> None:
        """One update now. Before the start, takes the start copy instead. The update covers
        the training time since the last one (one interval when the clock has not moved), so
        its smoothing is the product of the per-unit factors."""
        self._check_not_swapped("update the average")
        if not self.started:
            self._begin()
            return
        self._update()

    def _update(self) -> None:
        covered = cad.span(self._cadence, self._state)
        mask = self._admit(start=False)
        if mask is None:
            self._state = cad.moved(self._state, covered, counted=False)
            return
        n = self._state.num_updates
        for store, law in zip(self._stores, self._laws, strict=True):
            weight = 1.0 - law.smoothing(covered, n)
            # a device mask times the weight in float64: a float32 product would round the
            # weight of a float64 average to float32
            store.update(weight if isinstance(mask, float) else mask.double() * weight)
        self._updated(covered)
        self._state = cad.moved(self._state, covered)

    def _updated(self, covered: Span) -> None:
        """After every store took an update covering ``covered`` (BEMA's correction)."""

    def _sources_finite(self) -> bool:
        finite = self._stores[0].sources_finite()
        return finite if self._group is None else all_ranks(finite, self._group)

    def reset(self) -> None:
        """The average takes the model's weights now; warmup restarts from here (this time is
        k = 1 again); the clock runs on. Before the start, starts the average now.

        A reset is a start copy to the guards: a step a ``grad_scaler`` skipped before it
        does not leave the next update out, and with ``skip_nonfinite=True`` a reset on a
        model holding NaN or Inf is skipped (the average is kept)."""
        self._check_not_swapped("reset the average")
        if not self.started:
            self._begin()
            return
        if self._admit(start=True) is None:
            return
        for store in self._all_stores():
            store.synchronize()
            store.reset()
        self._state = cad.restart(self._cadence, self._state)

    def _where(self) -> str:
        unit = self._cadence.interval.unit
        return f"{'batch' if unit == 'ba' else 'epoch'} {self._state.counts[unit]}"

    # the averaged weights -----------------------------------------------------------------

    @property
    def _in_swap(self) -> bool:
        return swapped_by(self.model) is self

    def _check_not_swapped(self, action: str) -> None:
        owner = swapped_by(self.model)
        if owner is self:
            raise RuntimeError(f"cannot {action} inside ema.swapped(): leave the block first")
        if owner is not None:
            raise RuntimeError(
                f"cannot {action}: the model holds another EMA's average inside that EMA's "
                "swapped() block; leave that block first"
            )

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Inside the block the model computes with the averaged weights; after it the
        training weights are back bitwise, also when the block raises. Parameters keep their
        identity, so the optimizer and its state are untouched. Yields the model.

        One swap per model at a time: nesting, or another average's swap of the same model,
        is a RuntimeError; so are ``step()``, ``update()`` and loads inside the block."""
        with self._swap_of(self._handout()):
            yield self.model

    @contextlib.contextmanager
    def _swap_of(self, store: Store) -> Iterator[None]:
        """:meth:`swapped` with ``store``'s weights (faces with several stores pick one)."""
        owner = swapped_by(self.model)
        if owner is self:
            raise RuntimeError("ema.swapped() is already active: swaps cannot be nested")
        if owner is not None:
            raise RuntimeError("ema.swapped(): the model already holds another EMA's average "
                               "(inside that EMA's swapped() block); leave that block first")
        _SWAPPED[self.model] = self
        store.synchronize()
        try:
            if not self.started:
                yield
            else:
                with store.swapped():
                    yield
        finally:
            _SWAPPED.pop(self.model, None)

    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the trained model) for good."""
        self._check_not_swapped("copy the average")
        target = self.model if model is None else unwrap_model(model)
        if target is self.model:
            if not self.started:
                return
            store = self._handout()
            if store.model_forward:  # FSDP1/2, ZeRO-3: into this rank's shards, no gather
                store.write_to_model()
            else:
                target.load_state_dict(views.mapping(store, started=True), strict=False)
            return
        target.load_state_dict(self.ema_state_dict(), strict=True)

    def _switch(self) -> None:
        """Switch EMA: the model's averaged tensors take the average for good. Copied buffers
        keep the model's own values (their stored copy may be older, or narrower)."""
        store = self._handout()
        if store.model_forward:  # FSDP1/2, ZeRO-3: into this rank's shards, no gather
            store.write_to_model(kinds=(Kind.AVERAGE,))
            return
        mapping = views.mapping(store, started=True)
        averaged = {n for e in store.entries if e.kind is Kind.AVERAGE for n in e.names}
        self.model.load_state_dict({n: t for n, t in mapping.items() if n in averaged},
                                   strict=False)

    def ema_state_dict(self, *, rank0_only: bool = False) -> dict[str, Tensor]:
        """A plain state dict of the averaged weights (names and dtypes as the model's, no
        wrapper prefixes): ``model.load_state_dict(ema.ema_state_dict())`` just works.
        Frozen parameters and integer buffers come from the live model.

        Under FSDP2 or ``shard=True`` the shards are gathered into full tensors, so the dict
        loads into an unsharded model; this is a collective (every rank calls it).
        ``rank0_only=True``: only rank 0 keeps the tensors, on the CPU; other ranks get {}.
        """
        return self._export(self._handout(), rank0_only)

    def _export(self, store: Store, rank0_only: bool) -> dict[str, Tensor]:
        flag(rank0_only, "rank0_only")
        store.synchronize()
        return views.export(store, started=self.started and not self._in_swap,
                            rank0_only=rank0_only)

    # pickling -----------------------------------------------------------------------------

    #: attributes a pickle leaves out and :meth:`__setstate__` builds again
    _UNPICKLED: tuple[str, ...] = ("module",)

    def __getstate__(self) -> dict[str, Any]:
        """``pickle`` and ``copy.deepcopy``: the model, the configuration, the laws, the
        cadence state and the guards go with the averager, and each store's averages and
        compensations by name, bitwise (``copy.deepcopy(ema)`` therefore copies the model
        too; ``copy.deepcopy((model, ema))`` keeps them bound). What is rebuilt in the
        process that loads it: the stores' layout, plan and executor (worker threads,
        compiled kernels, CUDA graphs) and :attr:`module`. A distributed average (FSDP,
        ZeRO-3, ``shard=True``) does not pickle: save it with :meth:`state_dict`."""
        self._check_not_swapped("pickle the average")  # the model holds the average now
        state = self.__dict__.copy()
        for name in self._UNPICKLED:
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.module = EMAModule(self)

    # exports through the model's own save_pretrained -------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the averaged weights (those :meth:`swapped` hands out) as a
        ``from_pretrained`` folder, through the model's own ``save_pretrained``
        (Transformers, diffusers, PEFT); the training weights are untouched.

        A ``save_pretrained`` that takes a ``state_dict`` (Transformers) gets
        :meth:`ema_state_dict`; any other (diffusers, PEFT) runs inside :meth:`swapped`, the
        training weights back bitwise after. ``kwargs`` go to it as they are. The folder is
        written beside ``save_directory`` and renamed into place; into an existing folder
        each file is replaced by one atomic rename, and weight files of an earlier save that
        this one did not write (other shards, an index) are removed, other files are kept.
        Before the start, the model's own weights are written.

        Under ``torch.distributed`` every rank calls it (a gather where the average is
        spread) and rank 0 writes. Sharded models (FSDP, ZeRO-3) need a ``save_pretrained``
        that takes a ``state_dict``.

        Example (``Net`` stands in for a Transformers, diffusers or PEFT model):
            >>> import os, tempfile, torch, emakit
            >>> class Net(torch.nn.Linear):
            ...     def save_pretrained(self, folder, state_dict=None):
            ...         torch.save(state_dict, os.path.join(folder, "weights.pt"))
            >>> model = Net(3, 2)
            >>> ema = emakit.EMA(model, half_life="10ba"); ema.step()
            >>> folder = os.path.join(tempfile.mkdtemp(), "ema")
            >>> ema.save_pretrained(folder)
            >>> saved = torch.load(os.path.join(folder, "weights.pt"), weights_only=True)
            >>> torch.equal(saved["weight"], ema.ema_state_dict()["weight"])
            True
        """
        self._save_pretrained(self._handout(), save_directory, kwargs)

    def _save_pretrained(self, store: Store, save_directory: Any, kwargs: dict[str, Any]
                         ) -> None:
        folder = Path(path_arg(save_directory, "save_directory"))
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_directory: {str(folder)!r} is a file; expected a folder")
        if "state_dict" in kwargs:
            raise TypeError("save_pretrained: state_dict is not an argument here (the "
                            "average is what is saved)")
        self._check_not_swapped("save the average")
        method = _save_pretrained_of(self.model)
        writes = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        if "state_dict" in inspect.signature(method).parameters:
            state = self._export(store, rank0_only=True)  # a collective where spread
            if writes:
                _write_folder(folder, lambda d: method(d, state_dict=state, **kwargs))
            return
        if store.model_forward:
            raise ValueError(
                f"save_pretrained: {type(self.model).__name__}'s save_pretrained takes no "
                "state_dict, and its weights are sharded (FSDP, ZeRO-3), so it cannot write "
                "them; export ema.ema_state_dict() instead")
        with self._swap_of(store):
            if writes:
                _write_folder(folder, lambda d: method(d, **kwargs))

    # checkpoints --------------------------------------------------------------------------

    def _config_record(self) -> dict[str, Any]:
        """What the state records of how it was made (compared, with a warning, on load)."""
        c = self._cadence
        phase = {"update_phase": c.update_phase} if c.update_phase != "zero" else {}
        return {"update_interval": str(c.interval), "start": str(c.start), **phase}

    def _tensor_state(self) -> dict[str, Any]:
        """The averages (and compensations) in :attr:`STATE_KIND`'s format."""
        avgs = [_clones(views.tensors(s)) for s in self._stores]
        comps = [_clones(views.compensation(s)) for s in self._stores]
        compensated = self.config.compensated
        if self.STATE_KIND == "ema":
            return {"average": avgs[0], **({"compensation": comps[0]} if compensated else {})}
        return {"averages": avgs, **({"compensations": comps} if compensated else {})}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; loads with ``torch.load(weights_only=True)``."""
        for store in self._all_stores():
            store.synchronize()
        s = self._state
        return {
            "version": CURRENT[self.STATE_KIND],
            "config": self._config_record(),
            "clock": s.counts.as_dict(),
            "num_updates": s.num_updates,
            "skipped_updates": self.skipped_updates,
            "started": s.started,
            "origin": s.origin,
            "k": s.k,
            **self._scaler_state(),
            **self._tensor_state(),
        }

    def _scaler_state(self) -> dict[str, float]:
        """The grad_scaler's scale at the last update, which the next update compares to."""
        for guard in self._guards:
            if isinstance(guard, ScalerSkipped) and (scale := guard.scale_before()) is not None:
                return {"grad_scaler_scale": scale}
        return {}

    def _resume_scaler(self, state: Mapping[str, Any], check: bool) -> None:
        """The saved scale to the ScalerSkipped guard (``check``: only validate it)."""
        scale = state.get("grad_scaler_scale")
        if scale is None:
            return
        if check:
            ScalerSkipped.check_scale(scale)
            return
        for guard in self._guards:
            if isinstance(guard, ScalerSkipped):
                guard.resume(scale)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. All or nothing: everything is checked first
        (keys, counts, names and shapes of every average: a state from another architecture
        raises a ValueError listing what differs), and nothing changes when it raises. States
        of earlier versions load too (:mod:`emakit.migrations`)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping from {type(self).__name__}.state_dict(), "
                            f"got {type(state).__name__}")
        self._check_not_swapped("load a state")
        parsed = self._parse_state(state)
        tensors = self._parse_tensors(parsed)
        self._check_extra(parsed)
        self._resume_scaler(parsed, check=True)
        # nothing below raises for a state that passed the checks above
        for store, (average, comp) in zip(self._stores, tensors, strict=True):
            store.load(average, what="state", compensation=comp)
        cadence_state, skipped = _cadence_state(parsed)
        self._state = cadence_state
        self._skipped_base = skipped - sum(g.skipped() for g in self._guards)
        self._resume_scaler(parsed, check=False)
        self._load_extra(parsed)
        self._compare_config(parsed.get("config", {}))

    def _parse_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        name = type(self).__name__
        required = ("version", "clock", "num_updates", "started",
                    *(("average",) if self.STATE_KIND == "ema" else ("averages",)))
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"state: not a {name}.state_dict(); missing keys {missing}")
        interval = self._cadence.interval
        parsed = upgrade(self.STATE_KIND, state, int(interval.value), interval.unit)
        _cadence_state(parsed)  # raises naming the bad entry
        return parsed

    def _parse_tensors(
        self, state: Mapping[str, Any]
    ) -> list[tuple[Mapping[str, Tensor], Mapping[str, Tensor] | None]]:
        """Per store: (averages, compensation or None), each checked against the store."""
        averages: Any
        comps: Any
        if self.STATE_KIND == "ema":
            averages, comps = [state.get("average")], [state.get("compensation")]
            keys = ("average", "compensation")
        else:
            averages, comps = state.get("averages"), state.get("compensations")
            keys = ("averages", "compensations")
        if not isinstance(averages, Sequence) or len(averages) != len(self._stores):
            raise ValueError(f"state[{keys[0]!r}]: expected {len(self._stores)} mapping(s) of "
                             f"tensors, got {type(averages).__name__}")
        if comps is None or not self.config.compensated:
            comps = [None] * len(self._stores)
        if not isinstance(comps, Sequence) or len(comps) != len(self._stores):
            raise ValueError(f"state[{keys[1]!r}]: expected one mapping per average")
        out: list[tuple[Mapping[str, Tensor], Mapping[str, Tensor] | None]] = []
        for i, (store, average, comp) in enumerate(zip(self._stores, averages, comps,
                                                        strict=True)):
            suffix = "" if self.STATE_KIND == "ema" else f"[{i}]"
            store.synchronize()
            store.check_load(average, what=f"state[{keys[0]!r}]{suffix}")
            if comp is not None:
                store.check_load(comp, what=f"state[{keys[1]!r}]{suffix}")
            out.append((average, comp))
        return out

    def _check_extra(self, state: Mapping[str, Any]) -> None:
        """Check the face's own part of ``state`` (before anything changes)."""

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        """Load the face's own part of ``state`` (after it was checked)."""

    def _compare_config(self, saved: Any) -> None:
        """Warn when ``saved`` (a state's ``config``) differs from this averager's record in
        a key both hold: a state saved by an emakit that did not record a key yet (the law)
        is compared on the keys it has. ``update_phase`` is recorded only when it is not
        the default ``"zero"``: its absence means ``"zero"``."""
        mine = {"update_phase": "zero", **self._config_record()}
        if isinstance(saved, Mapping):
            saved = {k: v for k, v in {"update_phase": "zero", **saved}.items() if k in mine}
            mine = {k: v for k, v in mine.items() if k in saved}
        if saved and saved != mine:
            warnings.warn(
                f"emakit: loading a state saved with {saved} into one built with {mine}",
                UserWarning,
                stacklevel=3,
            )


def _clones(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().clone() for n, t in tensors.items()}


def _cadence_state(state: Mapping[str, Any]) -> tuple[CadenceState, int]:
    """The cadence state and the skipped count a (current-version) state holds; a value of
    the wrong type or range is a ValueError naming it."""
    counts = Counts.from_mapping(state.get("clock"), "state['clock']")
    started = state.get("started")
    if not isinstance(started, bool):
        raise ValueError(f"state['started']: expected a bool, got {started!r}")
    num = _whole(state.get("num_updates"), "state['num_updates']")
    skipped = _whole(state.get("skipped_updates", 0), "state['skipped_updates']")
    k = _whole(state.get("k"), "state['k']")
    origin = state.get("origin")
    if isinstance(origin, bool) or not isinstance(origin, int):
        raise ValueError(f"state['origin']: expected an integer, got {origin!r}")
    if started and (num < 1 or k < 1):
        raise ValueError(f"state: started, but num_updates={num!r} and k={k!r} (both >= 1)")
    return CadenceState(counts, started, origin, k, num), skipped


def _whole(value: Any, name: str) -> int:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = int(value)
    try:
        return check_count(value, name)
    except TypeError as err:
        raise ValueError(str(err)) from None


class EMAModule(nn.Module):
    """Computes with the averaged weights through ``torch.func.functional_call``: no swap and
    no copy of the weights beyond the average itself (a transient cast only where the
    storage dtype or device differs from the model's). For teacher networks (BYOL, DINO,
    mean teacher) while training goes on. Runs without autograd; in eval mode unless
    ``.train()`` is called, whatever mode the trained model is in.

    Threads: a call puts the averaged tensors into the trained model's modules for its
    duration (``functional_call`` swaps them in and back), so it must not run while another
    thread runs the trained model (a forward or an optimizer step there would see, or write
    into, the averaged values). Call it from the training thread, as teacher networks do; to
    evaluate in another thread, give it its own copy (``model2.load_state_dict(
    ema.ema_state_dict())``).
    """

    _averager: Averager

    def __init__(self, averager: Averager) -> None:
        super().__init__()
        # Not a submodule: the trained model's parameters must not show up here.
        object.__setattr__(self, "_averager", averager)
        self.train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        averager: Averager = self._averager
        model = averager.model
        store = averager._handout()
        store.synchronize()
        if store.model_forward:
            return self._forward_model(args, kwargs)
        mapping = views.mapping(store, started=averager.started and not averager._in_swap)
        if self.training:
            # Train-mode BatchNorm writes running statistics in place: keep the average safe.
            buffers = {n for n, _ in model.named_buffers()}
            mapping = {n: t.clone() if n in buffers else t for n, t in mapping.items()}
        modes = [(m, m.training) for m in model.modules()]
        model.train(self.training)
        try:
            with torch.no_grad():
                return torch.func.functional_call(model, mapping, args, kwargs)
        finally:
            for m, mode in modes:
                m.training = mode

    def _forward_model(self, args: tuple, kwargs: dict) -> Any:
        # FSDP2's and ZeRO-3's forward installs the gathered training parameters, overriding
        # functional_call's: swap the averaged shards in instead (a backup of this rank's
        # shards, 1/world of the model), restored bitwise after. A collective, like any
        # such forward: every rank calls it.
        averager: Averager = self._averager
        model = averager.model
        buffers = list(model.buffers()) if self.training else []
        saved = [b.detach().clone() for b in buffers]
        modes = [(m, m.training) for m in model.modules()]
        model.train(self.training)
        store = averager._handout()
        swap = store.swapped() if averager.started and not averager._in_swap else None
        try:
            with torch.no_grad(), swap or contextlib.nullcontext():
                return model(*args, **kwargs)
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved, strict=True):
                    b.copy_(v)
            for m, mode in modes:
                m.training = mode

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        """The averaged weights, as ``ema_state_dict()``."""
        return self._averager.ema_state_dict()

    def extra_repr(self) -> str:
        return repr(self._averager)


def _save_pretrained_of(model: nn.Module) -> Any:
    """The model's ``save_pretrained`` (through wrappers that keep it in ``.module``), or a
    TypeError naming ``model``."""
    target: Any = model
    while not callable(getattr(target, "save_pretrained", None)):
        inner = getattr(target, "module", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"model: {type(model).__name__} has no save_pretrained "
                            "(Transformers, diffusers and PEFT models have one); export "
                            "ema.ema_state_dict() instead")
        target = inner
    return target.save_pretrained


def _weights_stem(name: str) -> str | None:
    """``"model"`` for ``model.safetensors``, ``model-00001-of-00002.safetensors`` and
    ``model.safetensors.index.json``; None for a file that holds no weights."""
    if not name.endswith((".safetensors", ".bin", ".index.json")):
        return None
    return name.split(".")[0].split("-0")[0]


def _write_folder(folder: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` into a fresh folder beside ``folder``, then publish it: one rename
    when ``folder`` does not exist, else one rename per file, and the weight files of the
    same stems that this write did not produce removed (so no stale shard or index is read
    in place of the new weights)."""
    parent = folder.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        write(str(tmp))
        if not folder.exists():
            os.replace(tmp, folder)
            return
        made = {p.name for p in tmp.iterdir()}
        for p in tmp.iterdir():
            dest = folder / p.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            os.replace(p, dest)
        stems = {_weights_stem(n) for n in made} - {None}
        for old in folder.iterdir():
            if old.name not in made and old.is_file() and _weights_stem(old.name) in stems:
                old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
