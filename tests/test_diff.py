"""`lutcompile diff` and `lutcompile inspect` on the shipped model, against independent references:
node attributes and initializers read directly with onnx, tensors run directly in onnxruntime
and compared with numpy."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import lutcompile
from lutcompile.tools import cli
from lutcompile.tools.diff import diff_models
from lutcompile.tools.inspection import inspect_model
from lutcompile.ops.node_format import params_from_node

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/mnist_mlp.onnx"
CALIB = ROOT / "models/mnist_calib.npz"
# unpruned (compile/prune.py): these tests pin the widths and bytes of the products replaced;
# tests/test_prune.py holds diff and inspect to the narrowed nodes
FAST = dict(codebooks=4, partition="contiguous", table_loss="ridge", finetune=False, progress=False,
            prune_columns=False)
GEMMS = ["/0/Gemm", "/2/Gemm", "/4/Gemm", "/6/Gemm"]
RELUS = {"/1/Relu": "/0/Gemm", "/3/Relu": "/2/Gemm", "/5/Relu": "/4/Gemm"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "fast.onnx"
    return lutcompile.compile_model(MODEL, out, CALIB, **FAST), out


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """Only /2/Gemm replaced."""
    out = tmp_path_factory.mktemp("diff") / "partial.onnx"
    lutcompile.compile_model(MODEL, out, CALIB, nodes_to_include=["/2/Gemm"], **FAST)
    return out


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def raw_attributes(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def tensors(model_path, names, feeds, custom_ops):
    """The named tensors of a model, run directly in onnxruntime."""
    model = onnx.load(str(model_path))
    for name in names:
        if name not in {o.name for o in model.graph.output}:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    if custom_ops:
        so.register_custom_ops_library(lutcompile.library_path())
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(names, sess.run(names, feeds)))


def check_schema(value, schema, where="$"):
    """A small JSON-schema check: a type, a tuple of alternatives, {key: schema} (exact keys),
    or [schema] (a list of such items)."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        assert set(value) == set(schema), (where, set(value) ^ set(schema))
        for k, s in schema.items():
            check_schema(value[k], s, f"{where}.{k}")
    elif isinstance(schema, list):
        assert isinstance(value, list), where
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, tuple):
        errors = []
        for alternative in schema:
            try:
                check_schema(value, alternative, where)
                return
            except AssertionError as exc:
                errors.append(exc)
        raise AssertionError(f"{where}: {value!r} matches none of {schema}: {errors}")
    elif schema is None:
        assert value is None, where
    elif schema is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif schema is int:
        assert isinstance(value, int) and not isinstance(value, bool), where
    else:
        assert isinstance(value, schema), (where, value)


LUT = {"C": int, "relu": bool, "partition": (str, None), "table_loss": (str, None), "source_op": (str, None)}
COUNT = {"width": int, "multiplications": int, "additions": int, "exact_multiplications": int,
         "exact_additions": int, "wb_zeros": float, "wc_zeros": float, "activations": str}
SIDE = {"op_type": str, "domain": str, "inputs": [str], "outputs": [str], "D": (int, None), "M": (int, None),
        "param_bytes": int, "lut": (None, LUT), "spn": (None, COUNT), "multiplications": (int, None)}
DIFF_SCHEMA = {
    "schema": str, "model_a": (str, None), "model_b": (str, None), "identical": bool,
    "summary": {"nodes_a": int, "nodes_b": int, "replaced": int, "changed": int, "unchanged": int,
                "absorbed": int, "removed": int, "added": int, "param_bytes_a": int, "param_bytes_b": int,
                "graph_changes": [str]},
    "nodes": [{"name": str, "status": str, "changes": [str], "a": (None, SIDE), "b": (None, SIDE),
               "absorbed_into": (str, None), "absorbs": [str], "output": (str, None),
               "relative_error": (float, None)}],
    "calibration": (None, {"data": str, "rows": int, "labels": bool, "accuracy_a": (float, None),
                           "accuracy_b": (float, None)}),
}
INSPECT_SCHEMA = {
    "schema": str, "model": (str, None), "consistent": bool, "opset": dict,
    "lookup_nodes": [{"name": str, "op_type": str, "domain": str, "inputs": [str], "outputs": [str],
                      "D": (int, None), "M": (int, None), "C": (int, None), "K": (int, None),
                      "relu": (bool, None), "partition": (str, None), "table_loss": (str, None),
                      "source_op": (str, None), "scale": (float, None), "threshold_range": (None, [float]),
                      "split_dims_used": (int, None), "param_bytes": int,
                      "conv": (None, {"in_channels": (int, None), "kernel_shape": (None, [int]),
                                      "strides": (None, [int]), "pads": (None, [int]),
                                      "dilations": (None, [int])}),
                      "problems": [str]}],
    "spn_nodes": [{"name": str, "inputs": [str], "outputs": [str], "op_type": str, "D": (int, None), "M": (int, None),
                   "relu": (bool, None), "count": (None, COUNT), "param_bytes": int, "problems": [str]}],
    "exact_nodes": [{"name": str, "op_type": str}],
    "problems": [str],
}


# ---------------------------------------------------------------- diff

def test_diff_pairs_nodes_and_reports_each_lookup(compiled):
    result, out = compiled
    original, fast = onnx.load(str(MODEL)), onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    d = diff_models(MODEL, out)
    assert [n.name for n in d.nodes] == [n.name for n in original.graph.node]
    reports = {r.name: r for r in result.nodes}
    for node in fast.graph.node:
        n = d.node(node.name)
        a = raw_attributes(node)
        assert n.status == "replaced" and n.b.op_type == "LutMatMul" and n.b.domain == "ai.lutcompile"
        assert n.a.op_type == "Gemm" and n.a.domain == ""
        assert (n.b.D, n.b.M, n.b.lut["C"]) == (a["D"], a["M"], a["C"])
        assert n.b.lut["partition"] == a["partition"].decode() == "contiguous"
        assert n.b.lut["table_loss"] == a["table_loss"].decode() == reports[node.name].table_loss
        assert n.b.lut["source_op"] == a["source_op"].decode() == "Gemm"
        gemm = next(g for g in original.graph.node if g.name == node.name)
        weight = inits[gemm.input[1]]  # [M, D], transB=1
        assert (n.a.D, n.a.M) == (weight.shape[1], weight.shape[0]) == (reports[node.name].D, reports[node.name].M)
        assert n.a.param_bytes == weight.nbytes + inits[gemm.input[2]].nbytes == reports[node.name].bytes_before
        p = params_from_node(node)
        stored = p.tables.nbytes + p.split_dims.nbytes + p.thresholds.nbytes + p.offsets.nbytes + p.bias.nbytes
        assert n.b.param_bytes == stored == reports[node.name].bytes_after
        # the lookup node produces the tensor its absorbed Relu produced
        absorbed = [r for r, g in RELUS.items() if g == node.name]
        assert n.absorbs == absorbed
        if absorbed:
            relu = next(r for r in original.graph.node if r.name == absorbed[0])
            assert node.output[0] == relu.output[0]
    for relu, gemm in RELUS.items():
        assert d.node(relu).status == "absorbed" and d.node(relu).absorbed_into == gemm and d.node(relu).b is None
    assert (d.count("replaced"), d.count("absorbed"), d.count("unchanged")) == (4, 3, 0)
    assert d.param_bytes_a == sum(v.nbytes for v in inits.values())
    assert d.param_bytes_b == sum(r.bytes_after for r in result.nodes)
    assert not d.identical and "opset ai.lutcompile v1 added" in d.graph_changes


def test_diff_relative_error_and_accuracy_match_onnxruntime_and_numpy(compiled):
    result, out = compiled
    d = diff_models(MODEL, out, CALIB, batch_size=300)  # batches that do not divide the rows
    calib = np.load(CALIB)
    names = [n.b.outputs[0] for n in d.nodes if n.status == "replaced"]
    assert names == ["/1/Relu_output_0", "/3/Relu_output_0", "/5/Relu_output_0", "logits"]
    a = tensors(MODEL, names, {"input": calib["input"]}, custom_ops=False)
    b = tensors(out, names, {"input": calib["input"]}, custom_ops=True)
    for name, tensor in zip(GEMMS, names):
        x, y = a[tensor].astype(np.float64), b[tensor].astype(np.float64)
        want = np.linalg.norm(y - x) / np.linalg.norm(x)
        assert d.node(name).output == tensor
        assert d.node(name).relative_error == pytest.approx(want, rel=1e-9)
    # the first node sees the same input in both models: its error is the one the fit reported
    assert d.node("/0/Gemm").relative_error == pytest.approx(result.nodes[0].relative_error, rel=1e-5)
    labels = calib["labels"]
    assert d.calibration["rows"] == len(labels) and d.calibration["labels"] is True
    assert d.calibration["accuracy_a"] == np.mean(a["logits"].argmax(1) == labels)
    assert d.calibration["accuracy_b"] == np.mean(b["logits"].argmax(1) == labels) == result.accuracy_after
    assert all(d.node(r).relative_error is None for r in RELUS)


def test_diff_of_a_partial_compile_shows_where_error_starts(partial):
    d = diff_models(MODEL, partial, CALIB)
    status = {n.name: n.status for n in d.nodes}
    assert status == {"/0/Gemm": "unchanged", "/1/Relu": "unchanged", "/2/Gemm": "replaced",
                      "/3/Relu": "absorbed", "/4/Gemm": "unchanged", "/5/Relu": "unchanged",
                      "/6/Gemm": "unchanged"}
    assert d.node("/0/Gemm").relative_error == 0.0 and d.node("/1/Relu").relative_error == 0.0
    assert d.node("/2/Gemm").relative_error > 0
    # unchanged nodes after the lookup carry its error forward
    assert d.node("/4/Gemm").relative_error > 0 and d.node("/6/Gemm").relative_error > 0
    assert d.node("/0/Gemm").a.param_bytes == d.node("/0/Gemm").b.param_bytes == (784 * 200 + 200) * 4


def test_diff_between_two_compiled_models(partial, compiled):
    _, full = compiled
    d = diff_models(partial, full)
    status = {n.name: n.status for n in d.nodes}
    # one-shot fitting sees the original activations: /2/Gemm's lookup is the same in both
    assert status == {"/0/Gemm": "replaced", "/1/Relu": "absorbed", "/2/Gemm": "unchanged",
                      "/4/Gemm": "replaced", "/5/Relu": "absorbed", "/6/Gemm": "replaced"}
    assert d.node("/2/Gemm").a.lut == d.node("/2/Gemm").b.lut == {
        "C": 4, "relu": True, "partition": "contiguous", "table_loss": "ridge", "source_op": "Gemm"}
    assert d.node("/1/Relu").absorbed_into == "/0/Gemm"


def test_diff_follows_helper_transposes_of_a_constant_left_product():
    """MatMul(W, x) compiles to Transpose -> LutMatMul -> Transpose; the lookup is compared on
    the tensor its result reaches, and the Transposes show as added."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((6, 16)).astype(np.float32)  # y [6, N] = W [6, 16] @ x [16, N]
    x = (rng.integers(0, 2, (16, 256)) * 0.75 + 0.25).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["W", "x"], ["y"], name="left")], "left",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 256])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [6, 256])],
                              [numpy_helper.from_array(W, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fast = lutcompile.compile_model(model, None, {"x": x}, **FAST).model
    ops = [n.op_type for n in fast.graph.node]
    assert ops == ["Transpose", "LutMatMul", "Transpose"], (
        f"the compiler no longer turns MatMul(W, x) into Transpose -> LutMatMul -> Transpose (it gave {ops}); "
        "this test checks that diff follows the helper Transposes, so give it a model that still has them")
    d = diff_models(model, fast, {"x": x})
    left = d.node("left")
    assert left.status == "replaced" and (left.a.D, left.a.M) == (left.b.D, left.b.M) == (16, 6)
    assert left.output == "y" and left.b.outputs != ["y"]
    assert [n.status for n in d.nodes[1:]] == ["added", "added"]
    assert {n.b.op_type for n in d.nodes[1:]} == {"Transpose"}
    sess = ort.InferenceSession(fast.SerializeToString(), lutcompile.session_options(),
                                providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0].astype(np.float64)
    want = W.astype(np.float64) @ x
    assert left.relative_error == pytest.approx(np.linalg.norm(got - want) / np.linalg.norm(want), rel=1e-4)


def test_diff_changed_removed_and_added_nodes(tmp_path):
    model = onnx.load(str(MODEL))
    for t in model.graph.initializer:
        if t.name in ("4.weight", "4.bias"):  # /4/Gemm now outputs exactly twice its output
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
    next(n for n in model.graph.node if n.name == "/5/Relu").name = "renamed_relu"
    path = tmp_path / "b.onnx"
    onnx.save(model, str(path))
    d = diff_models(MODEL, path, CALIB)
    assert d.node("/4/Gemm").status == "changed" and d.node("/4/Gemm").changes == ["parameters: 4.weight, 4.bias"]
    assert d.node("/5/Relu").status == "removed" and d.node("renamed_relu").status == "added"
    assert d.node("/2/Gemm").status == "unchanged" and d.node("/2/Gemm").relative_error == 0.0
    assert d.node("/4/Gemm").relative_error == pytest.approx(1.0, rel=1e-6)  # ||2y - y|| / ||y||
    assert d.nodes[-1].name == "renamed_relu" and not d.identical


def test_diff_cli_table_summary_and_exit_status(capsys, compiled):
    _, out = compiled
    code, text, err = run_cli(capsys, "diff", MODEL, out, "--calib", CALIB)
    assert code == 0, err
    lines = text.splitlines()
    assert lines[0].split() == ["node", "status", "op", "(a", "->", "b)", "D", "x", "M", "C", "partition",
                                "tables", "mults/row", "(a", "->", "b)", "bytes", "(a", "->", "b)", "rel.err"]
    row = next(l for l in lines if l.startswith("/0/Gemm"))
    assert row.split()[:8] == ["/0/Gemm", "replaced", "Gemm", "->", "ai.lutcompile:LutMatMul", "784", "x", "200"]
    # multiplications per row: the exact product's D x M, the lookup's M (its table scale)
    assert "156,800 -> 200" in row and "628,000 -> 13,920" in row
    assert next(l for l in lines if l.startswith("/1/Relu")).split()[:5] == \
        ["/1/Relu", "absorbed", "Relu", "->", "(into"]
    assert ("4 replaced, 0 changed, 0 unchanged, 3 absorbed, 0 removed, 0 added; 7 -> 4 nodes; "
            "parameters 957,640 -> 42,760 bytes (22.4x smaller)") in lines
    assert lines[-1].startswith("accuracy on 2000 rows: A 99.95%, B ")
    assert run_cli(capsys, "diff", MODEL, out, "--exit-code")[0] == cli.EXIT_DIFFERENT == 1
    code, text, _ = run_cli(capsys, "diff", MODEL, MODEL, "--exit-code")
    assert code == 0 and text.splitlines()[-1] == "identical: 7 node(s) unchanged, 957,640 parameter bytes"


def test_diff_json_schema(capsys, compiled):
    _, out = compiled
    code, text, err = run_cli(capsys, "diff", MODEL, out, "--calib", CALIB, "--json")
    assert code == 0, err
    data = json.loads(text)
    check_schema(data, DIFF_SCHEMA)
    assert data["schema"] == "lutcompile.diff/1"
    assert {n["status"] for n in data["nodes"]} == {"replaced", "absorbed"}
    assert data["summary"]["replaced"] == 4 and data["summary"]["absorbed"] == 3
    assert data["calibration"]["rows"] == 2000
    assert data == json.loads(json.dumps(diff_models(MODEL, out, CALIB).to_json()))
    code, text, _ = run_cli(capsys, "diff", MODEL, MODEL, "--json")
    same = json.loads(text)
    check_schema(same, DIFF_SCHEMA)
    assert same["identical"] is True and same["calibration"] is None


def _constant_model(value: onnx.TensorProto) -> onnx.ModelProto:
    """y = x + c, c from a Constant node."""
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], name="const", value=value),
         helper.make_node("Add", ["x", "c"], ["y"], name="add")], "constant",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_diff_compares_tensor_attributes_by_value_not_by_bytes():
    c = np.array([[1.0, np.nan, -2.5]], np.float32)
    a = _constant_model(numpy_helper.from_array(c))
    assert not a.graph.node[0].attribute[0].t.HasField("name")
    named = onnx.ModelProto()
    named.CopyFrom(a)
    named.graph.node[0].attribute[0].t.name = ""  # as onnx-graphsurgeon writes it
    typed = _constant_model(helper.make_tensor("", onnx.TensorProto.FLOAT, [1, 3], c.reshape(-1).tolist()))
    for same in (named, typed):  # the same values, serialised differently
        assert (same.graph.node[0].attribute[0].SerializeToString()
                != a.graph.node[0].attribute[0].SerializeToString())
        d = diff_models(a, same)
        assert [(n.name, n.status, n.changes) for n in d.nodes] == [("const", "unchanged", []),
                                                                    ("add", "unchanged", [])]
        assert d.identical
    other = _constant_model(numpy_helper.from_array(c * 2))
    d = diff_models(a, other)
    assert d.node("const").status == "changed" and d.node("const").changes == ["attributes: value"]
    assert d.node("add").status == "changed" and d.node("add").changes == ["parameters: c"]
    for changed in (c.astype(np.float64), c.reshape(3), np.array([[1.0, 0.0, -2.5]], np.float32)):
        d = diff_models(a, _constant_model(numpy_helper.from_array(changed)))  # dtype, shape, the NaN
        assert d.node("const").changes == ["attributes: value"], changed


def _gemm_model(**attrs) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", **attrs)], "gemm",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_diff_compares_other_attributes_by_type_and_value():
    nan = _gemm_model(alpha=float("nan"), transB=1)
    assert diff_models(nan, _gemm_model(alpha=float("nan"), transB=1)).identical  # NaN equals NaN
    for other in (_gemm_model(alpha=0.5, transB=1), _gemm_model(transB=1)):
        assert diff_models(nan, other).node("gemm").changes == ["attributes: alpha"]
    one = _gemm_model(alpha=1.0)
    assert diff_models(one, _gemm_model(alpha=1)).node("gemm").changes == ["attributes: alpha"]  # FLOAT vs INT
    assert diff_models(one, _gemm_model(alpha=1.0, transB=0)).node("gemm").changes == ["attributes: transB"]


def test_inspect_summarises_a_long_list_of_exact_products(capsys, tmp_path):
    """A transformer leaves dozens of MatMuls exact: the text names a few, --json all."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    names = [f"/model/layers.{i}/self_attn/{p}_proj/MatMul" for i in range(20) for p in ("q", "k", "v")]
    for i, name in enumerate(names):
        inits.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"t{i}"], name=name))
        x = f"t{i}"
    nodes.append(helper.make_node("Gemm", [x, "w0"], ["y"], name="/lm_head/Gemm"))
    graph = helper.make_graph(nodes, "long", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "long.onnx"
    onnx.save(model, str(path))
    code, text, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    line = next(l for l in text.splitlines() if l.startswith("exact MatMul/Gemm/Conv left:"))
    assert line == (f"exact MatMul/Gemm/Conv left: 61 (60 MatMul, 1 Gemm): {names[0]} (MatMul), "
                    f"{names[1]} (MatMul), {names[2]} (MatMul) and 58 more (--json lists them all)")
    code, text, _ = run_cli(capsys, "inspect", path, "--json")
    data = json.loads(text)
    assert data["exact_nodes"] == [{"name": n, "op_type": "MatMul"} for n in names] + [
        {"name": "/lm_head/Gemm", "op_type": "Gemm"}]


@pytest.mark.parametrize("make_args,code,message", [
    (lambda t, out: ["diff", t / "missing.onnx", out], cli.EXIT_MODEL, "not found"),
    (lambda t, out: ["diff", MODEL, CALIB], cli.EXIT_MODEL, "not an ONNX model"),
    (lambda t, out: ["diff", MODEL, out, "--calib", t / "none.npz"], cli.EXIT_DATA, "not found"),
    (lambda t, out: ["diff", MODEL, out, "--calib", t / "bad.npz"], cli.EXIT_DATA, "dimension 1 must be 784"),
    (lambda t, out: ["diff", MODEL, out, "--batch-size", "0"], cli.EXIT_USAGE, "--batch-size"),
    (lambda t, out: ["inspect", t / "missing.onnx"], cli.EXIT_MODEL, "not found"),
])
@pytest.mark.bad_input
def test_diff_and_inspect_errors_are_one_line_with_distinct_status(capsys, tmp_path, compiled, make_args, code,
                                                                    message):
    np.savez(tmp_path / "bad.npz", input=np.zeros((10, 5), np.float32))
    got, out, err = run_cli(capsys, *make_args(tmp_path, compiled[1]))
    assert got == code, err
    assert err.strip().startswith("lutcompile: error:") and len(err.strip().splitlines()) == 1
    assert message in err and out == ""


def test_a_model_file_named_diff_is_compiled_not_diffed(capsys, tmp_path, monkeypatch):
    shutil.copy(MODEL, tmp_path / "diff")
    monkeypatch.chdir(tmp_path)
    code, text, err = run_cli(capsys, "diff", "--calib", CALIB, "-o", "out.onnx", "-C", "2", "--partition",
                              "contiguous", "--table-loss", "ridge", "--no-finetune", "-q")
    assert code == 0, err
    assert text.splitlines()[0].split()[:2] == ["node", "op"] and (tmp_path / "out.onnx").exists()


# ---------------------------------------------------------------- inspect

def test_inspect_lists_lookup_nodes_with_their_configuration(capsys, compiled):
    _, out = compiled
    code, text, err = run_cli(capsys, "inspect", out, "--json")
    assert code == 0, err
    data = json.loads(text)
    check_schema(data, INSPECT_SCHEMA)
    assert data["schema"] == "lutcompile.inspect/1" and data["consistent"] is True and data["problems"] == []
    assert data["opset"] == {"": 17, "ai.lutcompile": 1} and data["exact_nodes"] == []
    fast = onnx.load(str(out))
    assert [n["name"] for n in data["lookup_nodes"]] == [n.name for n in fast.graph.node] == GEMMS
    for info, node in zip(data["lookup_nodes"], fast.graph.node):
        a, p = raw_attributes(node), params_from_node(node)
        assert (info["D"], info["M"], info["C"], info["K"]) == (a["D"], a["M"], a["C"], 16) == (p.D, p.M, p.C, 16)
        assert info["relu"] == bool(a["relu"]) == (node.name != "/6/Gemm")
        assert info["scale"] == pytest.approx(a["scale"]) and info["scale"] == p.scale
        assert info["threshold_range"] == [float(p.thresholds.min()), float(p.thresholds.max())]
        assert info["split_dims_used"] == len(np.unique(p.split_dims))
        assert info["inputs"] == list(node.input) and info["outputs"] == list(node.output)
        assert info["partition"] == "contiguous" and info["source_op"] == "Gemm"
        assert info["op_type"] == "LutMatMul" and info["conv"] is None
        assert info["param_bytes"] == (p.tables.nbytes + p.split_dims.nbytes + p.thresholds.nbytes
                                       + p.offsets.nbytes + p.bias.nbytes)
    code, text, _ = run_cli(capsys, "inspect", out)
    lines = text.splitlines()
    assert lines[0].split() == ["node", "D", "x", "M", "C", "relu", "partition", "tables", "source", "scale",
                                "thresholds", "bytes", "status"]
    assert all(l.split()[-1] == "ok" for l in lines[1:5])
    assert lines[-1] == "4 lookup node(s), 41.8 KiB of lookup parameters; tables consistent"


def test_inspect_of_partial_and_uncompiled_models(capsys, partial):
    data = inspect_model(partial).to_json()
    assert [n["name"] for n in data["lookup_nodes"]] == ["/2/Gemm"]
    assert data["exact_nodes"] == [{"name": n, "op_type": "Gemm"} for n in ("/0/Gemm", "/4/Gemm", "/6/Gemm")]
    code, text, _ = run_cli(capsys, "inspect", partial)
    assert "exact MatMul/Gemm/Conv left: /0/Gemm (Gemm), /4/Gemm (Gemm), /6/Gemm (Gemm)" in text.splitlines()
    code, text, _ = run_cli(capsys, "inspect", MODEL)
    assert code == 0 and text.splitlines()[0].startswith("no LutMatMul, LutConv or SpnMatMul nodes")


def _corrupt(node, name, value):
    for i, a in enumerate(node.attribute):
        if a.name == name:
            if value is None:
                del node.attribute[i]
            else:
                node.attribute[i].CopyFrom(helper.make_attribute(name, value))
            return


def _nan_threshold(n):
    t = list(raw_attributes(n)["thresholds"])
    t[3] = float("nan")
    _corrupt(n, "thresholds", t)


def _split_dim_out_of_range(n):
    s = list(raw_attributes(n)["split_dims"])
    s[5] = raw_attributes(n)["D"]
    _corrupt(n, "split_dims", s)


def _tables_wrong_shape(n):
    tables = numpy_helper.to_array(raw_attributes(n)["tables"])
    _corrupt(n, "tables", numpy_helper.from_array(np.ascontiguousarray(tables[:, :, :8]), "tables"))


@pytest.mark.parametrize("corrupt,message", [
    (_nan_threshold, "1 threshold(s) are not finite"),
    (_split_dim_out_of_range, "1 split dimension(s) outside [0, 200)"),
    (lambda n: _corrupt(n, "scale", -0.5), "scale must be finite and > 0, got -0.5"),
    (lambda n: _corrupt(n, "scale", float("inf")), "scale must be finite and > 0, got inf"),
    (_tables_wrong_shape, "tables have shape [200, 4, 8], expected [M, C, 16] = [200, 4, 16]"),
    (lambda n: _corrupt(n, "bias", None), "missing attribute(s) bias"),
    (lambda n: _corrupt(n, "K", 8), "K is 8, expected 16"),
    (lambda n: _corrupt(n, "M", 100), "tables have shape [200, 4, 16], expected [M, C, 16] = [100, 4, 16]"),
    (lambda n: _corrupt(n, "offsets", [0.0, float("inf"), 0.0, 0.0]), "1 offsets value(s) are not finite"),
])
@pytest.mark.bad_input
def test_inspect_rejects_inconsistent_tables(capsys, tmp_path, compiled, corrupt, message):
    model = onnx.load(str(compiled[1]))
    node = next(n for n in model.graph.node if n.name == "/2/Gemm")
    corrupt(node)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    code, text, err = run_cli(capsys, "inspect", path)
    assert code == cli.EXIT_INCONSISTENT == 6
    problems = err.strip().splitlines()
    assert any(p.startswith(f"lutcompile: error: {path}: /2/Gemm: {message}") for p in problems), problems
    assert all(p.startswith(f"lutcompile: error: {path}: /2/Gemm: ") for p in problems)
    rows = {l.split()[0]: l.split()[-1] for l in text.splitlines()[1:5]}
    assert rows == {"/0/Gemm": "ok", "/2/Gemm": "INCONSISTENT", "/4/Gemm": "ok", "/6/Gemm": "ok"}
    code, text, _ = run_cli(capsys, "inspect", path, "--json")
    data = json.loads(text)
    check_schema(data, INSPECT_SCHEMA)
    assert code == 6 and data["consistent"] is False
    assert any(p.startswith(f"/2/Gemm: {message}") for p in data["problems"])


@pytest.mark.bad_input
def test_inspect_requires_the_opset_import(capsys, tmp_path, compiled):
    model = onnx.load(str(compiled[1]))
    keep = [o for o in model.opset_import if o.domain != "ai.lutcompile"]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    result = inspect_model(model)  # a ModelProto is inspected as is
    assert result.problems == ["the model has LutMatMul nodes but does not import the 'ai.lutcompile' opset"]
    path = tmp_path / "noopset.onnx"
    onnx.save(model, str(path))
    code, _, err = run_cli(capsys, "inspect", path)  # a file must pass onnx.checker first
    assert code == cli.EXIT_MODEL and "fails onnx.checker: No opset import for domain 'ai.lutcompile'" in err
