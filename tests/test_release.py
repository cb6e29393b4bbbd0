"""The version lives in one place (src/emakit/_version.py): the package metadata reads it
(pyproject's dynamic version), the command line prints it, and CHANGELOG.md's newest section
is that version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import emakit
from emakit._version import __version__

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_the_version_is_a_release_number_read_by_the_package_metadata():
    assert emakit.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__), __version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"], "a second copy of the version"
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "emakit._version.__version__"


def test_the_changelog_starts_with_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    sections = re.findall(r"^## (\d+\.\d+\.\d+)", text, flags=re.M)
    assert sections[0] == __version__, sections
    assert len(set(sections)) == len(sections)
    newest = text.split(f"## {__version__}", 1)[1].split("\n## ", 1)[0]
    for heading in re.findall(r"^### (.+)$", newest, flags=re.M):
        assert heading in ("Added", "Changed", "Removed", "Fixed", "Deprecated", "Security")


def test_the_command_line_prints_it():
    out = subprocess.run([sys.executable, "-m", "emakit", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"emakit {__version__}"
