"""Real ONNX files: the model zoo's mnist-8, torch exports with BatchNorm, a Constant-node weight.

mnist-8 (tests/data/README.md) is a CNTK export at opset 8 and IR 3, where every initializer
must also be a graph input; its MatMul weight is stored [16, 4, 4, 10] behind a Reshape, and
each Conv's bias is a separate Add of a [C, 1, 1] constant. It is fed raw 0..255 pixels, as in
the zoo's own test case.
Each compiled model must pass onnx.checker, run in onnxruntime with our kernel, and each lookup
node's output there must equal the numpy reference on the input onnxruntime gave that node.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lutcompile
from lutcompile.compile import calibrate, frontend
from lutcompile.compile.calibrate import CalibrationData
from lutcompile.onnx_io.sessions import thread_limit
from lutcompile.ops.node_format import geometry_from_node, params_from_node
from lutcompile.ops.spec import DOMAIN, apply_conv_reference, apply_reference
from test_frontend_cases import EXACT_FIT, binary_rows, quantisation_bound, weights

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
MNIST8 = DATA / "mnist-8.onnx"
# fast fit options: the default OPQ partition and loss-aware tables take ~45 s on mnist-8
FAST = dict(codebooks=8, partition="r2", table_loss="ridge", finetune=False, progress=False)


def mnist8_rows(split: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` seeded rows (the files are sorted by label) as mnist-8 takes them: images
    [rows, 1, 28, 28] of 0..255 pixels (the .npz holds pixels / 255), and their labels."""
    with np.load(ROOT / f"models/mnist_{split}.npz") as npz:
        chosen = np.sort(np.random.default_rng(0).permutation(len(npz["labels"]))[:rows])
        images = np.round(npz["input"][chosen] * 255).reshape(-1, 1, 28, 28).astype(np.float32)
        return images, npz["labels"][chosen]


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.register_custom_ops_library(lutcompile.library_path())
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    """mnist-8's top-1 accuracy in onnxruntime, with our kernel (one image per run: batch 1)."""
    return lutcompile.evaluate_accuracy(model, CalibrationData({"Input3": images}, labels))


def assert_lookups_match_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[str]:
    """Each lookup node's output in onnxruntime equals the numpy reference on the input
    onnxruntime gave it; returns the lookup nodes' names."""
    lookups = [n for n in model.graph.node if n.domain == DOMAIN]
    names = [t for n in lookups for t in (n.input[0], n.output[0])]
    values = calibrate.collect_activations(model, CalibrationData(feeds), {t: (t, np.asarray) for t in names})
    for n in lookups:
        geometry = geometry_from_node(n)
        want = apply_reference(values[n.input[0]], params_from_node(n)) if geometry is None else \
            apply_conv_reference(values[n.input[0]], params_from_node(n), geometry)
        np.testing.assert_allclose(values[n.output[0]], want, rtol=1e-6, atol=1e-6, err_msg=n.name)
    return [n.name for n in lookups]


def assert_ir3_rules(model: onnx.ModelProto) -> None:
    """IR 3 kept, every initializer listed as a graph input, and onnx.checker passes."""
    assert model.ir_version == 3
    assert {t.name for t in model.graph.initializer} <= {i.name for i in model.graph.input}
    onnx.checker.check_model(model)


def test_mnist8_is_the_model_zoo_file_and_takes_raw_pixels():
    """The zoo's own test case (raw 0..255 pixels) gives the zoo's output, and the exact model
    scores 99 % on this repo's MNIST rows rescaled to 0..255."""
    model = onnx.load(str(MNIST8))
    assert (model.ir_version, model.opset_import[0].version, model.producer_name) == (3, 8, "CNTK")
    assert {t.name for t in model.graph.initializer} < {i.name for i in model.graph.input}
    case = DATA / "mnist-8_test_data_set_0"
    x, want = (numpy_helper.to_array(onnx.load_tensor(str(case / f))) for f in ("input_0.pb", "output_0.pb"))
    assert x.max() == 255
    np.testing.assert_allclose(session(model).run(None, {"Input3": x})[0], want, rtol=1e-5, atol=1e-2)
    assert accuracy(model, *mnist8_rows("test", 1000)) >= 0.98


@pytest.fixture(scope="module")
def compiled_mnist8():
    images, labels = mnist8_rows("calib", 256)
    return lutcompile.compile_model(str(MNIST8), None, {"Input3": images, "labels": labels}, **FAST)


def test_mnist8_compiles_keeping_ir3_rules_and_matches_the_reference(compiled_mnist8):
    result, model = compiled_mnist8, compiled_mnist8.model
    # both Convs (patches of 1x5x5 = 25 and 8x5x5 = 200 inputs) and the MatMul (its weight a
    # Reshape of an initializer to 256 x 10) become lookups; each Conv absorbs its bias Add
    # and ReLU, and writes the output of the MaxPool after it (2x2 stride 2, then 3x3 stride 3:
    # compile/fuse.py); no node is kept exact
    assert [(r.name, r.D, r.M, r.fused_pool) for r in result.nodes] == [
        ("Convolution28", 25, 8, "Pooling66"), ("Convolution110", 200, 16, "Pooling160"), ("Times212", 256, 10, None)]
    assert result.skipped == []
    assert [(n.op_type, n.name) for n in model.graph.node] == [
        ("LutConv", "Convolution28"), ("LutConv", "Convolution110"), ("Reshape", "Times212_reshape0"),
        ("LutMatMul", "Times212")]
    assert [geometry_from_node(n).max_pool for n in model.graph.node if n.op_type == "LutConv"] == [
        (2, 2, 2, 2), (3, 3, 3, 3)]
    assert [params_from_node(n).relu for n in model.graph.node if n.domain == DOMAIN] == [True, True, False]
    assert_ir3_rules(model)
    # the one weight left (the activation Reshape's shape) stays a graph input, as in the original
    assert [i.name for i in model.graph.input] == ["Input3", "Pooling160_Output_0_reshape0_shape"]
    images, _ = mnist8_rows("test", 64)
    assert assert_lookups_match_reference(model, {"Input3": images}) == [
        "Convolution28", "Convolution110", "Times212"]
    assert result.accuracy_before >= 0.98
    # 8 codebooks for the 200 inputs of the second Conv, one-shot (no fine-tune pass): 62 % on
    # the 2,000 test rows measured (70 % with the default OPQ and loss-aware tables), 99.5 % exact
    assert accuracy(model, *mnist8_rows("test", 500)) >= 0.5


@pytest.mark.parametrize("ir", [3, 4])
def test_mnist8_weights_left_stay_graph_inputs(ir):
    """With only the MatMul replaced, the Convs' weights stay initializers and stay listed as
    graph inputs, in the original order (IR 3 requires it; at IR 4 it keeps the interface)."""
    model = onnx.load(str(MNIST8))
    model.ir_version = ir
    images, _ = mnist8_rows("calib", 256)
    compiled = lutcompile.compile_model(model, None, {"Input3": images},
                                        **{**FAST, "codebooks": {"Times212": 8}}).model
    gone = {"Parameter193", "Parameter193_reshape1_shape", "Parameter194"}  # the MatMul's weight, shape, bias
    assert [i.name for i in compiled.graph.input] == [i.name for i in model.graph.input if i.name not in gone]
    assert {t.name for t in compiled.graph.initializer} == {t.name for t in model.graph.initializer} - gone
    assert compiled.ir_version == ir
    onnx.checker.check_model(compiled)
    assert assert_lookups_match_reference(compiled, {"Input3": images[:16]}) == ["Times212"]


@pytest.mark.slow
def test_cli_compiles_mnist8(tmp_path):
    """`lutcompile` on the zoo file, labels given, so with its fine-tune pass (which must run the
    graph in torch: Convs with auto_pad=SAME_UPPER, a Reshape that fixes batch 1), exits 0 and
    writes an IR 3 model that onnxruntime runs."""
    images, labels = mnist8_rows("calib", 200)
    np.savez(tmp_path / "calib.npz", Input3=images, labels=labels)
    out = tmp_path / "fast.onnx"
    proc = subprocess.run([sys.executable, "-m", "lutcompile", str(MNIST8), "--calib", str(tmp_path / "calib.npz"),
                           "-o", str(out), "-C", "8", "--partition", "r2", "--table-loss", "ridge", "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "calibration accuracy after Convolution28" in proc.stdout  # the fine-tune pass ran
    model = onnx.load(str(out))
    assert_ir3_rules(model)
    assert sum(n.domain == DOMAIN for n in model.graph.node) == 3
    assert accuracy(model, *mnist8_rows("test", 200)) >= 0.5


class DigitsCNN(torch.nn.Module):
    """Conv-BN-ReLU (a 3x3 patch of one channel: too small, stays exact), Conv-BN-ReLU, MaxPool, Linear."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(scope="module")
def digits_cnn(digits_split):
    """The CNN trained briefly on scikit-learn's digits (8x8), in eval mode: the BatchNorms hold
    the running statistics and affine parameters training gave them."""
    Xtr, ytr, _, _ = digits_split
    torch.manual_seed(0)
    net = DigitsCNN()
    x, y = torch.from_numpy(Xtr.reshape(-1, 1, 8, 8)), torch.from_numpy(ytr)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with thread_limit(1):  # 2 s; tiny steps on several threads of a busy machine took 40 s
        for _ in range(6):
            for rows in torch.randperm(len(x)).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[rows]), y[rows]).backward()
                opt.step()
    net.eval()
    for bn in (net.body[1], net.body[4]):
        assert bn.running_mean.abs().max() > 0.05 and (bn.running_var - 1).abs().max() > 0.05
    return net


def export(net, path: Path, constant_folding: bool) -> onnx.ModelProto:
    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), str(path), dynamo=False,
                      training=torch.onnx.TrainingMode.EVAL, do_constant_folding=constant_folding,
                      input_names=["x"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})
    return onnx.load(str(path))


@pytest.mark.parametrize("constant_folding", [True, False], ids=["bn_folded_by_torch", "bn_node_kept"])
def test_torch_export_with_batchnorm(digits_cnn, digits_split, tmp_path, constant_folding):
    """With constant folding the exporter folds each BatchNorm into its Conv; without, the
    BatchNormalization nodes stay, and the frontend folds the second into its lookup (the first
    follows a Conv kept exact, and stays). Either way the lookups equal the reference and the
    logits track the original's."""
    Xtr, _, Xte, yte = digits_split
    model = export(digits_cnn, tmp_path / "cnn.onnx", constant_folding)
    assert ("BatchNormalization" in {n.op_type for n in model.graph.node}) is not constant_folding
    result = lutcompile.compile_model(model, None, {"x": Xtr.reshape(-1, 1, 8, 8)},
                                      **{**FAST, "codebooks": 16})
    compiled = result.model
    assert [s.reason for s in result.skipped] == [
        "patch of 1x3x3 = 9 inputs is too small to pay (lookups need at least 16)"]
    assert [(n.op_type, n.name) for n in compiled.graph.node if n.domain == DOMAIN] == [
        ("LutConv", "/body/body.3/Conv"), ("LutMatMul", "/body/body.8/Gemm")]
    assert [n.op_type for n in compiled.graph.node].count("BatchNormalization") == (0 if constant_folding else 1)
    onnx.checker.check_model(compiled)
    images = Xte.reshape(-1, 1, 8, 8)
    assert_lookups_match_reference(compiled, {"x": images})
    with torch.no_grad():
        want = digits_cnn(torch.from_numpy(images)).numpy()
    got = session(compiled).run(None, {"x": images})[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.4  # 0.30 measured
    assert np.mean(want.argmax(1) == yte) >= 0.95
    assert np.mean(got.argmax(1) == yte) >= np.mean(want.argmax(1) == yte) - 0.1  # 99.6 % -> 94.6 % measured


def test_frontend_folds_batchnorm_as_the_exporter_does(digits_cnn, tmp_path):
    """The frontend's BatchNorm fold gives the second Conv the weight and bias torch's own
    fold gives it."""
    folded, kept = (frontend.analyse(export(digits_cnn, tmp_path / f"{cf}.onnx", cf)).targets
                    for cf in (True, False))
    (a, b), = [(x, y) for x, y in zip(folded, kept) if x.conv is not None]
    assert b.absorbed == ["/body/body.3/Conv", "/body/body.4/BatchNormalization", "/body/body.5/Relu"]
    assert b.parameter_names == ["body.3.weight", "body.4.weight", "body.4.bias"]
    np.testing.assert_allclose(b.weight, a.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.bias, a.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["constant", "constant_transposed"])
def test_weight_from_a_constant_node(layout):
    """A MatMul whose weight is a Constant node (or a Constant behind a Transpose), not an
    initializer, is a target; on binary inputs the lookups reproduce x @ W."""
    W = weights()
    stored = W.T.copy() if layout == "constant_transposed" else W
    nodes = [helper.make_node("Constant", [], ["W0"], name="weight", value=numpy_helper.from_array(stored, "W0"))]
    if layout == "constant_transposed":
        nodes.append(helper.make_node("Transpose", ["W0"], ["W"], name="transpose", perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["x", nodes[-1].output[0]], ["y"], name="mm"))
    graph = helper.make_graph(nodes, "constant_weight",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", W.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", W.shape[1]])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    x = binary_rows(256)
    result = lutcompile.compile_model(model, None, {"x": x}, **EXACT_FIT)
    compiled = result.model
    assert [r.name for r in result.nodes] == ["mm"] and result.skipped == []
    assert [n.op_type for n in compiled.graph.node] == ["LutMatMul"]  # the Constant (and Transpose) gone
    onnx.checker.check_model(compiled)
    got = session(compiled).run(None, {"x": x})[0]
    want = apply_reference(x, params_from_node(compiled.graph.node[0]))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got, x @ W, atol=quantisation_bound(compiled), rtol=0)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
def test_torch_program_resolves_auto_pad_as_onnxruntime_does(auto_pad, op):
    """The fine-tune pass runs the graph in torch: auto_pad must give onnxruntime's output
    (odd input size, stride 2, so SAME pads are asymmetric)."""
    from lutcompile.compile.torch_program import TorchProgram
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    inits, inputs, attrs = [], ["x"], {"auto_pad": auto_pad, "strides": [2, 2]}
    if op == "Conv":
        inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 2)).astype(np.float32), "w")]
        inputs.append("w")
    else:
        attrs["kernel_shape"] = [3, 2]
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"], **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    got = TorchProgram(model)(torch.from_numpy(X))[0].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
