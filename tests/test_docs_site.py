"""The API reference's griffe extensions (docs/_ext), on emakit's own docstrings: every Sphinx
role of a docstring the site renders resolves, math becomes MathML, and what the public API
exports is on a page. ``make docs`` (``mkdocs build --strict``) checks the links themselves."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest

griffe = pytest.importorskip("griffe")
latex2mathml = pytest.importorskip("latex2mathml.converter")

import emakit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _extension():
    path = ROOT / "docs" / "_ext" / "sphinx_markup.py"
    spec = importlib.util.spec_from_file_location("sphinx_markup", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sphinx_markup"] = module
    spec.loader.exec_module(module)
    return module


ext = _extension()


def _load():
    markup = ext.SphinxMarkup()
    loader = griffe.GriffeLoader(search_paths=[str(ROOT / "src")],
                                 extensions=griffe.load_extensions(markup))
    loader.load("emakit")
    return markup, loader.modules_collection


def test_every_role_of_a_rendered_docstring_resolves(caplog):
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.emakit.sphinx_markup"):
        markup, collection = _load()
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    seen, links = 0, 0
    for path in markup.public:
        for obj in ext._rendered(collection[path]):
            text = obj.docstring.value if obj.docstring else ""
            assert not ext.ROLE.search(text) and ".. math::" not in text, obj.path
            assert ":math:`" not in text, obj.path
            seen += 1
            links += len(re.findall(r"\]\[emakit\.", text))
    assert seen > 100 and links > 50  # the walk reached the docstrings, and linked


def test_a_role_that_names_nothing_warns_and_stays_code(caplog):
    markup, collection = _load()
    obj = collection["emakit.ema.EMA"]
    with caplog.at_level(logging.WARNING, logger="mkdocs.plugins.emakit.sphinx_markup"):
        out = markup.rewrite("see :class:`~emakit.NoSuchThing` and :class:`torch.nn.Module`",
                             obj)
    assert out == "see <code>NoSuchThing</code> and <code>torch.nn.Module</code>"
    assert [r.getMessage() for r in caplog.records] == [
        "emakit.ema.EMA: :class:`~emakit.NoSuchThing` names nothing in emakit"]


def test_roles_link_to_the_path_the_reference_renders():
    markup, collection = _load()
    ema = collection["emakit.ema.EMA"]
    out = markup.rewrite(":class:`~emakit.config.EMAConfig`, :meth:`step`, :func:`synthesize`, "
                         ":class:`~emakit.averager.Averager`", ema)
    assert out == ("[<code>EMAConfig</code>][emakit.EMAConfig], "
                   "[<code>step()</code>][emakit.EMA.step], "
                   "[<code>synthesize()</code>][emakit.synthesize], "
                   "<code>Averager</code>")  # a private module's class: not on the site


def test_math_blocks_and_inline_math_become_mathml():
    text = ("Each update:\n\n"
            "    .. math:: \\beta_t = x, \\quad\n"
            "              y = \\frac{1}{2}\n"
            "    then :math:`\\ell` and the rest\n")
    out = ext.render_math(text)
    block = latex2mathml.convert("\\beta_t = x, \\quad y = \\frac{1}{2}", display="block")
    inline = latex2mathml.convert("\\ell", display="inline")
    assert out == ("Each update:\n\n"
                   f'    <div class="math">{block.replace(chr(10), "")}</div>\n\n'
                   f"    then {inline} and the rest\n")


def test_every_exported_name_is_on_a_page_of_the_reference():
    pages = {p.stem: p.read_text() for p in (ROOT / "docs" / "api").glob("*.md")}
    assert "::: emakit\n" in pages["emakit"]
    rendered = {line.split()[1] for text in pages.values() for line in text.splitlines()
                if line.startswith("::: ")}
    assert rendered == set(ext.API_MODULES)
    public = {"emakit", "emakit.config", "emakit.laws", "emakit.schedules", "emakit.posthoc",
              "emakit.distributed", "emakit.integrations.lightning",
              "emakit.integrations.transformers", "emakit.integrations.composer"}
    assert public <= rendered and not any("._" in m for m in rendered), rendered
    markup, collection = _load()
    for name in emakit.__all__:
        if name != "distributed":
            assert f"emakit.{name}" in markup.public.values(), name
