"""The ONNX files people export: every frontend case compiled and checked against onnxruntime.

Exactness check: the calibration inputs give each codebook's 4 input dimensions only binary
values, so each codebook sees at most 16 distinct subvectors, which the depth-4 tree separates
perfectly. The ridge tables then reproduce the exact product, and the compiled model must
match onnxruntime on the original up to the 8-bit table quantisation.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lutcompile
from lutcompile.onnx_io import external_data
from lutcompile.compile import frontend
from lutcompile.compile.fit import FitOptions
from lutcompile.ops.spec import DOMAIN
from lutcompile.ops.reference import reference_evaluator
from lutcompile.ops.node_format import params_from_node
from lutcompile.onnx_io.sessions import make_session

D, M, N = 16, 6, 256  # 4 codebooks of 4 binary inputs
EXACT_FIT = dict(codebooks=D // 4, partition="contiguous", table_loss="ridge", finetune=False, progress=False,
                 fit_options=FitOptions(ridge=1e-6, tree_objective="input"))


def binary_rows(n: int, seed: int = 0, shape=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, size=(n, D)).astype(np.float32) * np.float32(0.75) + np.float32(0.25)
    return x if shape is None else x.reshape(shape)


def weights(seed: int = 1, shape=(D, M)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make(nodes, inputs, outputs, inits, opset=17, ir=8):
    if ir < 4:  # IR 3 requires every initializer to be a graph input too
        inputs = inputs + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    model = helper.make_model(helper.make_graph(nodes, "case", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def run(model, feeds, custom=False):
    if custom or any(external_data.is_attached(t) for t in model.graph.initializer):
        return make_session(model).run(None, feeds)  # passes memory-mapped weights along
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def quantisation_bound(compiled) -> float:
    """Largest output error the 8-bit tables allow: half a step per codebook."""
    bound = 0.0
    for n in compiled.graph.node:
        if n.domain == DOMAIN:
            p = params_from_node(n)
            bound = max(bound, 0.5 * p.C * p.scale)
    return bound * 1.05 + 1e-5


def assert_compiles_exactly(model, feeds, replaced: int, **kwargs):
    result = lutcompile.compile_model(model, None, feeds, **{**EXACT_FIT, **kwargs})
    compiled = result.model
    assert sum(n.domain == DOMAIN for n in compiled.graph.node) == replaced, result.skipped
    assert [i.name for i in compiled.graph.input] == [i.name for i in model.graph.input
                                                      if i.name not in {t.name for t in model.graph.initializer}]
    want, got = run(model, feeds), run(compiled, feeds, custom=True)
    for w, g in zip(want, got):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=quantisation_bound(compiled), rtol=0)
    return compiled


def gemm_mlp(opset: int, ir: int):
    W1, W2 = weights(1, (D, D)), weights(2, (D, M))
    # layer 1 is the identity on binary inputs scaled and shifted, so layer 2 sees binary inputs too
    W1 = np.eye(D, dtype=np.float32) * 2
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "W2", "b2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(np.zeros(D, np.float32), "b1"),
             numpy_helper.from_array(W2, "W2"), numpy_helper.from_array(weights(3, (M,)), "b2")]
    return make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M])], inits, opset, ir)


@pytest.mark.parametrize("opset,ir", [(7, 3), (9, 4), (11, 6), (13, 7), (17, 8), (21, 10)])
def test_opsets_7_to_21(opset, ir):
    compiled = assert_compiles_exactly(gemm_mlp(opset, ir), {"x": binary_rows(N)}, replaced=2)
    assert {(o.domain, o.version) for o in compiled.opset_import} == {("", opset), (DOMAIN, 1)}
    assert compiled.ir_version == ir


def test_initializers_listed_as_graph_inputs():
    model = gemm_mlp(9, 3)  # the IR 3 style of old model-zoo files
    assert len(model.graph.input) == 5
    compiled = assert_compiles_exactly(model, {"x": binary_rows(N)}, replaced=2)
    assert [i.name for i in compiled.graph.input] == ["x"]


def test_fixed_batch_dimension_keeps_the_interface():
    W = weights()
    model = make([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, D])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, M])], [numpy_helper.from_array(W, "W")])
    result = lutcompile.compile_model(model, None, {"x": binary_rows(N + 3)}, **EXACT_FIT)  # 259: a short tail
    compiled = result.model
    assert compiled.graph.input[0].type == model.graph.input[0].type
    assert compiled.graph.output[0].type == model.graph.output[0].type
    x = binary_rows(8, seed=5)
    np.testing.assert_allclose(run(compiled, {"x": x}, True)[0], x @ W, atol=quantisation_bound(compiled))


@pytest.mark.parametrize("trans_a,trans_b,alpha,beta,weight_left", [
    (0, 0, 1.0, 1.0, False), (1, 0, 0.5, 2.0, False), (0, 1, 2.0, 0.0, False), (1, 1, -1.5, 0.3, False),
    (0, 0, 1.0, 1.0, True), (1, 0, 0.7, 1.0, True), (0, 1, 1.0, 2.0, True), (1, 1, 2.0, 0.5, True),
])
def test_gemm_any_transpose_alpha_beta(trans_a, trans_b, alpha, beta, weight_left):
    x = binary_rows(N)
    if not weight_left:  # Y [N, M] = alpha * A' B' + beta * C, activation A
        act = x.T.copy() if trans_a else x
        W = weights()
        stored = W.T.copy() if trans_b else W
        operands, c = ["x", "W", "C"], weights(4, (M,))
        x_shape, y_shape = list(act.shape), [N, M]
    else:  # Y [M, N] = alpha * W' X', activation B
        act = x if trans_b else x.T.copy()
        W = weights(shape=(M, D))
        stored = W.T.copy() if trans_a else W
        operands, c = ["W", "x", "C"], weights(4, (M, 1))
        x_shape, y_shape = list(act.shape), [M, N]
    model = make([helper.make_node("Gemm", operands, ["y"], name="g", transA=trans_a, transB=trans_b,
                                   alpha=alpha, beta=beta)],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                 [numpy_helper.from_array(stored, "W"), numpy_helper.from_array(c, "C")], opset=13)
    # rows of the activation are calibration rows only for the non-transposed layouts; feed it whole
    result = lutcompile.compile_model(model, None, {"x": act}, **EXACT_FIT)
    assert [n.op_type for n in result.model.graph.node if n.domain == DOMAIN] == ["LutMatMul"]
    want, got = run(model, {"x": act})[0], run(result.model, {"x": act}, True)[0]
    np.testing.assert_allclose(got, want, atol=quantisation_bound(result.model) + 1e-4)


@pytest.mark.parametrize("shape", [(N, D), (4, N // 4, D)])
def test_matmul_on_2d_and_3d_activations(shape):
    W = weights()
    model = make([helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
                  helper.make_node("Add", ["m", "b"], ["y"], name="add")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", *shape[1:]] if len(shape) == 3 else ["N", D])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*(["B"] if len(shape) == 3 else []), "T", M])],
                 [numpy_helper.from_array(W, "W"), numpy_helper.from_array(weights(7, (M,)), "b")])
    compiled = assert_compiles_exactly(model, {"x": binary_rows(N, shape=shape)}, replaced=1)
    assert [n.op_type for n in compiled.graph.node] == ["LutMatMul"]  # the Add is folded in


@pytest.mark.parametrize("rank", [2, 3])
def test_matmul_with_the_constant_on_the_left(rank):
    W = weights(shape=(M, D))
    x = binary_rows(N).T.copy()  # [D, N]: columns are the rows the lookups see
    if rank == 3:
        x = binary_rows(N).reshape(4, N // 4, D).transpose(0, 2, 1).copy()  # [4, D, 64]
    model = make([helper.make_node("MatMul", ["W", "x"], ["y"], name="left")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x.shape[:-2], M, x.shape[-1]])],
                 [numpy_helper.from_array(W, "W")])
    compiled = assert_compiles_exactly(model, {"x": x}, replaced=1)
    assert [n.op_type for n in compiled.graph.node] == ["Transpose", "LutMatMul", "Transpose"]


def test_weight_shared_by_two_nodes():
    W = weights()
    model = make([helper.make_node("MatMul", ["x", "W"], ["y1"], name="first"),
                  helper.make_node("Relu", ["x"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", "W"], ["y2"], name="second")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                 [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", M]),
                  helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", M])],
                 [numpy_helper.from_array(W, "W")])
    compiled = assert_compiles_exactly(model, {"x": binary_rows(N)}, replaced=2)
    assert len(compiled.graph.initializer) == 0
    # and with one of them kept exact, the shared weight stays for it
    kept = lutcompile.compile_model(model, None, {"x": binary_rows(N)}, nodes_to_exclude=["second"], **EXACT_FIT)
    assert [t.name for t in kept.model.graph.initializer] == ["W"]


@pytest.mark.bad_input
def test_external_data_loads_and_escaping_paths_are_refused(tmp_path):
    model = gemm_mlp(17, 8)
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    loaded = frontend.load_model(folder / "m.onnx")
    # the weights stay outside the proto, memory-mapped, yet read back exactly
    assert all(external_data.is_attached(t) for t in loaded.graph.initializer)
    inline = onnx.load(str(folder / "m.onnx"))
    for t, ref in zip(loaded.graph.initializer, inline.graph.initializer):
        np.testing.assert_array_equal(external_data.tensor_array(t), numpy_helper.to_array(ref))
    assert_compiles_exactly(loaded, {"x": binary_rows(N)}, replaced=2)
    # a file whose external data points outside its folder is refused, and nothing is read
    evil = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for t in evil.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(os.urandom(4096))
    onnx.save_model(evil, str(folder / "evil.onnx"))
    with pytest.raises(frontend.FrontendError, match="outside the model's folder"):
        frontend.load_model(folder / "evil.onnx")


def conv_model(pads, strides, dilations, group=1, cin=4, cout=6, k=(2, 2)):
    W = weights(9, (cout, cin // group, *k))
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=list(pads), strides=list(strides),
                            dilations=list(dilations), group=group)
    return make([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, 9, 8])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cout, "OH", "OW"])],
                [numpy_helper.from_array(W, "W"), numpy_helper.from_array(weights(8, (cout,)), "B")], opset=13)


def binary_images(n=64, cin=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, size=(n, cin, 9, 8)) * 0.75 + 0.25).astype(np.float32)


def test_conv_without_padding_compiles_exactly():
    """Patches of binary images, 4 codebooks of one channel's 2x2 window each: exact."""
    model = conv_model((0, 0, 0, 0), (1, 1), (1, 1))
    x = binary_images()
    result = lutcompile.compile_model(model, None, {"x": x}, **EXACT_FIT)
    assert [n.op_type for n in result.model.graph.node] == ["LutConv"]
    want, got = run(model, {"x": x})[0], run(result.model, {"x": x}, True)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=quantisation_bound(result.model))


@pytest.mark.parametrize("pads,strides,dilations", [
    ((1, 1, 1, 1), (1, 1), (1, 1)), ((0, 1, 2, 0), (2, 1), (1, 2)), ((2, 2, 2, 2), (3, 2), (2, 1)),
])
def test_lutconv_kernel_matches_the_reference_bit_for_bit(pads, strides, dilations, monkeypatch):
    model = conv_model(pads, strides, dilations)
    x = binary_images() * np.random.default_rng(1).random((64, 4, 9, 8)).astype(np.float32)
    result = lutcompile.compile_model(model, None, {"x": x}, codebooks=4, finetune=False, progress=False)
    from lutcompile.ops.reference import reference_evaluator
    got = run(result.model, {"x": x}, True)[0]
    np.testing.assert_array_equal(got, reference_evaluator(result.model).run(None, {"x": x})[0])
    for path in lutcompile.ops.kernel.available_paths():  # every kernel path, any thread count
        monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
        for threads in (1, 2):
            sess = ort.InferenceSession(result.model.SerializeToString(), lutcompile.session_options(threads),
                                        providers=["CPUExecutionProvider"])
            np.testing.assert_array_equal(sess.run(None, {"x": x})[0], got, err_msg=f"{path}, {threads} threads")
    # a second image size on one session (the patch index is cached for the first size only)
    flexible = onnx.ModelProto()
    flexible.CopyFrom(result.model)
    for axis, name in ((2, "H"), (3, "W")):
        flexible.graph.input[0].type.tensor_type.shape.dim[axis].dim_param = name
    sess = make_session(flexible)
    smaller = np.ascontiguousarray(x[:5, :, :7, :6])
    for images in (x, smaller, x):
        np.testing.assert_array_equal(sess.run(None, {"x": images})[0],
                                      reference_evaluator(flexible).run(None, {"x": images})[0])


@pytest.mark.parametrize("group,cin,k,reason", [(2, 4, (3, 3), "grouped"), (4, 4, (3, 3), "depthwise"),
                                                (1, 1, (3, 3), "too small to pay")])
def test_convs_that_stay_exact_say_why(group, cin, k, reason):
    model = conv_model((1, 1, 1, 1), (1, 1), (1, 1), group=group, cin=cin, cout=4, k=k)
    analysis = frontend.analyse(model)
    assert analysis.targets == []
    assert reason in analysis.skipped[0].reason


class _SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 2)
        self.fc = torch.nn.Linear(6 * 8 * 7, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def export_torch(exporter: str, path) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = _SmallCNN().eval()
    example = (torch.from_numpy(binary_images(2)),)
    if exporter == "dynamo":
        program = torch.onnx.export(net, example, dynamo=True, input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        program.save(str(path))
    else:
        torch.onnx.export(net, example, str(path), input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return lutcompile.compile.frontend.load_model(path)


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_torch_exports_compile(exporter, tmp_path):
    """torch.onnx.export, TorchScript-based and dynamo-based: the Conv alone is exact on binary
    images, and its error reaches the logits through the Linear at most row-sum(|W|) times;
    with every product replaced, onnxruntime agrees with the Python reference runtime."""
    model = export_torch(exporter, tmp_path / "cnn.onnx")
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    x = binary_images(64, seed=3)  # the Linear needs 64 rows: 4 codebooks x 16 table entries
    result = lutcompile.compile_model(model, None, {"x": x}, **{**EXACT_FIT, "nodes_to_include": [conv]})
    assert [n.op_type for n in result.model.graph.node if n.domain == DOMAIN] == ["LutConv"]
    fc_weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.dims == [10, 6 * 8 * 7])
    bound = quantisation_bound(result.model) * np.abs(fc_weight).sum(axis=1).max()
    np.testing.assert_allclose(run(result.model, {"x": x}, True)[0], run(model, {"x": x})[0], atol=bound, rtol=0)

    every = lutcompile.compile_model(model, None, {"x": x}, **EXACT_FIT).model
    assert sorted(n.op_type for n in every.graph.node if n.domain == DOMAIN) == ["LutConv", "LutMatMul"]
    assert [i.name for i in every.graph.input] == ["x"] and [o.name for o in every.graph.output] == ["logits"]
    got = run(every, {"x": x[:5]}, True)[0]  # a batch size the export never saw
    want = reference_evaluator(every).run(None, {"x": x[:5]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
