"""Hostile model files and inputs against the lookup kernels in onnxruntime: every case of
tests/fuzz_cases.py must end in an onnxruntime error or in a run that matches the numpy
reference, never in a crash. The cases run in child processes, so a crash fails the test
and names the case instead of killing pytest."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from fuzz_cases import CASES, run_isolated
from lutcompile.ops import kernel
def test_fuzz_cases_end_in_an_error_or_a_correct_run(fuzz_models):
    run = run_isolated(fuzz_models, kernel.library_path())
    assert run.failures() == []
    assert len(run.verdicts) == CASES
    # both ends are exercised: refusals, and runs checked against the reference on every node
    # of all four models (so on LutMatMul, LutConv, SpnMatMul and SpnConv)
    assert run.count("error") >= CASES // 2 and run.count("ok") >= CASES // 5
    checked = {c.node for c in run.cases if c.node and run.verdicts[c.index]["outcome"] == "ok"}
    assert checked == {"fc0", "fc1", "fc2", "conv_a", "conv_b", "fc", "spn0", "spn1", "spnconv_a", "spnconv_b", "spnfc"}


CRASHING_LIBRARY = r"""
#include <signal.h>
void *RegisterCustomOps(void *options, const void *api) { raise(SIGSEGV); return 0; }
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_a_crash_is_reported_with_its_case_and_the_run_goes_on(fuzz_models, tmp_path):
    """A library that segfaults when onnxruntime loads it: every case is a crash, reported by
    case, each in a fresh child (the run does not stop at the first)."""
    (tmp_path / "crash.c").write_text(CRASHING_LIBRARY)
    subprocess.run(["gcc", "-shared", "-fPIC", str(tmp_path / "crash.c"), "-o", str(tmp_path / "crash.so")],
                   check=True)
    run = run_isolated(fuzz_models, str(tmp_path / "crash.so"), stop=3)
    assert run.crashes == {0: "killed by SIGSEGV", 1: "killed by SIGSEGV", 2: "killed by SIGSEGV"}
    assert run.verdicts == {}
    assert [f.split(": ")[-1] for f in run.failures()] == ["CRASH (killed by SIGSEGV)"] * 3
