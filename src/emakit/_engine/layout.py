"""Layout: which of a model's tensors are averaged, copied or left live, under which names.

Each state-dict entry of the model falls in one of three kinds:

- ``average``: trainable floating parameters, floating buffers with ``buffers="average"``,
  and floating buffers matched by ``include``; stored and updated with the EMA rule.
- ``copy``: other floating buffers (``buffers="copy"``); stored and copied at each update.
- ``live``: frozen parameters, integer buffers (``num_batches_tracked``) and every tensor
  matched by ``exclude``; never stored twice: exports read them from the live model.

Extra state (``get_extra_state``) is not a tensor the EMA can track and is left out. Tied
tensors (one tensor under several names) are one entry whose first name is canonical.

``exclude`` and ``include`` are glob patterns over state-dict names (``fnmatch``, so
``"*.bias"`` or ``"head.*"``), one string or a sequence of them, or a callable
``(name, tensor) -> bool``. A pattern that matches nothing is a ValueError naming it; a
tensor that both select is excluded.

Also here: the alignment shared with :func:`emakit.flatten_parameters` (every stored view
starts at a multiple of :data:`ALIGN` elements, so a flattened model's parameters sit at the
same relative offsets as their averages), and :class:`Registrations`: the parameter,
buffer and submodule registrations on a model's own modules since a plan was made
(``m.w = Parameter``, ``register_buffer``, ``load_state_dict(assign=True)``, an appended
layer), kept only when they may have changed what a module holds; registrations anywhere
else in the process are forgotten as they happen.
"""

from __future__ import annotations

import enum
import fnmatch
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import STORAGE_DTYPES, Selector
from .flat_params import WRAPPERS, FlatView, Item, state_items
from .tensors import is_dtensor

__all__ = [
    "ALIGN", "align", "Kind", "Entry", "FlatEntry", "Matcher", "classify", "refusal",
    "Registrations",
]

ALIGN = 16  # elements; every view starts 64-byte aligned (fp32), for vectorized kernels


class Kind(enum.Enum):
    """What the store does with a tensor (the value is the name files and messages use)."""

    AVERAGE = "average"  # stored, updated with the EMA rule
    COPY = "copy"  # stored, takes the model's value at each update
    LIVE = "live"  # not stored: exports read it from the model


def align(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN` elements.

    >>> align(1), align(16), align(17)
    (16, 16, 32)
    """
    return (n + ALIGN - 1) // ALIGN * ALIGN


# registrations ---------------------------------------------------------------------------

_ATTRS = ("_parameters", "_buffers", "_modules")
_live: tuple[weakref.ref[Registrations], ...] = ()  # every Registrations not yet collected
_hooks: list[Any] = []


def _held(module: nn.Module, name: str) -> Any:
    """What ``module`` holds under ``name`` as far as its state dict is concerned: the
    parameter, the persistent buffer or the submodule (None: nothing, or a non-persistent
    buffer)."""
    p = module._parameters.get(name)
    if p is not None:
        return p
    b = module._buffers.get(name)
    if b is not None and name not in module._non_persistent_buffers_set:
        return b
    return module._modules.get(name)


def _on_parameter_or_module(module: nn.Module, name: str, value: Any) -> None:
    for ref in _live:
        r = ref()
        if r is not None and id(module) in r.ids:
            r.note(module, name, value, same_is_nothing=True)


def _on_buffer(module: nn.Module, name: str, value: Any) -> None:
    # the same tensor registered again may change its persistence, which the hook does not see
    for ref in _live:
        r = ref()
        if r is not None and id(module) in r.ids:
            r.note(module, name, value, same_is_nothing=False)


def _forget(ref: weakref.ref) -> None:
    global _live
    _live = tuple(r for r in _live if r is not ref)


def _install() -> None:
    if not _hooks:
        from torch.nn.modules import module as _m

        _hooks.append(_m.register_module_parameter_registration_hook(_on_parameter_or_module))
        _hooks.append(_m.register_module_module_registration_hook(_on_parameter_or_module))
        _hooks.append(_m.register_module_buffer_registration_hook(_on_buffer))


class Registrations:
    """The registrations (parameters, buffers, submodules) on ``modules`` since it was made
    that may have changed what they hold.

    torch's global registration hooks (installed once) run for every registration in the
    process; one on a module outside ``modules`` (a loss built per step, another model)
    costs a set lookup per live :class:`Registrations` and is forgotten. One on a module in
    ``modules`` of the very object it held under that name (FSDP1 with
    ``use_orig_params=True`` sets its original parameters again after every forward) is
    forgotten too. Any other is kept, and :meth:`changed` compares what the module holds
    under that name now with what it held when this was made (after the registration
    completed: the hook runs before it). A registration names its module, so a layer added
    to a module in ``modules`` is seen, though the layer itself is not in ``modules``.

    Not seen here (no hook runs): ``module._buffers[k] = x`` and ``.data`` assignment (the
    plan's watch compares addresses), and deletions (``del model[1]``; the watch compares
    children).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> seen = Registrations(model.modules())
    >>> _ = torch.nn.CrossEntropyLoss(), torch.nn.Linear(2, 2)  # elsewhere: forgotten
    >>> model[0].weight = model[0].weight  # the same parameter again: forgotten
    >>> seen.pending, seen.changed()
    ({}, False)
    >>> _ = model.append(torch.nn.Linear(2, 2))
    >>> seen.changed()
    True
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        global _live
        _install()
        self.ids: set[int] = set()
        self.held: dict[tuple[int, str], Any] = {}  # strong references: compared by identity
        for m in modules:
            self.ids.add(id(m))
            for attr in _ATTRS:
                for name in getattr(m, attr):
                    self.held[(id(m), name)] = _held(m, name)
        self.pending: dict[tuple[int, str], nn.Module] = {}
        self.tripped = False
        _live = (*_live, weakref.ref(self, _forget))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a copy (deepcopy, pickle) watches copied modules under other ids, unregistered:
        # the first check looks again, and the watch then starts afresh on the copies
        self.__dict__.update(state)
        self.tripped = True

    def note(self, module: nn.Module, name: str, value: Any, same_is_nothing: bool) -> None:
        """Called by the hooks, before ``module`` holds ``value`` under ``name``."""
        key = (id(module), name)
        if same_is_nothing and value is not None and self.held.get(key) is value:
            return
        self.pending[key] = module

    def changed(self) -> bool:
        """Whether a registration since this was made left a module holding another object
        under a name than it held then (once true, stays true)."""
        if self.pending:
            pending, self.pending = self.pending, {}
            self.tripped = self.tripped or any(
                _held(m, key[1]) is not self.held.get(key) for key, m in pending.items()
            )
        return self.tripped


# entries ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Entry:
    """One tensor of the model (all its tied names) and what the EMA does with it."""

    names: list[str]  # the first is canonical; the others are tied aliases
    module: nn.Module
    attr: str
    is_param: bool
    kind: Kind

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def table(self) -> dict[str, Any]:
        """The module dict that holds the tensor (``_parameters`` or ``_buffers``)."""
        table: dict[str, Any] = self.module._parameters if self.is_param else self.module._buffers
        return table

    def tensor(self) -> Tensor:
        """The model's tensor as the model holds it now (a DTensor under FSDP2)."""
        return self.table[self.attr]


class Matcher:
    """A compiled ``exclude``/``include`` argument; remembers which patterns matched."""

    def __init__(self, spec: Selector, what: str) -> None:
        """``spec`` as :class:`~emakit.StoreConfig` holds it (validated there): a callable,
        patterns (a string or a sequence of strings), or None."""
        self.what = what
        self.fn: Callable[[str, Tensor], bool] | None = None
        self.patterns: list[str] = []
        if callable(spec):
            self.fn = spec
        elif spec is not None:
            self.patterns = [spec] if isinstance(spec, str) else list(spec)
        self.used: set[str] = set()

    def __call__(self, names: Sequence[str], tensor: Tensor) -> bool:
        if self.fn is not None:
            return any(bool(self.fn(n, tensor)) for n in names)
        hit = False
        for p in self.patterns:
            if any(fnmatch.fnmatchcase(n, p) for n in names):
                self.used.add(p)
                hit = True
        return hit

    def check_used(self, candidates: str) -> None:
        unused = [p for p in self.patterns if p not in self.used]
        if unused:
            raise ValueError(
                f"{self.what}: pattern(s) {unused} match no {candidates} of the model"
            )


@dataclass(eq=False)
class FlatEntry(Entry):
    """An original parameter of an FSDP1 ``FlatParameter``. The staleness watch reads the
    unit's flat parameter from its handle (``handle.flat_param``) and the placement maps it to
    its local shard; ``tensor()`` is the parameter's :class:`~.flat_params.FlatView`."""

    view: FlatView | None = None

    @property
    def table(self) -> dict[str, Any]:
        table: dict[str, Any] = self.module._handle.__dict__
        return table

    def tensor(self) -> Any:
        return self.view


def _kind(item: Item, names: list[str], probe: Tensor, buffers: str, included: Matcher) -> Kind:
    floating = probe.is_floating_point()
    if item.is_param:
        return Kind.AVERAGE if probe.requires_grad and floating else Kind.LIVE
    if floating:
        picked = included(names, probe)  # called for every floating buffer: see check_used
        return Kind.AVERAGE if buffers == "average" or picked else Kind.COPY
    return Kind.LIVE


# the closed world ------------------------------------------------------------------------

#: What a stored tensor may be: a plain tensor or ``nn.Parameter`` (DeepSpeed ZeRO-3 and
#: FSDP1 ``use_orig_params=True`` parameters are ``nn.Parameter``), or a DTensor where the
#: model's parameters are DTensors (FSDP2, tensor parallelism: the DTensor placement).
_PLAIN = (Tensor, nn.Parameter)


def refusal(name: str, t: Tensor, trains: bool, stored: bool, dtensors: bool) -> str | None:
    """Why the EMA cannot take model tensor ``name`` as :func:`classify` would (a ValueError
    message that says what to do), or None when it can.

    ``trains``: a parameter that requires grad and is not excluded (it must be averaged);
    ``stored``: the store would keep it (averaged or copied); ``dtensors``: the model's
    parameters are DTensors, so the DTensor placement keeps DTensor entries. Tensors left
    live (frozen parameters, integer buffers, excluded tensors) are exported from the model as
    it holds them and may be of any kind.

    >>> import torch
    >>> refusal("w", torch.zeros(2, dtype=torch.complex64), True, False, False).split(";")[0]
    'model: w is a complex parameter (torch.complex64) that trains'
    >>> refusal("w", torch.zeros(2), True, True, False) is None
    True
    """
    if not (trains or stored):
        return None
    problem = _problem(t, trains, dtensors)
    if problem is None:
        return None
    what, hint = problem
    fix = f"exclude it (exclude=[{name!r}]) to export it from the model as it is"
    return f"model: {name} {what}: {fix}{hint}"


def _problem(t: Tensor, trains: bool, dtensors: bool) -> tuple[str, str] | None:
    """What makes ``t`` a tensor the EMA cannot average, and a further hint; or None."""
    if t.is_meta:
        return "is on the meta device and holds no values", (
            ", or materialize the model (to_empty + init) before building the EMA")
    if trains and t.is_complex():
        return (f"is a complex parameter ({t.dtype}) that trains; emakit averages real "
                "floating tensors only", ", or hold it in the model as a real tensor of "
                "(real, imaginary) pairs (torch.view_as_real)")
    if trains and not t.is_floating_point():
        return f"requires grad but holds {t.dtype}, not a floating dtype", ""
    kind = type(t)
    if not (kind in _PLAIN or (dtensors and is_dtensor(t))):
        return (f"is a {kind.__module__}.{kind.__qualname__}, a tensor subclass emakit does "
                "not know (it averages plain tensors and nn.Parameter, FSDP2 and DTensor "
                "shards, FSDP1 flat parameters and DeepSpeed ZeRO-3 partitions), so its "
                "average could be wrong", ", or hold it as a plain nn.Parameter")
    if t.is_nested:
        return "is a nested tensor, which emakit does not average", ""
    if t.layout != torch.strided:
        return f"is a {t.layout} tensor, which emakit does not average", ", or make it dense"
    if t.dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in STORAGE_DTYPES)
        return f"holds {t.dtype}, which emakit does not average (it averages {names})", ""
    return None


def _check_untracked(model: nn.Module, entries: list[Entry], excluded: Matcher) -> None:
    """Every parameter that trains is an entry (or excluded): a parameter that
    ``model.state_dict()`` leaves out (an overridden ``_save_to_state_dict``, a state-dict
    hook) could be neither saved nor exported, so it is named, not silently left live.
    FSDP1's parameters are entries under their original names (:class:`FlatEntry`), also
    while FSDP registers views of them in their place (``use_orig_params=False``)."""
    seen = {id(e.table.get(e.attr)) for e in entries if not isinstance(e, FlatEntry)}
    names = {n for e in entries for n in e.names}
    for name, p in model.named_parameters():
        flat = getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False)
        if not p.requires_grad or flat or id(p) in seen:
            continue
        clean = ".".join(a for a in name.split(".") if a not in WRAPPERS)
        if clean in names or excluded([clean], p):
            continue
        raise ValueError(
            f"model: {clean} trains but is not in model.state_dict() (an overridden "
            "_save_to_state_dict or a state-dict hook leaves it out), so its average could "
            f"be neither saved nor exported: exclude it (exclude=[{clean!r}]) or keep it in "
            "the state dict"
        )


def _entry(names: list[str], item: Item, buffers: str, excluded: Matcher, included: Matcher,
           dtensors: bool) -> Entry:
    """One tensor's entry, or the ValueError of :func:`refusal`."""
    view = item.tensor if isinstance(item.tensor, FlatView) else None
    probe = view.meta() if view is not None else item.tensor
    out = excluded(names, probe)
    kind = Kind.LIVE if out else _kind(item, names, probe, buffers, included)
    if out and not item.is_param and probe.is_floating_point():
        included(names, probe)  # both select it: excluded, and the pattern matched
    if view is not None:  # FSDP1's flat parameters are checked by flat_params
        return FlatEntry(names, item.module, item.attr, True, kind, view)
    trains = item.is_param and probe.requires_grad and not out
    why = refusal(names[0], probe, trains, kind is not Kind.LIVE, dtensors)
    if why is not None:
        raise ValueError(why)
    return Entry(names, item.module, item.attr, item.is_param, kind)


def classify(
    model: nn.Module,
    buffers: str = "average",
    exclude: Selector = None,
    include: Selector = None,
    cache: dict | None = None,
) -> list[Entry]:
    """The model's state-dict tensors as entries, in state-dict order, tied tensors merged
    (an FSDP1 model's flattened parameters under their original names, as
    :class:`FlatEntry`; ``cache`` keeps their views between calls).

    A closed world: every parameter that trains is averaged, or excluded by ``exclude``, or
    named in a ValueError that says what to do (:func:`refusal`: complex, sparse, nested,
    float8 and unknown tensor subclasses; a trainable parameter missing from the state
    dict). Frozen parameters and integer buffers are live: exported from the model.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    >>> [(e.name, e.kind.value) for e in classify(m, buffers="copy", exclude="0.bias")]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('0.weight', 'average'), ('0.bias', 'live'), ('1.weight', 'average'),
     ('1.bias', 'average'), ('1.running_mean', 'copy'), ('1.running_var', 'copy'),
     ('1.num_batches_tracked', 'live')]
    """
    excluded = Matcher(exclude, "exclude")
    included = Matcher(include, "include")
    found: list[tuple[list[str], Item]] = []
    by_id: dict[int, list[str]] = {}
    for item in state_items(model, cache):
        if id(item.tensor) in by_id:
            by_id[id(item.tensor)].append(item.name)
            continue
        if not item.is_param and item.attr not in item.module._buffers:  # extra state
            continue
        names = [item.name]
        by_id[id(item.tensor)] = names
        found.append((names, item))
    dtensors = any(is_dtensor(p) for p in model.parameters())
    entries = [_entry(names, item, buffers, excluded, included, dtensors) for names, item in found]
    _check_untracked(model, entries, excluded)
    excluded.check_used("tensor")
    included.check_used("floating buffer")
    return entries
