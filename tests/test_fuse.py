"""The max-pool fusion pass (compile/fuse.py): a LutConv writes the output of the MaxPool after
it, and the model's outputs stay the same bit for bit on every kernel path and thread count,
equal to the numpy reference; pools the kernel would not compute as ONNX does stay nodes; a
malformed `max_pool` attribute is refused when onnxruntime creates the session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lutcompile
from lutcompile.compile.fuse import fuse_max_pools
from lutcompile.compile.torch_program import TorchProgram
from lutcompile.ops.node_format import geometry_from_node, set_attributes
from lutcompile.ops.reference import reference_evaluator
from lutcompile.onnx_io.sessions import make_session

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Real pixels, 28 x 56: two Fashion-MNIST test images side by side, so that a pooled row
    is wider than one 16-float vector (the AVX-512 2 x 2 path's lanes run past it)."""
    with np.load(MODELS / "fashion_calib.npz") as npz:
        x = npz["input"][:96].reshape(-1, 1, 28, 28)
    return np.ascontiguousarray(np.concatenate([x[:48], x[48:]], axis=3))


def conv_pool_model(pool: dict, cout: int = 5, k: int = 5, pads=(2, 2, 2, 2), indices: bool = False,
                    head: bool = False) -> onnx.ModelProto:
    """Conv (1 -> cout, k x k) -> Relu -> MaxPool(**pool) -> Flatten (-> Gemm to 10, with `head`:
    exact, and so rounded by onnxruntime and numpy alike only within float rounding)."""
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((cout, 1, k, k)) / k).astype(np.float32)
    if not head:
        return _graph(W, None, pool, pads, indices, 0)
    probe = make_session(_graph(W, None, pool, pads, indices, 10), 1).run(None, {"x": np.zeros((1, 1, 28, 56), np.float32)})
    features = int(np.prod(probe[0].shape[1:]))
    G = (rng.standard_normal((10, features)) / np.sqrt(features)).astype(np.float32)
    return _graph(W, G, pool, pads, indices, features)


def _graph(W, G, pool, pads, indices, features) -> onnx.ModelProto:
    cout = W.shape[0]
    outputs = ["pooled", "where"] if indices else ["pooled"]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["conv"], name="conv", pads=list(pads)),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("MaxPool", ["relu"], outputs, name="pool", **pool),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten")]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.full(cout, 0.05, np.float32), "B")]
    out = "flat"
    if G is not None:
        nodes.append(helper.make_node("Gemm", ["flat", "G"], ["y"], name="fc", transB=1))
        inits.append(numpy_helper.from_array(G, "G"))
        out = "y"
    graph = helper.make_graph(nodes, "conv_pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 56])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def compile_pair(model: onnx.ModelProto, x: np.ndarray):
    """(fused, unfused) compiles of `model`, the Gemm kept exact."""
    common = dict(codebooks=4, finetune=False, progress=False, nodes_to_include=["conv"])
    return (lutcompile.compile_model(model, None, {"x": x}, **common),
            lutcompile.compile_model(model, None, {"x": x}, fuse_pooling=False, **common))


def run(model: onnx.ModelProto, x: np.ndarray, threads: int = 1) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), lutcompile.session_options(threads),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("pool", [
    dict(kernel_shape=[2, 2], strides=[2, 2]),   # the shipped CNNs' pool: the AVX-512 path's own
    dict(kernel_shape=[3, 3], strides=[2, 2]),   # overlapping windows: bands share rows
    dict(kernel_shape=[2, 3], strides=[1, 2]),   # a window wider than tall, stride 1 down
    dict(kernel_shape=[3, 3], strides=[3, 3], auto_pad="VALID"),  # the odd rows and columns left over
    dict(kernel_shape=[1, 1]),                    # strides left to their default, 1
], ids=["2x2s2", "3x3s2", "2x3s1x2", "3x3s3", "1x1"])
def test_fused_pools_are_bit_identical_on_every_path_and_thread_count(pool, images, path, monkeypatch):
    model = conv_pool_model(pool)
    fused, unfused = compile_pair(model, images)
    ops = [n.op_type for n in fused.model.graph.node]
    assert ops == ["LutConv", "Flatten"] and "MaxPool" in [n.op_type for n in unfused.model.graph.node]
    window = tuple(pool["kernel_shape"]) + tuple(pool.get("strides", [1, 1]))
    assert geometry_from_node(fused.model.graph.node[0]).max_pool == window
    assert [r.fused_pool for r in fused.nodes] == ["pool"] and [r.fused_pool for r in unfused.nodes] == [None]
    want = reference_evaluator(fused.model).run(None, {"x": images})[0]  # numpy's pooled LutConv
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    plain = run(unfused.model, images)
    np.testing.assert_array_equal(plain, want)
    for threads in (1, 2):
        np.testing.assert_array_equal(run(fused.model, images, threads), plain, err_msg=f"{threads} threads")
    np.testing.assert_array_equal(run(fused.model, images[:1]), plain[:1])  # batch 1: one band, inline


def test_the_torch_program_pools_as_the_kernel_does(images):
    """The train stage's forward of a fused LutConv (compile/torch_program.py) is the kernel's."""
    fused, _ = compile_pair(conv_pool_model(dict(kernel_shape=[3, 3], strides=[2, 2]), head=True), images)
    with torch.no_grad():
        got = TorchProgram(fused.model)(torch.from_numpy(images))[0].numpy()
    np.testing.assert_allclose(got, run(fused.model, images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool,indices", [
    (dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1]), False),
    (dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), False),
    (dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2]), False),
    (dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"), False),
    (dict(kernel_shape=[2, 2], strides=[2, 2]), True),
], ids=["pads", "ceil_mode", "dilations", "same_upper", "indices"])
def test_pools_the_kernel_would_compute_otherwise_stay_nodes(pool, indices, images):
    model = conv_pool_model(pool, indices=indices)
    fused, _ = compile_pair(model, images)
    assert [n.op_type for n in fused.model.graph.node] == ["LutConv", "MaxPool", "Flatten"]
    assert geometry_from_node(fused.model.graph.node[0]).max_pool is None
    np.testing.assert_array_equal(run(fused.model, images), reference_evaluator(fused.model).run(None, {"x": images})[0])


def test_a_pool_whose_input_is_also_a_graph_output_or_read_twice_stays_a_node(images):
    fused, _ = compile_pair(conv_pool_model(dict(kernel_shape=[2, 2], strides=[2, 2])), images)
    unfused = lutcompile.compile_model(conv_pool_model(dict(kernel_shape=[2, 2], strides=[2, 2])), None,
                                       {"x": images}, codebooks=4, finetune=False, progress=False,
                                       nodes_to_include=["conv"], fuse_pooling=False)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(unfused.model)
    exposed.graph.output.append(helper.make_tensor_value_info("relu", TensorProto.FLOAT, None))
    assert fuse_max_pools(exposed)[1] == []
    twice = onnx.ModelProto()
    twice.CopyFrom(unfused.model)
    twice.graph.node.append(helper.make_node("Identity", ["relu"], ["relu_copy"], name="copy"))
    twice.graph.output.append(helper.make_tensor_value_info("relu_copy", TensorProto.FLOAT, None))
    assert fuse_max_pools(twice)[1] == []
    again, fused_again = fuse_max_pools(fused.model)  # nothing left to fuse
    assert fused_again == [] and again == fused.model


@pytest.mark.bad_input
@pytest.mark.parametrize("value,message", [
    ([2, 2, 2], "'max_pool' must have 4 values"),
    ([2, 0, 2, 2], "max_pool window[1] = 0 out of range"),
    ([2, 2, 5000, 2], "max_pool strides[0] = 5000 out of range"),
    ([2.0, 2.0, 2.0, 2.0], "'max_pool' must have 4 values"),  # floats: onnxruntime reads no ints
])
def test_a_malformed_max_pool_attribute_is_refused_at_session_creation(value, message, images):
    fused, _ = compile_pair(conv_pool_model(dict(kernel_shape=[2, 2], strides=[2, 2])), images)
    bad = onnx.ModelProto()
    bad.CopyFrom(fused.model)
    set_attributes(bad.graph.node[0], {"max_pool": value})
    with pytest.raises(Exception, match=r"LutConv node 'conv'") as error:
        make_session(bad)
    assert message in str(error.value)


@pytest.mark.bad_input
def test_an_input_too_small_for_the_pool_window_is_a_run_time_error(images):
    """A 28 x 56 model given a 28 x 2 image: the 2 x 2 window fits, a 3 x 3 one does not."""
    fused, _ = compile_pair(conv_pool_model(dict(kernel_shape=[3, 3], strides=[3, 3])), images)
    flexible = onnx.ModelProto()
    flexible.CopyFrom(fused.model)
    flexible.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    del flexible.graph.node[1:]  # the LutConv alone, its output the graph's
    flexible.graph.output[0].name = flexible.graph.node[0].output[0]
    session = make_session(flexible)
    np.testing.assert_array_equal(session.run(None, {"x": images[:2, :, :, :6]})[0],
                                  reference_evaluator(flexible).run(None, {"x": images[:2, :, :, :6]})[0])
    with pytest.raises(Exception, match="smaller than the fused max_pool window"):
        session.run(None, {"x": np.ascontiguousarray(images[:2, :, :, :2])})


def test_the_shipped_cnn_fused_is_bit_identical_to_it_unfused(fast_cnn, path, monkeypatch):
    """Both lookup convolutions of the shipped CNN write their pools (14 x 14 -> 7 x 7, and 7 x 7
    -> 3 x 3, whose last row and column no window reads); compiled as conftest's fast_cnn is."""
    result, out = fast_cnn
    fused = onnx.load(str(out))
    assert [r.fused_pool for r in result.nodes] == ["/5/MaxPool", "/8/MaxPool", None, None]
    assert "MaxPool" not in [n.op_type for n in fused.graph.node if n.name != "/2/MaxPool"]
    with np.load(MODELS / "fashion_calib.npz") as npz:
        x = npz["input"][:300]
    unfused = lutcompile.compile_model(MODELS / "fashion_cnn.onnx", None, {"input": x[:128]}, codebooks=8,
                                       finetune=False, table_loss="ridge", partition="contiguous", progress=False,
                                       fuse_pooling=False)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for threads in (1, 2):
        sessions = [ort.InferenceSession(m.SerializeToString(), lutcompile.session_options(threads),
                                         providers=["CPUExecutionProvider"]) for m in (fused, unfused.model)]
        got, want = (s.run(None, {"input": x})[0] for s in sessions)
        np.testing.assert_array_equal(got, want, err_msg=f"{threads} threads")
