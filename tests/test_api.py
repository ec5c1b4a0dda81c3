"""The Python API in onnxruntime's quantize_static shape: calibration as an .npz path, a dict or a
CalibrationDataReader give the same compiled model; nodes_to_include / nodes_to_exclude pick
exactly the named nodes."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationDataReader

import lutcompile
from conftest import mlp_model
from fuzz_cases import cnn_model
from lutcompile.compile import methods
from lutcompile.compile.calibrate import CalibrationError

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/mnist_mlp.onnx"
CALIB = ROOT / "models/mnist_calib.npz"
FAST = dict(codebooks=4, partition="contiguous", table_loss="ridge", finetune=False, progress=False)
GEMMS = ["/0/Gemm", "/2/Gemm", "/4/Gemm", "/6/Gemm"]


class Reader(CalibrationDataReader):
    """onnxruntime's own reader class: input feeds batch by batch, then None."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int):
        n = len(next(iter(arrays.values())))
        self._batches = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return next(self._batches, None)


@pytest.fixture(scope="module")
def from_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "path.onnx"
    result = lutcompile.compile_model(str(MODEL), out, str(CALIB), **FAST)
    return result, out


def lookup_nodes(model: onnx.ModelProto) -> dict[str, str]:
    return {n.name: n.op_type for n in model.graph.node if n.op_type in ("LutMatMul", "Gemm")}


def test_npz_path_dict_and_reader_give_identical_models(from_path):
    result, out = from_path
    with np.load(CALIB) as npz:
        arrays = {k: npz[k] for k in npz.files}
    from_dict = lutcompile.compile_model(onnx.load(str(MODEL)), None, dict(arrays), **FAST)
    reader = Reader({"input": arrays["input"]}, batch=300)  # feeds only, as onnxruntime's readers give
    from_reader = lutcompile.compile_model(MODEL, None, reader, **FAST)
    assert reader.calls == 8  # 7 batches of up to 300 rows, then None
    saved = onnx.load(str(out)).SerializeToString()
    assert result.model.SerializeToString() == saved
    assert from_dict.model.SerializeToString() == saved
    assert from_reader.model.SerializeToString() == saved
    assert from_dict.nodes == result.nodes == from_reader.nodes
    assert from_dict.calibration_rows == from_reader.calibration_rows == result.calibration_rows == 2000
    # labels come with the path and the dict; the reader carried feeds only
    assert from_dict.accuracy_after == result.accuracy_after is not None
    assert from_reader.accuracy_after is None


def test_reader_with_labels_matches_the_npz_accuracy(from_path):
    result, _ = from_path
    with np.load(CALIB) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labelled = lutcompile.compile_model(MODEL, None, Reader(arrays, batch=1000), **FAST)
    assert labelled.model.SerializeToString() == result.model.SerializeToString()
    assert (labelled.accuracy_before, labelled.accuracy_after) == (result.accuracy_before, result.accuracy_after)


def test_compiled_model_serves_with_session_options(from_path):
    result, out = from_path
    x = np.load(CALIB)["input"][:64]
    sess = ort.InferenceSession(str(out), lutcompile.session_options(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0]
    assert logits.shape == (64, 10) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("include,exclude,replaced", [
    (["/2/Gemm", "/6/Gemm"], None, ["/2/Gemm", "/6/Gemm"]),
    (None, ["/0/Gemm"], ["/2/Gemm", "/4/Gemm", "/6/Gemm"]),
    (["/0/Gemm", "/4/Gemm"], ["/4/Gemm"], ["/0/Gemm"]),
])
def test_include_and_exclude_pick_exactly_the_named_nodes(include, exclude, replaced):
    result = lutcompile.compile_model(MODEL, None, CALIB, nodes_to_include=include, nodes_to_exclude=exclude,
                                      **FAST)
    want = {name: "LutMatMul" if name in replaced else "Gemm" for name in GEMMS}
    assert lookup_nodes(result.model) == want
    assert [n.name for n in result.nodes] == replaced
    kept = {s.name: s.reason for s in result.skipped}
    assert set(kept) == set(GEMMS) - set(replaced)
    for name, reason in kept.items():
        assert reason == ("in nodes_to_exclude" if exclude and name in exclude else "not in nodes_to_include")
    assert result.options["nodes_to_include"] == include and result.options["nodes_to_exclude"] == exclude
    # the nodes kept exact still hold the original weights
    original = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(MODEL)).graph.initializer}
    for t in result.model.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), original[t.name])


@pytest.mark.bad_input
def test_unknown_node_names_are_rejected():
    with pytest.raises(ValueError, match="node 'nope' is not"):
        lutcompile.compile_model(MODEL, None, CALIB, nodes_to_exclude=["nope"], **FAST)


def _never_fit(*args, **kwargs):
    raise AssertionError("a node was fitted before the row check")


@pytest.mark.bad_input
@pytest.mark.parametrize("model,rows,codebooks,message", [
    # 16 -> 64 -> 10 at 32 codebooks: the first node (C = D = 16) needs 256 rows and has them,
    # the second (C = 32) needs 512: the error comes before the first node is fitted
    (lambda: mlp_model([(np.eye(16, 64, dtype=np.float32), np.zeros(64, np.float32)),
                        (np.eye(64, 10, dtype=np.float32), np.zeros(10, np.float32))]),
     {"input": np.random.default_rng(0).random((300, 16), np.float32)}, 32,
     "node fc1 gets 300 calibration rows; 32 codebook(s) need at least 512 (16 per codebook)"),
    # Conv rows are patches: 7 x 7 per image for conv_a, 3 x 3 for conv_b (C = 4: 64 rows)
    (cnn_model, {"image": np.ones((1, 1, 8, 8), np.float32)}, 4, "node conv_a gets 49 calibration rows"),
    (cnn_model, {"image": np.ones((2, 1, 8, 8), np.float32)}, 4, "node conv_b gets 18 calibration rows"),
])
def test_too_few_rows_fail_before_any_fit(monkeypatch, model, rows, codebooks, message):
    monkeypatch.setattr(methods, "fit_node", _never_fit)
    with pytest.raises(CalibrationError, match="^" + re.escape(message)):
        lutcompile.compile_model(model(), None, rows, codebooks=codebooks, finetune=True, progress=False)
