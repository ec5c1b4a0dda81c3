"""Concurrency and determinism: one onnxruntime session shared by many Python threads gives
exactly the single-threaded results, and compiling the same model twice with the same seed
gives byte-identical files."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lutcompile
from lutcompile.ops.reference import reference_evaluator

REPO = Path(__file__).resolve().parents[1]
THREADS, RUNS = 8, 1000


@pytest.mark.parametrize("base,sizes", [
    # rows per thread: around the 64-row blocks; 200 rows split into two thread-pool tasks
    ("mlp", [1, 3, 16, 64, 65, 100, 129, 200]),
    # images per thread: each image is one LutConv task, so most runs use the thread pool
    ("cnn", [1, 2, 3, 4, 5, 6, 7, 8]),
])
def test_one_session_shared_by_8_threads_gives_the_single_threaded_results(fuzz_models, digits, base, sizes):
    """8 Python threads, 1,000 runs each on one session (2 intra-op threads), each thread on
    its own input: every result is bitwise the single-threaded run's, which is bitwise the
    numpy reference runtime's."""
    model = onnx.load(str(fuzz_models / f"{base}.onnx"))
    name = model.graph.input[0].name
    X = digits[0] if base == "mlp" else digits[0].reshape(-1, 1, 8, 8)
    feeds, start = [], 0
    for n in sizes:
        feeds.append({name: X[start:start + n]})
        start += n
    session = ort.InferenceSession(model.SerializeToString(), lutcompile.session_options(threads=2),
                                   providers=["CPUExecutionProvider"])
    expected = [session.run(None, feed)[0].tobytes() for feed in feeds]
    reference = reference_evaluator(model)
    assert expected == [reference.run(None, feed)[0].tobytes() for feed in feeds]

    def hammer(i: int) -> int:
        return sum(session.run(None, feeds[i])[0].tobytes() != expected[i] for _ in range(RUNS))

    with ThreadPoolExecutor(THREADS) as pool:
        mismatches = list(pool.map(hammer, range(THREADS)))
    assert mismatches == [0] * THREADS


def compile_in_a_fresh_process(model: Path, calib: Path, out: Path, hash_seed: str, *options: str) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lutcompile", str(model), "--calib", str(calib), "-o", str(out),
                           "-C", "8", "-q", *options], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--no-finetune"], []], ids=["finetune-off", "finetune-on"])
def test_compiling_twice_gives_byte_identical_files(tmp_path, digits_model, digits_split, options):
    """Two compiles of the digits MLP in separate processes (string hashing seeded
    differently, so set and dict orders built from hashes would differ): the same bytes. With
    the fine-tune pass, a different --seed changes the file, so the seed does reach the
    randomness the first two runs agreed on."""
    Xtr, ytr, _, _ = digits_split
    onnx.save(digits_model, str(tmp_path / "model.onnx"))
    np.savez(tmp_path / "calib.npz", input=Xtr, labels=ytr)
    args = (tmp_path / "model.onnx", tmp_path / "calib.npz")
    first = compile_in_a_fresh_process(*args, tmp_path / "a.onnx", "1", *options)
    second = compile_in_a_fresh_process(*args, tmp_path / "b.onnx", "2", *options)
    assert first == second
    if not options:
        assert compile_in_a_fresh_process(*args, tmp_path / "c.onnx", "1", "--seed", "1") != first
