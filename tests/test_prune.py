"""The column-pruning pass (compile/prune.py): lookup producers compute only the columns their
consumer's trees read, and the model's outputs stay the same bit for bit, on every kernel path."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lutcompile
from lutcompile.compile.fit import fit_node
from lutcompile.compile.pipeline import CompileOptions
from lutcompile.compile.prune import prune_unread_columns
from lutcompile.ops import kernel
from lutcompile.ops.node_format import lut_attributes, params_from_node
from lutcompile.ops.reference import reference_evaluator
from lutcompile.ops.spec import DOMAIN, OP_TYPE, apply_reference
from conftest import mlp_model

MODELS = Path(__file__).resolve().parent.parent / "models"


def run(model: onnx.ModelProto, X: np.ndarray, threads: int = 1) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(kernel.library_path())
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: X})


def lookups(model: onnx.ModelProto) -> dict:
    return {n.name: params_from_node(n) for n in model.graph.node if n.domain == DOMAIN}


@pytest.fixture(scope="module")
def compiled_pair(digits_split, digits_mlp):
    """The digits MLP (64-48-32-10) compiled at C = 4, unpruned and pruned by the pipeline."""
    Xtr, ytr, _, _ = digits_split
    model = mlp_model(digits_mlp)
    calib = {"input": Xtr, "labels": ytr}
    unpruned = lutcompile.compile_model(model, None, calib, codebooks=4,
                                        options=replace(CompileOptions(), prune_columns=False))
    pruned = lutcompile.compile_model(model, None, calib, codebooks=4)
    return unpruned, pruned


def test_compiled_mlp_is_narrowed_and_its_outputs_are_bit_identical_on_every_path(compiled_pair, digits_split,
                                                                                   path, monkeypatch):
    unpruned, pruned = compiled_pair
    before, after = lookups(unpruned.model), lookups(pruned.model)
    # fc0 and fc1 feed lookups reading at most 4 * 4 = 16 of their 48 and 32 columns; the
    # logits node feeds the graph output and keeps all 10
    for producer, consumer in (("fc0", "fc1"), ("fc1", "fc2")):
        read = np.unique(before[consumer].split_dims)
        assert len(read) <= 16 < before[producer].M
        assert after[producer].M == after[consumer].D == len(read)
        np.testing.assert_array_equal(after[producer].tables, before[producer].tables[read])
    assert after["fc2"].M == before["fc2"].M == 10
    reported = {n.name: n.columns_computed for n in pruned.nodes}
    assert reported == {"fc0": after["fc0"].M, "fc1": after["fc1"].M, "fc2": 10}
    assert [n.bytes_after for n in pruned.nodes][:2] < [n.bytes_after for n in unpruned.nodes][:2]
    X = digits_split[2]
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    expected = run(unpruned.model, X)[0]
    assert np.array_equal(run(pruned.model, X)[0], expected)
    assert np.array_equal(run(pruned.model, X, threads=2)[0], expected)
    # and the numpy reference of the narrowed model agrees with the kernel's
    assert np.array_equal(reference_evaluator(pruned.model).run(None, {"input": X})[0], expected)


def lut_node(params, name: str, x: str, y: str) -> onnx.NodeProto:
    attrs = lut_attributes(params)
    attrs["tables"] = numpy_helper.from_array(attrs["tables"], "tables")
    return helper.make_node(OP_TYPE, [x], [y], domain=DOMAIN, name=name, **attrs)


def chain_model(digits_split, digits_mlp, extra_output: str | None = None, second_reader: bool = False):
    """lookup(64 -> 48) -> Sigmoid -> lookup(48 -> 32), fitted on the digits, as a graph: the
    pass must see through the element-wise Sigmoid."""
    X = digits_split[0]
    (W0, b0), (W1, b1), _ = digits_mlp
    first = fit_node(X, W0, b0, None, 6).params
    hidden = 1 / (1 + np.exp(-apply_reference(X, first)))
    second = fit_node(hidden, W1, b1, "Relu", 3).params
    nodes = [lut_node(first, "first", "input", "pre"), helper.make_node("Sigmoid", ["pre"], ["hidden"], name="sig"),
             lut_node(second, "second", "hidden", "out")]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 32])]
    if second_reader:
        nodes.append(helper.make_node("Identity", ["hidden"], ["copy"], name="copy"))
        outputs.append(helper.make_tensor_value_info("copy", TensorProto.FLOAT, ["N", 48]))
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, ["N", 48]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              outputs, value_info=[helper.make_tensor_value_info("hidden", TensorProto.FLOAT,
                                                                                 ["N", 48])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    return model, second


def test_the_pass_sees_through_element_wise_ops(digits_split, digits_mlp, path, monkeypatch):
    model, second = chain_model(digits_split, digits_mlp)
    pruned, narrowed = prune_unread_columns(model)
    read = np.unique(second.split_dims)
    assert [(p.producer, p.consumer, p.columns_before, p.columns_after) for p in narrowed] == \
        [("first", "second", 48, len(read))]
    assert 0 < narrowed[0].scan_saved < 1
    assert lookups(pruned)["first"].M == len(read)
    shape = next(v for v in pruned.graph.value_info if v.name == "hidden").type.tensor_type.shape
    assert [d.dim_param or d.dim_value for d in shape.dim] == ["N", len(read)]  # its recorded width follows
    onnx.checker.check_model(pruned)
    X = digits_split[2]
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    assert np.array_equal(run(pruned, X)[0], run(model, X)[0])


@pytest.mark.parametrize("case", ["graph output", "second reader"])
def test_a_tensor_anything_else_reads_keeps_its_columns(digits_split, digits_mlp, case):
    model, _ = chain_model(digits_split, digits_mlp, extra_output="hidden" if case == "graph output" else None,
                           second_reader=case == "second reader")
    pruned, narrowed = prune_unread_columns(model)
    assert narrowed == []
    assert pruned.SerializeToString() == model.SerializeToString()


def test_diff_compares_a_narrowed_tensor_on_the_columns_it_holds(compiled_pair, digits_split, digits_mlp):
    """`diff` of the original against the pruned compile: each node's error is the one numpy
    gives on the columns its output_columns attribute names; against the unpruned compile,
    every tensor is identical on those columns."""
    from lutcompile.tools.diff import diff_models
    unpruned, pruned = compiled_pair
    original = mlp_model(digits_mlp)
    X = digits_split[2]
    d = diff_models(original, pruned.model, {"input": X})
    exact = reference_evaluator(original)
    names = {"fc0": "h0", "fc1": "h1", "fc2": "logits"}
    probe = onnx.ModelProto()
    probe.CopyFrom(pruned.model)
    probe.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in ("h0", "h1"))
    got = dict(zip(["logits", "h0", "h1"], run(probe, X)))
    want = dict(zip(["h0", "h1", "logits"], exact.run(["h0", "h1", "logits"], {"input": X})))
    for node in pruned.model.graph.node:
        columns = next((list(a.ints) for a in node.attribute if a.name == "output_columns"), None)
        tensor = names[node.name]
        x = want[tensor].astype(np.float64)
        x = x if columns is None else x[:, columns]
        y = got[tensor].astype(np.float64)
        assert (columns is None) == (node.name == "fc2")
        # diff runs the original in onnxruntime, this reference in numpy: their float32 exact
        # tensors differ by rounding (summation order), about 1e-9 of the error here
        assert d.node(node.name).relative_error == pytest.approx(np.linalg.norm(y - x) / np.linalg.norm(x), rel=1e-6)
    same = diff_models(unpruned.model, pruned.model, {"input": X})
    assert all(n.relative_error == 0.0 for n in same.nodes if n.relative_error is not None)
    assert [same.node(n).relative_error for n in names] == [0.0, 0.0, 0.0] and same.node("fc0").status == "changed"


def test_lutconv_channels_are_pruned_through_pooling_and_flatten(fast_cnn, path, monkeypatch):
    """The shipped CNN: LutConv -> MaxPool -> LutConv -> MaxPool -> Flatten -> LutMatMul ->
    LutMatMul. Each producer computes only the channels (or columns) its consumer's trees read,
    the consumer's split dimensions are renumbered within the blocks of the channels kept, and
    the logits stay the same bit for bit on every path and at two threads."""
    from lutcompile.ops.node_format import geometry_from_node
    result, out = fast_cnn
    pruned_model = onnx.load(str(out))
    unpruned, narrowed = prune_unread_columns(pruned_model)
    assert narrowed == []  # the pipeline already ran the pass: a second run finds nothing
    original = onnx.load(str(MODELS / "fashion_cnn.onnx"))
    X = np.load(MODELS / "fashion_test.npz")["input"][:300]
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    # recompile unpruned from the same fit: the pass is the only difference
    plain = lutcompile.compile_model(original, None, {"input": np.load(MODELS / "fashion_calib.npz")["input"][:128]},
                                     codebooks=8, finetune=False, table_loss="ridge", partition="contiguous",
                                     progress=False, prune_columns=False).model
    before, after = lookups(plain), lookups(pruned_model)
    nodes = {n.name: n for n in pruned_model.graph.node}
    pairs = {"/3/Conv": ("/6/Conv", 9), "/6/Conv": ("/10/Gemm", 9), "/10/Gemm": ("/12/Gemm", 1)}
    for producer, (consumer, block) in pairs.items():
        read = np.unique(before[consumer].split_dims // block)
        assert len(read) < before[producer].M, producer
        assert after[producer].M == len(read) and after[consumer].D == len(read) * block
        np.testing.assert_array_equal(after[producer].tables, before[producer].tables[read])
        columns = next(a.ints for a in nodes[producer].attribute if a.name == "output_columns")
        assert list(columns) == read.tolist()
        # the same input value reaches the same tree test: channel read[i] became channel i
        np.testing.assert_array_equal(read[after[consumer].split_dims // block] * block
                                      + after[consumer].split_dims % block, before[consumer].split_dims)
    assert geometry_from_node(nodes["/6/Conv"]).in_channels == after["/6/Conv"].D // 9
    expected = run(plain, X)[0]
    assert np.array_equal(run(pruned_model, X)[0], expected)
    assert np.array_equal(run(pruned_model, X, threads=2)[0], expected)
