"""Models stored with external data, up to one over protobuf's 2 GB limit.

The large model is a token-embedding network: int64 ids -> Gather from a 2.15 GB embedding
table -> MatMul on the 3-D activations -> ReduceMean over tokens. Its weights live in one
external file, the MatMul weight after the embedding at an offset past 2**31. The ids are
real: a row of each scikit-learn digit's pixels (0-16, clipped to 15), and embedding rows
0-15 hold the 4 bits of their row number in every 4-dim codebook, so the lookups are exact up
to the 8-bit quantisation and the compiled model can be held to onnxruntime on the original.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lutcompile
from lutcompile.errors import OptionsError
from lutcompile.onnx_io import external_data
from lutcompile.compile.finetune import FinetuneOptions
from lutcompile.compile.fit import FitOptions
from lutcompile.ops.spec import DOMAIN
from lutcompile.ops.node_format import params_from_node
from lutcompile.onnx_io.sessions import session_options

TWO_GB = 2 ** 31
WIDTH, CLASSES, TOKENS = 64, 10, 8
EXACT_FIT = dict(codebooks=WIDTH // 4, partition="contiguous", table_loss="ridge", finetune=False,
                 progress=False, fit_options=FitOptions(ridge=1e-6, tree_objective="input"))


def embedding_rows(start: int, stop: int) -> np.ndarray:
    """Rows 0-15: bit (d mod 4) of the row number; later rows: a cheap non-zero pattern."""
    rows = np.arange(start, stop, dtype=np.int64)[:, None]
    bits = ((rows >> (np.arange(WIDTH) % 4)) & 1).astype(np.float32)
    pattern = ((rows * 7 + np.arange(WIDTH)) % 13).astype(np.float32) / 13
    return np.where(rows < 16, bits, pattern)


def external_tensor(name: str, dims, location: str, offset: int) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    nbytes = 4 * int(np.prod(dims))
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def write_embedding_model(folder, vocabulary: int) -> tuple[str, np.ndarray]:
    """The model file and its external data, written without ever building the big proto."""
    W = np.random.default_rng(3).standard_normal((WIDTH, CLASSES)).astype(np.float32)
    data = os.path.join(folder, "weights.bin")
    with open(data, "wb") as f:
        block = 1 << 16
        for start in range(0, vocabulary, block):
            f.write(embedding_rows(start, min(vocabulary, start + block)).tobytes())
        w_offset = -(-f.tell() // 4096) * 4096
        f.seek(w_offset)
        f.write(W.tobytes())
    nodes = [helper.make_node("Gather", ["E", "ids"], ["tokens"], name="embed"),
             helper.make_node("MatMul", ["tokens", "W"], ["scores"], name="project"),
             helper.make_node("ReduceMean", ["scores"], ["logits"], name="pool", axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "embedding", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", TOKENS])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [external_tensor("E", [vocabulary, WIDTH], "weights.bin", 0),
         external_tensor("W", [WIDTH, CLASSES], "weights.bin", w_offset)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = os.path.join(folder, "model.onnx")
    onnx.save_model(model, path)
    return path, W


def digit_ids(digits) -> np.ndarray:
    """Token ids from real data: pixel row 4 of each digit, 0-16 clipped to 15."""
    X, _ = digits
    return np.minimum(np.rint(X.reshape(-1, 8, 8)[:, 4, :] * 16), 15).astype(np.int64)


def quantisation_bound(compiled: onnx.ModelProto) -> float:
    p = next(params_from_node(n) for n in compiled.graph.node if n.domain == DOMAIN)
    return 0.5 * p.C * p.scale * 1.05 + 1e-5


def compile_and_check(model_path: str, output: str, ids: np.ndarray) -> onnx.ModelProto:
    lutcompile.compile_model(model_path, output, {"ids": ids}, **EXACT_FIT)
    compiled = onnx.load(output, load_external_data=False)
    assert [n.op_type for n in compiled.graph.node] == ["Gather", "LutMatMul", "ReduceMean"]
    # both models straight from their files, in onnxruntime: ours with the library registered
    want = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    got = ort.InferenceSession(output, session_options(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, want, atol=quantisation_bound(compiled), rtol=0)
    return compiled


def test_external_data_model_compiles_and_keeps_its_weights_outside(tmp_path, digits):
    folder = tmp_path / "in"
    folder.mkdir()
    model_path, _ = write_embedding_model(str(folder), vocabulary=4096)
    output = str(tmp_path / "fast.onnx")
    compiled = compile_and_check(model_path, output, digit_ids(digits))
    # the untouched embedding stays external, now in the output's own data file
    (embedding,) = [t for t in compiled.graph.initializer if t.name == "E"]
    assert embedding.data_location == TensorProto.EXTERNAL
    assert {e.key: e.value for e in embedding.external_data}["location"] == "fast.onnx.data"
    assert sorted(os.listdir(tmp_path)) == ["fast.onnx", "fast.onnx.data", "in"]  # no temporaries left
    # a process that never imports lutcompile serves it with the library path alone
    script = ("import sys, numpy as np, onnxruntime as ort; so = ort.SessionOptions(); "
              "so.register_custom_ops_library(sys.argv[2]); "
              "s = ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider']); "
              "print(s.run(None, {'ids': np.zeros((2, 8), np.int64)})[0].shape)")
    run = subprocess.run([sys.executable, "-c", script, output, lutcompile.library_path()],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "(2, 10)"


@pytest.mark.bad_input
def test_external_data_of_the_wrong_size_is_refused(tmp_path):
    model_path, _ = write_embedding_model(str(tmp_path), vocabulary=4096)
    with open(tmp_path / "weights.bin", "r+b") as f:
        f.truncate(4096 * WIDTH * 4)  # the MatMul weight after the embedding is cut off
    with pytest.raises(lutcompile.compile.frontend.FrontendError, match="does not fit 'weights.bin'"):
        lutcompile.compile.frontend.load_model(model_path)


@pytest.mark.slow
def test_model_over_two_gigabytes(tmp_path, digits):
    vocabulary = TWO_GB // (4 * WIDTH) + 4096  # 2.15 GB of embedding
    folder = tmp_path / "in"
    folder.mkdir()
    try:
        model_path, W = write_embedding_model(str(folder), vocabulary)
        assert os.path.getsize(folder / "weights.bin") > TWO_GB
        loaded = lutcompile.compile.frontend.load_model(model_path)
        (weight,) = [t for t in loaded.graph.initializer if t.name == "W"]  # stored past 2**31
        np.testing.assert_array_equal(external_data.tensor_array(weight), W)
        output = str(tmp_path / "fast.onnx")
        compile_and_check(model_path, output, digit_ids(digits))
        assert os.path.getsize(output) < 1 << 20 and os.path.getsize(output + ".data") > TWO_GB
    finally:  # 4.3 GB on disk: do not leave it to pytest's retained temporary directories
        for name in ("in/weights.bin", "fast.onnx.data"):
            if (tmp_path / name).exists():
                (tmp_path / name).unlink()


def test_fine_tuning_writes_trained_external_weights_to_the_output(tmp_path, digits_model, digits_split):
    """The fine-tune pass retrains the exact layers after the replaced one; their weights were
    external in the input and must reach the output's data file with the trained values."""
    Xtr, ytr, Xte, yte = digits_split
    stored = onnx.ModelProto()
    stored.CopyFrom(digits_model)  # save_model moves the data out of the proto it is given
    onnx.save_model(stored, str(tmp_path / "mlp.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="mlp.weights", size_threshold=0)
    output = str(tmp_path / "fast.onnx")
    result = lutcompile.compile_model(str(tmp_path / "mlp.onnx"), output, {"input": Xtr, "labels": ytr},
                                      codebooks=8, nodes_to_include=["fc0", "fc1"], progress=False,
                                      finetune_options=FinetuneOptions(val_fraction=0.0))  # keep the last epoch
    saved = onnx.load(output)  # loads fast.onnx.data
    before = {t.name: onnx.numpy_helper.to_array(t) for t in digits_model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in saved.graph.initializer}
    assert not np.array_equal(after["W2"], before["W2"])  # exact, trained by the fine-tune pass
    session = ort.InferenceSession(output, session_options(), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": Xtr})[0]
    assert np.mean(logits.argmax(1) == ytr) == pytest.approx(result.accuracy_after)


def test_the_array_registry_keeps_only_what_the_result_refers_to(tmp_path, digits_model, digits_split):
    """Every fine-tune write-back attaches new arrays; once the compile returns, the registry
    holds only the arrays the result's model refers to (and stays level over repeated compiles)."""
    Xtr, ytr, _, _ = digits_split
    stored = onnx.ModelProto()
    stored.CopyFrom(digits_model)
    onnx.save_model(stored, str(tmp_path / "mlp.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="mlp.weights", size_threshold=0)
    start = external_data.held_arrays()
    held = []
    for _ in range(2):
        result = lutcompile.compile_model(str(tmp_path / "mlp.onnx"), None, {"input": Xtr, "labels": ytr},
                                          codebooks=8, nodes_to_include=["fc0", "fc1"], progress=False,
                                          finetune_options=FinetuneOptions(epochs=2))
        assert result.stages  # the fine-tune pass ran and wrote trained weights back
        referred = len(external_data.attached_initializers(result.model))
        assert referred > 0
        held.append(external_data.held_arrays() - start)
        assert held[-1] <= 2 * referred  # this result's arrays, and the previous result's
        del result
    with pytest.raises(OptionsError):  # a failed compile frees what it attached
        lutcompile.compile_model(str(tmp_path / "mlp.onnx"), None, {"input": Xtr}, codebooks=8, progress=False,
                                 nodes_to_include=["nonesuch"])
    assert external_data.held_arrays() - start == held[-1]
