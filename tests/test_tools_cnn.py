"""`lutcompile inspect` and `lutcompile diff` on the shipped CNN (LutConv and LutMatMul nodes),
against figures read straight from the ONNX graphs: the original Conv weights, the compiled
nodes' attribute arrays, the initializers the exact nodes read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lutcompile
from lutcompile.tools import cli
from lutcompile.tools.diff import diff_models, format_diff
from lutcompile.tools.inspection import format_inspection, inspect_model

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models/fashion_cnn.onnx"
DOMAIN = "ai.lutcompile"
CONV_DEFAULTS = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]}


@pytest.fixture(scope="module")
def cnn(fast_cnn):
    """The shipped CNN compiled once (conftest.fast_cnn): (compile result, path of the compiled model)."""
    return fast_cnn


def raw(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def lookup_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The lookup nodes, found by scanning the graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in ("LutMatMul", "LutConv")]


def written_shape(node: onnx.NodeProto, model: onnx.ModelProto, original: tuple[int, int]) -> tuple[int, int]:
    """(D, M) a lookup node holds in the written model, from the product's `original` (D, M):
    the column-pruning pass (compile/prune.py) narrows a lookup feeding another to the features
    (columns, or a LutConv's channels) that one reads, listed in the producer's output_columns
    attribute; the consumer keeps, of each feature's block of inputs, the blocks of those kept."""
    D, M = original
    columns = raw(node).get("output_columns")
    producer = next((n for n in model.graph.node if node.input[0] in n.output), None)
    while producer is not None and producer.domain != DOMAIN and len(producer.input) == 1:  # a pool, a Flatten
        producer = next((n for n in model.graph.node if producer.input[0] in n.output), None)
    read = None if producer is None else raw(producer).get("output_columns")
    if read is not None:
        D = D // original_shapes()[producer.name][1] * len(read)
    return D, (M if columns is None else len(columns))


def original_shapes() -> dict[str, tuple[int, int]]:
    """Each product's (D, M) in the original model, by node name."""
    nodes, inits = original()
    shapes = {}
    for n in nodes.values():
        if n.op_type in ("Conv", "Gemm"):
            w = inits[n.input[1]]
            shapes[n.name] = (int(np.prod(w.shape[1:])), int(w.shape[0]))  # Conv [M, Cin, kh, kw], Gemm [M, D]
    return shapes


def stored_bytes(node: onnx.NodeProto) -> int:
    """uint8 tables, int32 split dims, float32 thresholds, offsets and bias, from the attributes."""
    a = raw(node)
    tables = numpy_helper.to_array(a["tables"])
    assert tables.dtype == np.uint8
    return tables.size + 4 * (len(a["split_dims"]) + len(a["thresholds"]) + len(a["offsets"]) + len(a["bias"]))


def total_bytes(model: onnx.ModelProto) -> int:
    """Every lookup node's stored bytes plus each initializer another node reads, once."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    lookups = lookup_nodes(model)
    read = {t for n in model.graph.node if n not in lookups for t in n.input if t in inits}
    return sum(map(stored_bytes, lookups)) + sum(inits[t].nbytes for t in read)


def original() -> tuple[dict[str, onnx.NodeProto], dict[str, np.ndarray]]:
    model = onnx.load(str(MODEL))
    return {n.name: n for n in model.graph.node}, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def conv_geometry(node: onnx.NodeProto, weight: np.ndarray) -> dict:
    """An ONNX Conv's geometry as LutConv spells it."""
    a = {**CONV_DEFAULTS, **raw(node)}
    return {"in_channels": int(weight.shape[1]), "kernel_shape": list(weight.shape[2:]),
            "strides": list(a["strides"]), "pads": list(a["pads"]), "dilations": list(a["dilations"])}


def pool_after(nodes: dict[str, onnx.NodeProto], conv: onnx.NodeProto) -> list[int]:
    """[window h, w, stride h, w] of the MaxPool the original model runs on the Relu of `conv`'s output."""
    readers = {i: n for n in nodes.values() for i in n.input}
    relu = readers[conv.output[0]]
    pool = readers[relu.output[0]]
    assert (relu.op_type, pool.op_type) == ("Relu", "MaxPool")
    a = raw(pool)
    return list(a["kernel_shape"]) + list(a["strides"])


def run_module(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lutcompile", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_the_compiled_cnn_has_both_lookup_kinds(cnn):
    """What the other tests rely on: if the compiler changes, this says so first."""
    _, out = cnn
    kinds = [n.op_type for n in lookup_nodes(onnx.load(str(out)))]
    assert "LutConv" in kinds and "LutMatMul" in kinds, (
        f"the compiled CNN has lookup nodes {kinds}; these tests need LutConv and LutMatMul nodes")


# ---------------------------------------------------------------- inspect

def test_inspect_lists_every_lookup_node_with_dims_bytes_and_geometry(cnn):
    _, out = cnn
    proc = run_module("inspect", out, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data == inspect_model(out).to_json()  # the command line prints what the function returns
    assert data["schema"] == "lutcompile.inspect/1" and data["consistent"] is True and data["problems"] == []
    fast = onnx.load(str(out))
    found = lookup_nodes(fast)
    assert [(n["name"], n["op_type"]) for n in data["lookup_nodes"]] == [(n.name, n.op_type) for n in found]
    nodes, inits = original()
    for info, node in zip(data["lookup_nodes"], found):
        a = raw(node)
        assert info["param_bytes"] == stored_bytes(node) > 0
        assert (info["D"], info["M"], info["C"]) == (a["D"], a["M"], a["C"])
        assert info["inputs"] == list(node.input) and info["outputs"] == list(node.output)
        source = nodes[node.name]
        weight = inits[source.input[1]]
        if node.op_type == "LutConv":
            assert source.op_type == "Conv" and info["source_op"] == "Conv"
            cout, cin, kh, kw = weight.shape
            assert (info["D"], info["M"]) == written_shape(node, fast, (cin * kh * kw, cout))
            # a LutConv fed by a narrowed one reads fewer channels (compile/prune.py); each of the
            # shipped CNN's lookup convolutions writes the 2x2 max-pool after its Relu (compile/fuse.py)
            assert info["conv"] == {**conv_geometry(source, weight), "in_channels": info["D"] // (kh * kw),
                                    "max_pool": pool_after(nodes, source)}
            assert info["conv"] == {k: a[k] if k == "in_channels" else list(a[k]) for k in info["conv"]}
        else:
            assert source.op_type == "Gemm" and info["conv"] is None
            assert (info["D"], info["M"]) == written_shape(node, fast, weight.shape[::-1])  # transB = 1
    # the first Gemm feeds the second, whose trees read fewer than its 128 columns
    assert raw(found[-2]).get("output_columns") and info["M"] == 10
    # the products left exact: every Conv / Gemm / MatMul of the original without a lookup namesake
    left = [{"name": n.name, "op_type": n.op_type} for n in nodes.values()
            if n.op_type in ("Conv", "Gemm", "MatMul") and n.name not in {f.name for f in found}]
    assert data["exact_nodes"] == left and left  # the first Conv's 9-wide patches stay exact


def test_inspect_table_shows_the_conv_geometry(capsys, cnn):
    _, out = cnn
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == format_inspection(inspect_model(out)) + "\n"
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["node", "D", "x", "M", "conv"]
    fast = onnx.load(str(out))
    nodes, inits = original()
    for node in lookup_nodes(fast):
        row = next(l.split() for l in lines[1:] if l.split()[0] == node.name)
        assert row[-1] == "ok"
        if node.op_type == "LutConv":
            cout, cin, kh, kw = inits[nodes[node.name].input[1]].shape
            D, M = written_shape(node, fast, (cin * kh * kw, cout))
            assert row[1:8] == [str(D), "x", str(M), f"{D // (kh * kw)}ch", f"{kh}x{kw}", "s1", "p1"]
        else:
            assert row[4] == "-"
    assert any(l.startswith("exact MatMul/Gemm/Conv left: /0/Conv (Conv)") for l in lines)
    assert lines[-1].endswith("tables consistent")


def _set(node: onnx.NodeProto, name: str, value) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


def _set_value_info(model: onnx.ModelProto, tensor: str, shape: list[int]) -> None:
    for vi in list(model.graph.value_info) + list(model.graph.output):
        if vi.name == tensor:
            vi.type.tensor_type.ClearField("shape")
            for d in shape:
                vi.type.tensor_type.shape.dim.add().dim_value = d
            return
    model.graph.value_info.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, shape))


@pytest.mark.parametrize("corrupt,messages", [
    (lambda m, n: _set(n, "in_channels", 15),
     ["in_channels * kh * kw = 15 * 3 * 3 = 135, but D = 144", "has 16 channels, but in_channels = 15"]),
    (lambda m, n: _set(n, "strides", [0, 1]), ["strides [0, 1] must be positive and at most 4096"]),
    (lambda m, n: _set(n, "dilations", [1, -2]), ["dilations [1, -2] must be positive and at most 4096"]),
    (lambda m, n: _set(n, "pads", [1, -1, 1, 1]), ["pads [1, -1, 1, 1] must be non-negative and at most 65536"]),
    (lambda m, n: _set(n, "kernel_shape", [3, 3, 3]), ["kernel_shape must be 2 integers, got [3, 3, 3]"]),
    (lambda m, n: _set(n, "dilations", None), ["missing attribute(s) dilations"]),
    (lambda m, n: _set(n, "thresholds", [float("nan")] + list(raw(n)["thresholds"])[1:]),
     ["1 threshold(s) are not finite"]),  # the LutMatMul checks hold for a LutConv too
    (lambda m, n: _set(n, "M", raw(n)["M"] + 2),  # the messages name the node's own M (narrowed or not)
     lambda M: [f"tables have shape [{M}, 8, 16], expected [M, C, 16] = [{M + 2}, 8, 16]",
                f"has {M} channels, but M = {M + 2}"]),
    # the output of the last LutConv, which no other lookup reads (the first one's output is the
    # second one's input, whose checks would flag it too); 7 x 7 input, max-pooled 2 x 2 (compile/fuse.py)
    (lambda m, n: _set_value_info(m, n.output[0], [1, 64, 9]), ["has rank 3, expected 4 (NCHW)"]),
    (lambda m, n: _set_value_info(m, n.output[0], [1, 64, 7, 7]),
     ["is 7 x 7, but the convolution and max_pool of a 7 x 7 input gives 3 x 3"]),
    (lambda m, n: _set(n, "max_pool", [2, 0, 2, 2]),
     ["max_pool must be 4 integers from 1 to 4096 (window h, w, stride h, w), got [2, 0, 2, 2]"]),
], ids=["in_channels", "strides", "dilations", "pads", "kernel_shape", "missing", "thresholds", "M",
        "output_rank", "output_size", "max_pool"])
@pytest.mark.bad_input
def test_inspect_rejects_an_inconsistent_lutconv(capsys, tmp_path, cnn, corrupt, messages, request):
    model = onnx.load(str(cnn[1]))
    convs = [n for n in lookup_nodes(model) if n.op_type == "LutConv"]
    node = convs[-1] if request.node.callspec.id.startswith("output") else convs[0]
    messages = messages(raw(node)["M"]) if callable(messages) else messages
    corrupt(model, node)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    code = cli.main(["inspect", str(path)])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_INCONSISTENT == 6
    problems = err.strip().splitlines()
    assert all(p.startswith(f"lutcompile: error: {path}: {node.name}: ") for p in problems), problems
    for message in messages:
        assert any(message in p for p in problems), (message, problems)
    row = next(l.split() for l in out.splitlines() if l.startswith(node.name + " "))
    assert row[-1] == "INCONSISTENT"
    data = inspect_model(path).to_json()
    assert data["consistent"] is False
    bad = next(n for n in data["lookup_nodes"] if n["name"] == node.name)
    assert all(any(m in p for p in bad["problems"]) for m in messages)
    assert all(not n["problems"] for n in data["lookup_nodes"] if n["name"] != node.name)


@pytest.mark.bad_input
def test_inspect_exit_status_6_from_the_command_line(tmp_path, cnn):
    model = onnx.load(str(cnn[1]))
    node = next(n for n in lookup_nodes(model) if n.op_type == "LutConv")
    _set(node, "in_channels", 15)
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    proc = run_module("inspect", path, "--json")
    assert proc.returncode == 6, proc.stderr
    assert f"{node.name}: in_channels * kh * kw = 15 * 3 * 3 = 135, but D = 144" in proc.stderr
    assert json.loads(proc.stdout)["consistent"] is False


# ---------------------------------------------------------------- diff

def test_diff_pairs_lutconv_with_its_conv_and_absorbs_the_relu(cnn):
    result, out = cnn
    fast = onnx.load(str(out))
    proc = run_module("diff", MODEL, out, "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data == json.loads(json.dumps(diff_models(MODEL, out).to_json()))
    by_name = {n["name"]: n for n in data["nodes"]}
    nodes, inits = original()
    found = lookup_nodes(fast)
    assert [n["status"] for n in data["nodes"]].count("removed") == 0
    for node in found:
        d, source = by_name[node.name], nodes[node.name]
        assert d["status"] == "replaced" and d["changes"][:2] == ["op_type", "domain"]
        assert (d["a"]["op_type"], d["b"]["op_type"], d["b"]["domain"]) == (source.op_type, node.op_type, DOMAIN)
        assert d["b"]["param_bytes"] == stored_bytes(node) > 0
        assert d["a"]["param_bytes"] == sum(inits[t].nbytes for t in source.input[1:])
        weight = inits[source.input[1]]
        want = (int(np.prod(weight.shape[1:])), weight.shape[0])  # Conv [M, Cin, kh, kw], Gemm [M, D]
        assert (d["a"]["D"], d["a"]["M"]) == want and (d["b"]["D"], d["b"]["M"]) == written_shape(node, fast, want)
        assert d["b"]["lut"]["relu"] == bool(raw(node)["relu"])
        # the fused Relu: the original's sole consumer of the product, producing the lookup's
        # output, or with a fused MaxPool (a LutConv, compile/fuse.py) that pool's input
        consumers = [n for n in nodes.values() if source.output[0] in n.input]
        pooled = "max_pool" in raw(node)
        if raw(node)["relu"]:
            assert len(consumers) == 1 and consumers[0].op_type == "Relu"
            relu = consumers[0]
            absorbed = [relu.name]
            if pooled:
                pool = next(n for n in nodes.values() if relu.output[0] in n.input)
                assert pool.op_type == "MaxPool" and by_name[pool.name]["absorbed_into"] == node.name
                absorbed.append(pool.name)
            assert nodes[absorbed[-1]].output[0] == node.output[0]
            assert not set(absorbed) & {n.name for n in fast.graph.node}
            assert all(by_name[a]["status"] == "absorbed" for a in absorbed)
            assert by_name[relu.name]["absorbed_into"] == node.name and d["absorbs"] == absorbed
        else:
            assert d["absorbs"] == [] and not pooled
    convs = [n for n in found if n.op_type == "LutConv"]
    assert convs and all(raw(n)["relu"] for n in convs)  # each Conv of the CNN is followed by a Relu
    summary = data["summary"]
    assert summary["param_bytes_a"] == sum(v.nbytes for v in inits.values())
    assert summary["param_bytes_b"] == total_bytes(fast)
    assert summary["param_bytes_b"] == sum(r.bytes_after for r in result.nodes) + sum(
        v.nbytes for v in inits.values()) - sum(r.bytes_before for r in result.nodes)  # the compile report agrees
    assert summary["removed"] == summary["added"] == summary["changed"] == 0
    assert summary["absorbed"] == sum(bool(raw(n)["relu"]) + ("max_pool" in raw(n)) for n in found)


def test_diff_table_and_summary_line_on_the_cnn(capsys, cnn):
    _, out = cnn
    assert cli.main(["diff", str(MODEL), str(out)]) == 0
    text = capsys.readouterr().out
    assert text == format_diff(diff_models(MODEL, out)) + "\n"
    lines = text.splitlines()
    fast = onnx.load(str(out))
    nodes, inits = original()
    for node in lookup_nodes(fast):
        row = next(l for l in lines if l.split()[0] == node.name)
        src = nodes[node.name]
        weight = inits[src.input[1]]
        want = (int(np.prod(weight.shape[1:])), weight.shape[0])
        shape = " x ".join(map(str, want)) if written_shape(node, fast, want) == want else \
            "{} x {} -> {} x {}".format(*want, *written_shape(node, fast, want))
        op = f"{src.op_type} -> {DOMAIN}:{node.op_type}"
        bytes_ = f"{sum(inits[t].nbytes for t in src.input[1:]):,} -> {stored_bytes(node):,}"
        assert f"  {op}  " in row and f"  {shape}  " in row and row.endswith(bytes_), row
    a, b = sum(v.nbytes for v in inits.values()), total_bytes(fast)
    assert lines[-1].endswith(f"parameters {a:,} -> {b:,} bytes ({a / b:.1f}x smaller)"), lines[-1]
    assert " 0 removed, 0 added;" in lines[-1]


def _lutconv_node(name: str, x: str, y: str, cin: int, cout: int, relu: bool) -> onnx.NodeProto:
    from lutcompile.ops.node_format import conv_attributes, lut_attributes
    from lutcompile.ops.spec import ConvGeometry, LutParams
    rng = np.random.default_rng(0)
    g = ConvGeometry(cin, (3, 3), pads=(1, 1, 1, 1))
    C = 2
    p = LutParams(D=g.D, split_dims=rng.integers(0, g.D, (C, 4)), thresholds=rng.standard_normal((C, 15)),
                  tables=rng.integers(0, 256, (cout, C, 16)), scale=0.01, offsets=np.zeros(C),
                  bias=np.zeros(cout), relu=relu)
    attrs = {**lut_attributes(p, {"source_op": "Conv"}), **conv_attributes(g)}
    attrs["tables"] = numpy_helper.from_array(attrs["tables"], "tables")
    return helper.make_node("LutConv", [x], [y], name=name, domain=DOMAIN, **attrs)


def test_diff_absorbs_a_folded_add_and_relu_into_a_lutconv():
    """Conv (no bias) -> Add (a per-channel constant) -> Relu, against one LutConv in their
    place: the Add and the Relu are absorbed, as for a LutMatMul."""
    w = np.ones((4, 2, 3, 3), np.float32)
    shift = np.arange(4, dtype=np.float32).reshape(1, 4, 1, 1)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 5, 5])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 5, 5])
    a = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["c", "shift"], ["s"], name="add"),
         helper.make_node("Relu", ["s"], ["y"], name="relu")], "a", [x], [y],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(shift, "shift")]),
        opset_imports=[helper.make_opsetid("", 17)])
    b = helper.make_model(helper.make_graph([_lutconv_node("conv", "x", "y", 2, 4, relu=True)], "b", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    d = diff_models(a, b)
    assert [(n.name, n.status, n.absorbed_into) for n in d.nodes] == [
        ("conv", "replaced", None), ("add", "absorbed", "conv"), ("relu", "absorbed", "conv")]
    conv = d.node("conv")
    assert conv.absorbs == ["add", "relu"] and conv.output == "y"
    assert (conv.a.D, conv.a.M) == (conv.b.D, conv.b.M) == (18, 4)
    assert conv.b.param_bytes == stored_bytes(b.graph.node[0]) == 4 * 2 * 16 + 4 * (8 + 30 + 2 + 4)
    assert (d.param_bytes_a, d.param_bytes_b) == (w.nbytes + shift.nbytes, conv.b.param_bytes)
    assert inspect_model(b).consistent, inspect_model(b).problems
