"""The one place tests reach into emakit's private engine (the store behind an average)."""

from __future__ import annotations

from torch import Tensor

from emakit._engine import views
from emakit._engine.store import Store


def store_of(average) -> Store:
    """The store whose weights ``average`` (an EMA, BEMA or PostHocEMA) hands out."""
    return average._handout()


def tensors_of(average) -> dict[str, Tensor]:
    """The averaged tensors by canonical name, in the storage dtype (views of the store)."""
    return views.tensors(store_of(average))


def make_store(model, group=None, placement=None, **storage) -> Store:
    """A store of ``model`` built from storage keywords (uncompensated unless asked)."""
    from emakit.config import StoreConfig

    storage.setdefault("compensated", False)
    return Store(model, StoreConfig(**storage), group=group, placement=placement)
