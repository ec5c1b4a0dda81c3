"""Exit statuses of the command line: each kind of bad input keeps its documented code, and an
internal error (a bug, not the user's input) exits 1 saying so, with a hint to --debug."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lutcompile.compile import methods
from lutcompile.ops.spec import LutParams
from lutcompile.tools import cli

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/mnist_mlp.onnx"
CALIB = ROOT / "models/mnist_calib.npz"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lutcompile", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.bad_input
@pytest.mark.parametrize("extra,message", [
    (["--include", "/9/Gemm"], "node '/9/Gemm' is not a MatMul, Gemm or Conv node"),
    (["--exclude", "nonesuch"], "node 'nonesuch' is not a MatMul, Gemm or Conv node"),
    (["--codebooks", "0"], "codebook counts must be whole numbers >= 1"),
    (["--threads", "0"], "threads must be a positive whole number"),
    (["--split-bins", "1"], "split_bins must be 0 (exact search) or at least 2"),
    (["--split-lines", "-1"], "split_lines must be 0 (anywhere) or a number of lines >= 1"),
    (["--max-accuracy-drop", "2"], "max_accuracy_drop is a fraction in [0, 1]"),
])
def test_bad_options_exit_2(tmp_path, extra, message):
    proc = run(MODEL, "--calib", CALIB, "-o", tmp_path / "o.onnx", "-q", *extra)
    assert proc.returncode == cli.EXIT_USAGE == 2, proc.stderr
    line = one_error_line(proc.stderr)
    assert line.startswith("lutcompile: error:") and message in line, line
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.bad_input
def test_argparse_errors_exit_2(tmp_path):
    proc = run(MODEL, "--calib", CALIB, "-o", tmp_path / "o.onnx", "--partition", "nonesuch")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def _broken_fit(*args, **kwargs):
    # what an internal inconsistency looks like: LutParams refusing parameters the fitter built
    LutParams(D=4, split_dims=np.zeros((1, 4)), thresholds=np.zeros((1, 15)), tables=np.zeros((3, 1, 16)),
              scale=-1.0, offsets=np.zeros(1), bias=np.zeros(3))


@pytest.mark.parametrize("failure", [
    _broken_fit,  # a ValueError from our own checks: not the user's fault, so not exit 2
    lambda *a, **k: np.linalg.inv(np.zeros((2, 2))),  # a numpy error
    lambda *a, **k: {}["missing"],  # a plain bug
])
def test_internal_errors_exit_1_naming_them_and_debug_shows_the_traceback(tmp_path, monkeypatch, capsys, failure):
    monkeypatch.setattr(methods, "fit_node", failure)
    argv = [str(MODEL), "--calib", str(CALIB), "-o", str(tmp_path / "o.onnx"), "-q", "--no-finetune", "-C", "4"]
    assert cli.main(argv) == cli.EXIT_INTERNAL == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("lutcompile: internal error:") and "--debug" in line, line
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(Exception) as info:
        cli.main(argv + ["--debug"])
    assert not isinstance(info.value, SystemExit)
