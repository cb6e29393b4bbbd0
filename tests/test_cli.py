"""The command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest

import emakit
from emakit.cli import main


def test_halflife_conversions(capsys):
    assert main(["halflife", "--half-life", "1000"]) == 0
    out = capsys.readouterr().out
    assert repr(2 ** (-1 / 1000)) in out
    assert main(["halflife", "--smoothing", "0.5", "--interval", "10"]) == 0
    assert "half-life 10" in capsys.readouterr().out
    assert main(["halflife", "--sigma-rel", "0.1"]) == 0
    assert "gamma 6.93" in capsys.readouterr().out


def test_halflife_bad_input(capsys):
    assert main(["halflife", "--smoothing", "2"]) == 2
    assert "smoothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["halflife"])


def test_demo_runs_and_writes_a_plot(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "emakit.cli", "demo", "--epochs", "2", "--no-progress",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "| epoch | raw test loss | EMA test loss" in result.stdout
    assert "final test loss: raw" in result.stdout
    png = (tmp_path / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG")


def test_version():
    assert emakit.__version__
