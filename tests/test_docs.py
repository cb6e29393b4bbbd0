"""Every Python example in README.md and docs/*.md runs as written (issue 11).

Each ```python block runs in a fresh namespace in a temporary folder, after the set-up
declared beside it in an HTML comment just above the block (invisible when rendered)::

    <!-- doctest: setup
    model = torch.nn.Linear(4, 2)
    -->

Flags on the comment's first line: ``subprocess`` (run in its own interpreter, e.g. for a
one-rank process group standing in for torchrun), ``twice`` (run again in the same folder:
a rerun must work too), ``needs=<module>`` (skipped where that optional extra is not
installed, e.g. DeepSpeed on a machine without it), ``skip: <reason>`` (not run; the reason
is required). A block with
no comment runs with no set-up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_COMMENT = re.compile(r"<!-- doctest:(?P<head>[^\n]*?)(?:\n(?P<body>.*?))?-->$", re.S)


@dataclass
class Example:
    path: Path
    line: int
    code: str
    setup: str = ""
    flags: tuple[str, ...] = ()
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def examples(path: Path) -> list[Example]:
    text = path.read_text()
    found = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, m.start()) + 1
        ex = Example(path, line, m.group(1))
        before = text[: m.start()].rstrip()
        c = _COMMENT.match(before, before.rfind("<!-- doctest")) if before.endswith("-->") else None
        if c:
            head = c.group("head").strip()
            if head.startswith("skip"):
                ex.skip = head.partition(":")[2].strip()
                assert ex.skip, f"{ex.id}: a skip needs a reason"
            else:
                ex.flags = tuple(head.split())
            ex.setup = textwrap.dedent(c.group("body") or "")
        found.append(ex)
    return found


ALL = [ex for f in FILES for ex in examples(f)]


def test_every_file_has_examples_and_links_stay_inside_the_repository():
    assert len(ALL) >= 10
    for f in FILES:
        text = f.read_text()
        assert "../shared" not in text and "design.md" not in text, f
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if not target.startswith(("http://", "https://")):
                assert (f.parent / target).exists(), (f, target)


@pytest.mark.parametrize("ex", [e for e in ALL if e.skip is None], ids=lambda e: e.id)
def test_example_runs(ex: Example, tmp_path, monkeypatch):
    for flag in ex.flags:
        if flag.startswith("needs="):
            pytest.importorskip(flag.partition("=")[2])
    source = ex.setup + "\n" + ex.code
    runs = 2 if "twice" in ex.flags else 1
    if "subprocess" in ex.flags:
        script = tmp_path / "example.py"
        script.write_text(source)
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        for _ in range(runs):
            result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{ex.id} failed:\n{result.stderr[-4000:]}"
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = compile(source, ex.id, "exec")
    for _ in range(runs):
        exec(code, {"__name__": "__example__"})


def test_skipped_examples_say_why():
    skipped = [e for e in ALL if e.skip is not None]
    assert all(len(e.skip) > 10 for e in skipped), [e.id for e in skipped]


def test_license_is_an_spdx_expression_and_builds_without_warnings(tmp_path):
    """PEP 639: ``license = "Apache-2.0"`` with ``license-files`` (the ``{text = ...}`` table
    is deprecated and setuptools warned on every install); the metadata a build writes says
    so, and the build warns about nothing."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"
    assert all((ROOT / f).is_file() for f in project["project"]["license-files"])
    assert any(r.replace(" ", "").startswith("setuptools>=77")
               for r in project["build-system"]["requires"])
    code = ("import os, warnings, setuptools.build_meta as b; warnings.simplefilter('error'); "
            f"print(b.prepare_metadata_for_build_wheel({str(tmp_path)!r}))")
    result = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = next(tmp_path.glob("*.dist-info")) / "METADATA"
    text = meta.read_text()
    assert "License-Expression: Apache-2.0" in text and "License-File: LICENSE" in text


def test_demo_plot_has_whole_epoch_ticks():
    pytest.importorskip("matplotlib")
    from emakit import demo

    rows = [{"epoch": e, "raw_loss": 1.0 / e, "ema_loss": 0.9 / e, "raw_acc": 0.5,
             "ema_acc": 0.6} for e in (1, 2, 3)]
    fig = demo.figure(rows)  # 1.00, 1.25, ... 3.00 before
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
