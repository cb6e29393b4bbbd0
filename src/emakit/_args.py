"""Strict argument checks shared by the whole package: each raises an error naming the
argument and what was expected, instead of accepting anything truthy.

>>> flag(True, "overwrite")
True
>>> flag("no", "overwrite")
Traceback (most recent call last):
    ...
TypeError: overwrite: expected True or False, got str 'no'
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["flag", "path_arg"]


def flag(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False``; a TypeError naming ``name`` otherwise.

    ``bool`` subclasses and numpy booleans are refused too: ``"no"``, ``"False"``, ``0`` and
    ``1`` would all act as one of the two, which is how flags get silently flipped.
    """
    if value is True or value is False:
        return value
    raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")


def path_arg(value: Any, name: str) -> str:
    """``os.fspath(value)`` for a ``str`` or ``os.PathLike`` naming something; a TypeError
    naming ``name`` for anything else (``None``, a number, bytes) and a ValueError for ``""``.

    >>> path_arg(5, "checkpoint_id")
    Traceback (most recent call last):
        ...
    TypeError: checkpoint_id: expected a path (str or os.PathLike), got int 5
    """
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str):
            if not text:
                raise ValueError(f"{name}: expected a path, got an empty string")
            return text
    raise TypeError(f"{name}: expected a path (str or os.PathLike), got "
                    f"{type(value).__name__} {value!r}")
