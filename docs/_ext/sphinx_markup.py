"""A griffe extension for the API reference: the Sphinx markup of emakit's docstrings, rendered.

The docstrings are written for ``help()`` and for readers of the source, with Sphinx's roles
(``:class:`~emakit.EMA```, ``:func:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:data:``) and
math (``.. math::`` blocks, ``:math:`` inline). mkdocstrings reads Markdown, where those show
as literal text; this extension rewrites them when the package is loaded for the site:

- a role whose target is an object the API reference renders becomes a cross-reference (a
  link checked by ``mkdocs build --strict``: a link to a page that does not render the object
  fails the build); a target elsewhere in emakit (a private module) or outside it (``torch``)
  becomes code; a target that does not exist is a build warning (an error under ``--strict``);
- math becomes MathML (``latex2mathml``), which browsers render natively: no script, nothing
  fetched, the site works offline.

The source docstrings stay as they are. Targets resolve as Sphinx resolves them: relative to
the object, its class (and the classes it inherits from) and its module, then from ``emakit``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import griffe
from latex2mathml.converter import convert

_log = logging.getLogger("mkdocs.plugins.emakit.sphinx_markup")



PAGES = Path(__file__).resolve().parents[1] / "api"


def api_modules(pages: Path = PAGES) -> list[str]:
    """The modules the API reference renders (the ``::: module`` lines of docs/api/*.md), in
    the order their paths are preferred for a link: ``emakit`` first, so an object it
    exports links to ``emakit.NAME``."""
    names = {line.split()[1] for page in pages.glob("*.md")
             for line in page.read_text().splitlines() if line.startswith("::: ")}
    return sorted(names, key=lambda n: (n != "emakit", n))


API_MODULES = api_modules()

ROLE = re.compile(r":(class|func|meth|mod|attr|data|exc|obj):`([^`]+)`")
INLINE_MATH = re.compile(r":math:`([^`]+)`")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<first>.*)$")


def mathml(latex: str, display: bool) -> str:
    """``latex`` as MathML (one line: Markdown passes it through as raw HTML)."""
    return convert(latex.strip(), display="block" if display else "inline").replace("\n", "")


def render_math(text: str) -> str:
    """``.. math::`` blocks (the directive line's text and the lines indented under it) as
    display MathML at the directive's indentation; ``:math:`...``` inline."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = MATH_DIRECTIVE.match(lines[i])
        if m is None:
            out.append(lines[i])
            i += 1
            continue
        indent, body = m["indent"], [m["first"]]
        i += 1
        while i < len(lines) and lines[i].strip() and (
                len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        if out and out[-1].strip():
            out.append("")
        out.append(f'{indent}<div class="math">{mathml(" ".join(body), True)}</div>')
        if i < len(lines) and lines[i].strip():
            out.append("")
    return INLINE_MATH.sub(lambda m: mathml(m[1], False), "\n".join(out))


class SphinxMarkup(griffe.Extension):
    """Rewrites the roles and math of every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "emakit":
            return
        self.collection = loader.modules_collection
        self.public = self._public_paths()
        done: set[int] = set()
        for path in self.public:  # what the site renders: its docstrings, and its members'
            for obj in _rendered(self.collection[path]):
                if id(obj) not in done and obj.docstring is not None:
                    done.add(id(obj))
                    obj.docstring.value = self.rewrite(obj.docstring.value, obj)

    def _public_paths(self) -> dict[str, str]:
        """canonical path -> the path the API reference renders it under."""
        out: dict[str, str] = {}
        for name in API_MODULES:
            try:
                module = self.collection[name]
            except KeyError:
                continue
            out.setdefault(module.path, module.path)
            exported = module.exports if module.exports is not None else [
                n for n in module.members if not n.startswith("_")]
            for member in exported:
                member = member if isinstance(member, str) else member.name
                try:
                    target = module[member]
                    canonical = target.canonical_path
                except (KeyError, griffe.AliasResolutionError):
                    continue
                out.setdefault(canonical, f"{module.path}.{member}")
        return out

    def rewrite(self, text: str, obj: griffe.Object) -> str:
        parts = re.split(r"(^```.*?^```)", text, flags=re.M | re.S)  # leave code fences
        for i in range(0, len(parts), 2):
            parts[i] = ROLE.sub(lambda m: self._role(m[1], m[2], obj), render_math(parts[i]))
        return "".join(parts)

    def _role(self, kind: str, target: str, obj: griffe.Object) -> str:
        short = target.startswith("~")
        name = target.lstrip("~.").removesuffix("()")
        title = name.rsplit(".", 1)[-1] if short else name
        if kind in ("func", "meth"):
            title += "()"
        found = self._find(name, obj)
        if found is None:
            if name.split(".")[0] in ("emakit", "") or "." not in name:
                _log.warning("%s: :%s:`%s` names nothing in emakit", obj.path, kind, target)
            return f"<code>{title}</code>"
        identifier = self._public(found)
        if identifier is None:
            return f"<code>{title}</code>"
        return f"[<code>{title}</code>][{identifier}]"

    def _find(self, name: str, obj: griffe.Object) -> str | None:
        """The path under which ``name`` resolves from ``obj``'s scopes, or None."""
        scopes: list[griffe.Object] = []
        scope: griffe.Object | None = obj
        while scope is not None:
            scopes.append(scope)
            if scope.is_class:
                scopes.extend(_bases(scope))
            scope = scope.parent
        for candidate in [*(f"{s.path}.{name}" for s in scopes), name, f"emakit.{name}"]:
            try:
                self.collection[candidate]
            except (KeyError, ValueError, griffe.AliasResolutionError):
                continue
            return candidate
        return None

    def _public(self, path: str) -> str | None:
        """The rendered identifier of the object at ``path``: its longest prefix that the
        API reference renders, with the rest appended; None when none is rendered or the
        object itself would not be (a member without a docstring)."""
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            try:
                prefix = self.collection[".".join(parts[:i])]
                canonical = prefix.canonical_path
            except (KeyError, griffe.AliasResolutionError):
                continue
            rest = parts[i:]
            if rest and prefix.is_module:  # a module renders its exports, found above
                continue
            if canonical in self.public:
                if rest and any(n.startswith("_") for n in rest):
                    return None
                if rest and self.collection[path].docstring is None:
                    return None
                return ".".join([self.public[canonical], *rest])
        return None


def _bases(cls: griffe.Object) -> list[griffe.Object]:
    try:
        return [b for b in cls.mro() if b.path.startswith("emakit")]  # type: ignore[attr-defined]
    except Exception:  # an unresolvable base (torch's classes): no scope from it
        return []


def _target(obj: Any) -> Any:
    try:
        return obj.final_target if obj.is_alias else obj
    except griffe.AliasResolutionError:  # an alias to something outside emakit
        return None


def _rendered(obj: Any):
    """``obj`` and its public members (inherited ones too), each as the object it is."""
    obj = _target(obj)
    if obj is None:
        return
    yield obj
    if obj.is_module:  # a module's members are rendered from their own paths
        return
    members = obj.all_members if obj.is_class else obj.members
    for name, member in members.items():
        if not name.startswith("_"):
            yield from _rendered(member)
