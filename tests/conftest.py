"""Shared fixtures: real data (scikit-learn's digits) and small ONNX models trained on it."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier

from lutcompile.ops import kernel

AVAILABLE = kernel.available_paths()
# what a CPU lacks when kernel.available_paths() leaves a path out (lutkernel.c's detection)
MISSING_REASON = {"avx2": "CPU lacks AVX2", "avx512": "CPU lacks AVX-512 F/BW/VL/VBMI/VNNI"}


@pytest.fixture(params=kernel.PATHS)
def path(request) -> str:
    """Each kernel path in turn ("scalar", "avx2", "avx512"); on a CPU without it, the test is
    skipped, saying what the CPU lacks."""
    if request.param not in AVAILABLE:
        pytest.skip(MISSING_REASON[request.param])
    return request.param


def load_digits_data():
    """(X float32 [1797, 64] scaled to [0, 1], labels int64), in a fixed shuffled order."""
    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    return (X[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def train_digits_mlp(X, y):
    """A 64-48-32-10 ReLU MLP trained on (X, y): list of (W [D, M], b [M])."""
    clf = MLPClassifier(hidden_layer_sizes=(48, 32), max_iter=300, random_state=0)
    clf.fit(X, y)
    return [(W.astype(np.float32), b.astype(np.float32)) for W, b in zip(clf.coefs_, clf.intercepts_)]


@pytest.fixture(scope="session")
def digits():
    return load_digits_data()


@pytest.fixture(scope="session")
def digits_split(digits):
    """(train X, train y, test X, test y): 1,297 rows to fit on, 500 held out."""
    X, y = digits
    return X[:1297], y[:1297], X[1297:], y[1297:]


@pytest.fixture(scope="session")
def digits_mlp(digits_split):
    """The MLP of `train_digits_mlp`, trained on the 1,297 training rows."""
    Xtr, ytr, _, _ = digits_split
    return train_digits_mlp(Xtr, ytr)


def mlp_model(layers, style: str = "gemm", opset: int = 17, batch: int | str = "N") -> onnx.ModelProto:
    """An ONNX MLP from (W, b) layers, ReLU between, logits out.

    style "gemm": Gemm with transB=1 (the weight stored [M, D], as torch exports);
    style "matmul": MatMul followed by Add of the bias.
    """
    nodes, inits = [], []
    x = "input"
    for i, (W, b) in enumerate(layers):
        out = f"h{i}" if i < len(layers) - 1 else "logits"
        pre = f"pre{i}" if i < len(layers) - 1 else out
        if style == "gemm":
            inits += [numpy_helper.from_array(np.ascontiguousarray(W.T), f"W{i}"),
                      numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"b{i}"], [pre], name=f"fc{i}", transB=1))
        else:
            inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"mm{i}"], name=f"fc{i}"))
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [pre], name=f"add{i}"))
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [pre], [out], name=f"relu{i}"))
        x = out
    D, M = layers[0][0].shape[0], layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, D])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, M])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="session")
def digits_model(digits_mlp):
    return mlp_model(digits_mlp, "gemm")


def numpy_mlp(layers, X):
    """The exact forward pass in numpy (float64), an independent reference."""
    h = X.astype(np.float64)
    for i, (W, b) in enumerate(layers):
        h = h @ W + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


@pytest.fixture(scope="session")
def fuzz_models(tmp_path_factory):
    """The folder of fuzz_cases.build_base_models: the digits MLP and the small CNN compiled, and both as
    sum-product layers."""
    from fuzz_cases import build_base_models
    return build_base_models(tmp_path_factory.mktemp("fuzz_models"))


@pytest.fixture(scope="session")
def fast_cnn(tmp_path_factory):
    """The shipped Fashion-MNIST CNN compiled once for the tests that read or serve a compiled CNN:
    (CompileResult, path of fast.onnx). The fastest fit (8 codebooks, ridge tables, contiguous
    groups, 128 calibration images: 16 rows per codebook for the Gemm nodes, no fine-tuning),
    since those tests check the compiled graph, not its accuracy."""
    from pathlib import Path

    import lutcompile
    models = Path(__file__).resolve().parent.parent / "models"
    out = tmp_path_factory.mktemp("fast_cnn") / "fast.onnx"
    calib = {"input": np.load(models / "fashion_calib.npz")["input"][:128]}
    result = lutcompile.compile_model(models / "fashion_cnn.onnx", out, calib, codebooks=8, finetune=False,
                                      table_loss="ridge", partition="contiguous", progress=False)
    return result, out
