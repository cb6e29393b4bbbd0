"""The shape of the code, checked from its source: imports run one way, down the layers that
docs/development.md's layer table lists; no import cycle; the pure modules import no torch; the
faces and trainers never reach the private engine; docs and examples use public modules; and
``import emakit`` loads no compiler."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "emakit"

# Bottom-up. A module may import modules of its own layer or of layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("pure", ("_version", "_args", "time", "schedules", "cadence", "laws", "migrations")),
    ("config", ("config",)),
    ("engine", ("_engine", "_engine.*")),
    ("tensors and files", ("io", "guards", "functional", "flat")),
    ("saved state", ("statefile", "checkpoint", "posthoc.profiles", "posthoc.snapshots",
                     "posthoc.synthesis")),
    ("averager", ("averager",)),
    ("faces", ("ema", "bema", "posthoc", "posthoc.tracker", "distributed")),
    ("edges", ("integrations", "integrations.*", "cli", "demo", "__main__", "")),
]
PURE = {"_version", "_args", "time", "schedules", "cadence", "laws", "migrations"}
# What each layer must never import, whatever the order says.
NO_ENGINE = ("ema", "bema", "posthoc.tracker", "posthoc", "integrations", "integrations.*",
             "cli", "demo", "distributed")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The emakit module an ``from ... import`` names (relative to ``module``), or None."""
    if node.level == 0:
        name = node.module or ""
        if name != "emakit" and not name.startswith("emakit."):
            return None
        return name[len("emakit."):] if name != "emakit" else ""
    base = module.split(".") if module else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every emakit module ``module`` imports, anywhere in the file (lazy imports too)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, package)
            if target is None:
                continue
            for alias in node.names:  # "from . import x" may import the submodule x
                sub = f"{target}.{alias.name}" if target else alias.name
                out.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "emakit" or alias.name.startswith("emakit."):
                    out.add(alias.name[len("emakit."):] if alias.name != "emakit" else "")
    out.discard(module)
    return {m for m in out if m in known}


def _third_party(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if module == p or (p.endswith(".*") and module.startswith(p[:-1])):
                return i
    raise AssertionError(f"emakit.{module} is in no layer: add it to LAYERS and to "
                         "docs/development.md")


def _matches(module: str, patterns: tuple[str, ...]) -> bool:
    return any(module == p or (p.endswith(".*") and module.startswith(p[:-1]))
               for p in patterns)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_module_has_a_layer_and_imports_only_down():
    wrong = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for t in sorted(targets):
            if _layer(t) > mine:
                wrong.append(f"emakit.{module} ({LAYERS[mine][0]}) imports emakit.{t} "
                             f"({LAYERS[_layer(t)][0]})")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_pure_modules_import_no_torch():
    modules = _modules()
    allowed = set(sys.stdlib_module_names) | {"emakit"}
    for name in PURE:
        outside = _third_party(modules[name]) - allowed
        assert not outside, f"emakit.{name} must be pure Python; it imports {sorted(outside)}"


def test_faces_and_trainers_never_reach_the_engine():
    wrong = [f"emakit.{m} imports emakit.{t}" for m, targets in _graph().items()
             if _matches(m, NO_ENGINE) for t in targets if t.startswith("_engine")]
    assert not wrong, "\n".join(wrong)


def test_nothing_but_the_edges_imports_the_package_root():
    edges = LAYERS[-1][1]
    wrong = [f"emakit.{m}" for m, targets in _graph().items()
             if "" in targets and not _matches(m, edges)]
    assert not wrong, f"{wrong} import the package root (import what you need from below)"


def test_docs_and_examples_use_public_modules_only():
    private = re.compile(r"\bemakit\.(_[a-z]\w*)")
    found = []
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "examples").rglob("*.py")]
    for f in files:
        for i, line in enumerate(f.read_text().splitlines(), 1):
            m = private.search(line)
            if m and m.group(1) != "__version__":
                found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "private modules named in docs or examples:\n" + "\n".join(found)


@pytest.mark.parametrize("probe", ["torch._dynamo", "torch._inductor"])
def test_import_emakit_loads_no_compiler(probe):
    code = f"import emakit, sys; print({probe!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", f"import emakit loaded {probe}"


def test_misspelled_keywords_are_static_errors(tmp_path):
    """The public constructors and callbacks have keyword parameters a type checker sees."""
    mypy = pytest.importorskip("mypy.api")
    code = tmp_path / "user.py"
    code.write_text(
        "import torch, emakit\n"
        "m = torch.nn.Linear(2, 2)\n"
        "emakit.EMA(m, half_life='10ba')\n"
        "emakit.EMA(m, half_life=100, dtype=torch.float16, executor='eager')\n"
        "emakit.EMA(m, half_lfie='10ba')\n"
        "emakit.BEMA(m, lagg=10.0)\n"
        "emakit.PostHocEMA(m, sigma_rel=(0.05,))\n"
        "emakit.EMA(m, executor='fast')\n"
        "emakit.EMAConfig(smoothing='0.9')\n"
    )
    # the cache `make test`'s own mypy run leaves: torch's stubs are read once
    out, _, status = mypy.run([str(code), "--follow-imports=silent", "--ignore-missing-imports",
                               "--cache-dir", str(ROOT / ".mypy_cache")])
    lines = [line for line in out.splitlines() if "error:" in line]
    flagged = sorted({int(m.group(1)) for line in lines
                      if (m := re.search(r"user\.py:(\d+):", line))})
    assert flagged == [5, 6, 7, 8, 9], (flagged, out)
