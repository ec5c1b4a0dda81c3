"""Data-parallel training under torchrun (compile/distributed.py), on this machine's CPU:
two gloo ranks, each training on its own shard of the rows."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lutcompile
from lutcompile.compile.distributed import World
from lutcompile.ops.reference import reference_evaluator


def test_world_shards_rows_evenly_and_disjointly():
    rows = np.arange(11)
    shards = [World(rank, 3).shard(rows) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]  # cut to the shortest: every rank takes as many steps
    assert len(np.unique(np.concatenate(shards))) == 9
    assert np.array_equal(World().shard(rows), rows)


def test_two_ranks_train_identical_parameters_and_rank_0_writes_a_valid_model(tmp_path, digits_model,
                                                                               digits_split):
    Xtr, ytr, Xte, _ = digits_split
    onnx.save(digits_model, tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", input=Xtr[:400], labels=ytr[:400])
    np.savez(tmp_path / "train.npz", input=Xtr, labels=ytr)
    out, ended = tmp_path / "out.onnx", tmp_path / "ended"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path / "model.onnx"), str(tmp_path / "calib.npz"),
         str(tmp_path / "train.npz"), str(out), str(ended)],
        capture_output=True, text=True, env=env, timeout=540)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0 of 2" in run.stdout and "rank 1 of 2" in run.stdout
    rank0, rank1 = (onnx.load_from_string(Path(f"{ended}.{r}").read_bytes()) for r in (0, 1))
    # every trained value, tables and thresholds included, is the same on both ranks
    assert rank0.SerializeToString() == rank1.SerializeToString()
    untrained = lutcompile.compile_model(digits_model, None, {"input": Xtr[:400], "labels": ytr[:400]},
                                         codebooks=4, partition="contiguous", table_loss="ridge", finetune=False,
                                         progress=False)
    assert rank0.SerializeToString() != untrained.model.SerializeToString()  # training changed it
    written = onnx.load(out)
    onnx.checker.check_model(written)
    got = ort.InferenceSession(out.read_bytes(), lutcompile.session_options(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": Xte})[0]
    want = reference_evaluator(rank1).run(None, {"input": Xte})[0]
    assert np.all(np.isclose(got, want, rtol=1e-5, atol=1e-5), axis=1).mean() > 0.99
    assert np.mean(got.argmax(1) == want.argmax(1)) > 0.99
