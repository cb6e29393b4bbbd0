"""The command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import emakit
from emakit.cli import main


def run(argv, capsys=None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the command line run in this process, usage errors
    (argparse's SystemExit) included."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def one_line(err: str) -> bool:
    """An error report as the project wants it: one line, no traceback."""
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


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
    code, _, err = run(["halflife"])  # exit 1 before
    assert code == 2 and one_line(err) and "--half-life" in err


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
    # the post-hoc sweep rides on the same run
    assert "| sigma_rel | post-hoc EMA test loss | accuracy |" in result.stdout
    assert "| 0.1 | " in result.stdout and "best sigma_rel" in result.stdout
    assert (tmp_path / "posthoc.png").read_bytes().startswith(b"\x89PNG")


def test_version():
    assert emakit.__version__


def _snapshot_run(folder, steps=60, every=10):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ph = emakit.PostHocEMA(model, snapshot_every=f"{every}ba", snapshot_dir=folder)
    for _ in range(steps):
        with torch.no_grad():
            model[0].weight.add_(0.01 * torch.randn(4, 4))
        ph.step()
    return model


def test_synthesize_command(tmp_path, capsys):
    model = _snapshot_run(tmp_path / "snaps")
    out = tmp_path / "ema.safetensors"
    argv = ["synthesize", str(tmp_path / "snaps"), "--sigma-rel", "0.08", "--at", "50",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert "at step 50 from 5 snapshots" in capsys.readouterr().out
    from safetensors.torch import load_file

    state = load_file(out)
    expected = emakit.synthesize(tmp_path / "snaps", sigma_rel=0.08, at=50)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    model.load_state_dict(state, strict=True)
    before = out.read_bytes()
    assert main(argv) == 2  # exists: refused, untouched
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*argv, "--sigma-rel", "0.001", "--force"]) == 2
    assert "cannot be represented" in capsys.readouterr().err
    assert main(["synthesize", str(tmp_path), "--sigma-rel", "0.1", "--out",
                 str(tmp_path / "new.safetensors")]) == 2
    assert "holds no snapshots" in capsys.readouterr().err


def test_inspect_command(tmp_path, capsys):
    _snapshot_run(tmp_path / "snaps")
    assert main(["inspect", str(tmp_path / "snaps")]) == 0
    text = capsys.readouterr().out
    assert "6 post-hoc EMA snapshots, steps 10 to 60" in text
    assert "sigma_rel 0.05 (gamma 16.97), 0.1 (gamma 6.937); stored as float16" in text
    assert "supported sigma_rel at step 60" in text
    ckpt = tmp_path / "ema.pt"
    torch.save({"average": {"w": torch.ones(2, 3)}, "step": 3}, ckpt)
    assert main(["inspect", str(ckpt)]) == 0
    assert "average.w: float32 [2, 3]" in capsys.readouterr().out


# every error: exit status 2, one line naming the argument or file (issue 11) -------------


def test_halflife_extremes_are_answered_not_overflowed():
    code, out, err = run(["halflife", "--sigma-rel", "1e-200"])  # OverflowError before
    assert code == 0, err
    gamma = float(out.split("gamma ")[1])
    # independent check: g = 1/s solves the cubic to leading order for tiny s (g^2 ~ s^-2)
    assert gamma == pytest.approx(1e200, rel=1e-6)
    code, out, err = run(["halflife", "--gamma", "1e308"])
    assert code == 0, err
    assert float(out.split("sigma_rel ")[1]) == pytest.approx(1e-308, rel=1e-6)
    for argv in (["halflife", "--smoothing", "nan"], ["halflife", "--gamma", "inf"],
                 ["halflife", "--sigma-rel", "x"], ["halflife", "--sigma-rel", "0.5"],
                 ["halflife", "--sigma-rel", "5e-324"], ["halflife", "--half-life", "-3"]):
        code, _, err = run(argv)
        assert code == 2 and one_line(err), (argv, err)
        assert "--" in err or any(k in err for k in ("smoothing", "gamma", "sigma_rel",
                                                      "half_life")), err


@pytest.fixture(scope="module")
def snaps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "snaps"
    _snapshot_run(folder, steps=30)
    return folder


@pytest.mark.parametrize("dtype", ["int64", "bool", "int8", "nope"])
def test_synthesize_refuses_a_non_floating_dtype(snaps, tmp_path, dtype):
    out = tmp_path / "x.safetensors"
    code, _, err = run(["synthesize", str(snaps), "--sigma-rel", "0.08", "--out", str(out),
                        "--dtype", dtype, "--no-progress"])  # all-zero int64 file before
    assert code == 2 and one_line(err) and "--dtype" in err, err
    assert not out.exists()


def test_synthesize_out_errors(snaps, tmp_path):
    folder = tmp_path / "d.safetensors"
    folder.mkdir()
    base = ["synthesize", str(snaps), "--sigma-rel", "0.08", "--no-progress"]
    code, _, err = run([*base, "--out", str(folder), "--force"])  # traceback before
    assert code == 2 and one_line(err) and "--out" in err and "folder" in err, err
    assert folder.is_dir()
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    code, _, err = run([*base, "--out", str(blocker / "x.safetensors")])  # unwritable
    assert code == 2 and one_line(err) and "--out" in err, err
    assert blocker.read_text() == "x"
    code, _, err = run([*base, "--out", str(tmp_path / "y.safetensors"), "--max-error", "-1"])
    assert code == 2 and one_line(err) and "--max-error" in err, err
    code, _, err = run([*base, "--out", str(tmp_path / "y.safetensors"), "--at", "-4"])
    assert code == 2 and one_line(err) and "--at" in err, err
    code, _, err = run(["synthesize", str(snaps)])  # missing arguments: usage error
    assert code == 2 and one_line(err), err


def test_inspect_errors(snaps, tmp_path):
    code, _, err = run(["inspect", str(snaps), "--max-error", "-1"])  # accepted before
    assert code == 2 and one_line(err) and "--max-error" in err, err
    code, _, err = run(["inspect", str(snaps), "--max-error", "0"])
    assert code == 2 and one_line(err) and "--max-error" in err, err
    good = tmp_path / "good.pt"
    torch.save({"average": {"w": torch.ones(64, 64)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    readme = tmp_path / "README.md"
    readme.write_text("# not a checkpoint\n")
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pickled = tmp_path / "payload.pt"
    torch.save({"x": Payload()}, pickled)
    for path, what in ((truncated, "not a complete torch checkpoint"),
                       (readme, "not a complete torch checkpoint"),
                       (pickled, "not plain data"),
                       (tmp_path / "absent.pt", "neither a file nor a folder")):
        code, _, err = run(["inspect", str(path)])  # raw torch tracebacks before
        assert code == 2 and one_line(err), err
        assert str(path) in err and what in err, err
    assert not marker.exists()


def test_inspect_a_distributed_checkpoint_without_unpickling(tmp_path):
    import pickle
    import warnings

    from emakit import checkpoint

    model = torch.nn.Linear(3, 2)
    ema = emakit.EMA(model, half_life="4ba")
    ema.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint.save(ema, tmp_path / "ck")
    code, out, err = run(["inspect", str(tmp_path / "ck")])
    assert code == 0, err
    assert "ema.average.weight: float32 [2, 3] in 1 shards" in out
    assert "checksums: pointer and metadata verified" in out
    marker = tmp_path / "MARKER"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    from ckpt_tools import data_folder, reseal

    (data_folder(tmp_path / "ck") / ".metadata").write_bytes(pickle.dumps(Payload()))
    code, _, err = run(["inspect", str(tmp_path / "ck")])  # changed: the checksum says so
    assert code == 2 and one_line(err) and ".metadata is corrupted" in err, err
    reseal(tmp_path / "ck")  # crafted: checksums recomputed, the restricted unpickler refuses
    code, _, err = run(["inspect", str(tmp_path / "ck")])
    assert code == 2 and one_line(err) and ".metadata names" in err, err
    assert not marker.exists()


def test_python_dash_m_emakit():
    result = subprocess.run([sys.executable, "-m", "emakit", "halflife", "--half-life", "10"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # "No module named emakit.__main__" before
    assert repr(2 ** (-1 / 10)) in result.stdout
    result = subprocess.run([sys.executable, "-m", "emakit", "halflife"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and one_line(result.stderr), result.stderr
