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
same relative offsets as their averages), and :func:`generation`, a counter that every
parameter, buffer or submodule registration in the process advances (``m.w = Parameter``,
``register_buffer``, ``load_state_dict(assign=True)``, an appended layer): one integer
comparison tells a plan whether such a change may have happened since it was made.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..config import Selector
from .flat_params import FlatView, Item, state_items

__all__ = ["ALIGN", "align", "Kind", "Entry", "FlatEntry", "Matcher", "classify", "generation"]

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

_generation = 0
_hooks: list = []


def _bump(*args: object) -> None:
    global _generation
    _generation += 1


def generation() -> int:
    """A counter advanced by every parameter, buffer and submodule registration in the
    process (torch's global registration hooks, installed at the first call).

    >>> import torch
    >>> g = generation()
    >>> m = torch.nn.Linear(2, 2)
    >>> generation() > g
    True
    """
    if not _hooks:
        from torch.nn.modules import module as _m

        _hooks.append(_m.register_module_parameter_registration_hook(_bump))
        _hooks.append(_m.register_module_buffer_registration_hook(_bump))
        _hooks.append(_m.register_module_module_registration_hook(_bump))
    return _generation


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
    entries: list[Entry] = []
    for names, item in found:
        view = item.tensor if isinstance(item.tensor, FlatView) else None
        probe = view.meta() if view is not None else item.tensor
        kind = Kind.LIVE if excluded(names, probe) else _kind(item, names, probe, buffers,
                                                              included)
        if view is not None:
            entries.append(FlatEntry(names, item.module, item.attr, True, kind, view))
        else:
            entries.append(Entry(names, item.module, item.attr, item.is_param, kind))
    excluded.check_used("tensor")
    included.check_used("floating buffer")
    return entries
