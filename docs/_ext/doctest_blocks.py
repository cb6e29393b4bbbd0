"""A griffe extension for the API reference: doctests (``>>>`` lines) render as code.

A Google ``Example:`` heading becomes ``Examples:`` (the section griffe renders as
console code), and a doctest at the top level of a docstring, outside any section, is fenced
as ``pycon`` instead of being read as Markdown (where ``>>>`` becomes nested block quotes and
``[1, 2]`` a link). The docstrings themselves stay plain doctests, run by
``pytest --doctest-modules``."""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    """Wrap each run of non-blank lines that starts with ``>>>`` at column 0 in a fence."""
    lines, out, i = text.split("\n"), [], 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_fence = not in_fence
        if not in_fence and line.rstrip() == "Example:":
            line = "Examples:"
        if not in_fence and line.startswith(">>>"):
            out.append("```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append("```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:  # idempotent: fenced lines are skipped
            obj.docstring.value = fence_doctests(obj.docstring.value)

    on_object = on_instance
