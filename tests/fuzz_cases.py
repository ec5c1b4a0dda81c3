"""Fuzz cases for the custom ops (LutMatMul, LutConv, SpnMatMul, SpnConv) in onnxruntime, shared by
tests/test_fuzz.py and scripts/sanitize.py (which runs exactly these cases against a sanitized build).

Four base models, built by `build_base_models`: the digits MLP of conftest.py compiled (three
LutMatMul nodes), a small CNN on the digits images compiled (two LutConv nodes and a LutMatMul),
the MLP's first two layers as StrassenNets sum-product layers (two SpnMatMul nodes), and the
same CNN as sum-product layers (two SpnConv nodes and an SpnMatMul).
`generate_cases` derives CASES cases from them with a fixed seed: each corrupts one custom
node's attributes or tables, the node's place in the graph, the serialised file, or the input
fed to the model. Every case says what it expects: "error" (onnxruntime must refuse it, with
a message naming the node or the input), "ok" (it must run, and every custom node's output
must equal its numpy reference (`lutcompile.lut`, `spn.kernel_reference`, `spn.conv_reference`)
on the input onnxruntime gave that node, bit for bit) or "any" (either, but a run must still
match the reference).

A crash must fail a test, not kill pytest, so `run_isolated` runs the cases in a child
process (this file run as a script) that prints one JSON line as each case starts and one
with its verdict; when the child dies (a signal, a sanitizer abort), the case that started
last is reported as a crash and a new child carries on with the next case.

    python tests/fuzz_cases.py MODELS_DIR --library LIB [--start I] [--stop J]
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the child process runs this file as a script
    sys.path.insert(0, str(REPO))

from lutcompile.ops.spec import (CONV_OP_TYPE, DOMAIN, OP_TYPE, SPN_CONV_OP_TYPE, SPN_OP_TYPE,  # noqa: E402
                                 ConvGeometry, apply_conv_reference, apply_reference, im2col_reference)
from lutcompile.ops.node_format import conv_attributes, geometry_from_node, params_from_node  # noqa: E402
from lutcompile.ops import spn  # noqa: E402

SEED = 20261123
CASES = 600
MLP_ROWS = 70  # more than one 64-row block
CNN_IMAGES = 6
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# the attributes every lookup node must carry, and LutConv's (and SpnConv's) geometry on top
REQUIRED = ("D", "M", "C", "K", "split_dims", "thresholds", "tables", "scale", "offsets", "bias", "relu")
GEOMETRY = ("in_channels", "kernel_shape", "strides", "pads", "dilations")
# the op types a mutation applies to (its `ops`; the lookup ops' when it has none)
LOOKUPS = (OP_TYPE, CONV_OP_TYPE)
CONVS = (CONV_OP_TYPE, SPN_CONV_OP_TYPE)
SPNS = (SPN_OP_TYPE, SPN_CONV_OP_TYPE)
OURS = (OP_TYPE, CONV_OP_TYPE, SPN_OP_TYPE, SPN_CONV_OP_TYPE)
BASES = ("mlp", "cnn", "spn", "spncnn")  # build_base_models' files, without .onnx


# ---------------------------------------------------------------------------------------
# base models (built in the parent, which has sklearn and torch)


def cnn_model(seed: int = 0) -> onnx.ModelProto:
    """[N, 1, 8, 8] -> Conv 1->8 (4x4, pad 1) -> Relu -> Conv 8->8 (2x2, dilation 2, stride 2,
    pads 0,1,1,0) -> Relu -> Flatten -> Gemm 72->10; He-initialised weights (the fuzz needs
    real codes and tables, not accuracy)."""
    rng = np.random.default_rng(seed)

    def he(*shape):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)

    inits = [numpy_helper.from_array(he(8, 1, 4, 4), "Wa"), numpy_helper.from_array(np.zeros(8, np.float32), "ba"),
             numpy_helper.from_array(he(8, 8, 2, 2), "Wb"), numpy_helper.from_array(np.full(8, 0.1, np.float32), "bb"),
             numpy_helper.from_array(he(10, 72), "Wc"), numpy_helper.from_array(np.zeros(10, np.float32), "bc")]
    nodes = [
        helper.make_node("Conv", ["image", "Wa", "ba"], ["a"], name="conv_a", kernel_shape=[4, 4], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node("Conv", ["a_relu", "Wb", "bb"], ["b"], name="conv_b", kernel_shape=[2, 2],
                         dilations=[2, 2], strides=[2, 2], pads=[0, 1, 1, 0]),
        helper.make_node("Relu", ["b"], ["b_relu"], name="relu_b"),
        helper.make_node("Flatten", ["b_relu"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "Wc", "bc"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_base_models(folder: str | os.PathLike) -> Path:
    """Build the four base models (no fine-tuning) into `folder`, with the inputs the cases feed."""
    import lutcompile
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import load_digits_data, mlp_model, train_digits_mlp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    X, y = load_digits_data()
    fast = dict(partition="contiguous", table_loss="ridge", finetune=False, progress=False)
    layers = train_digits_mlp(X[:1297], y[:1297])
    lutcompile.compile_model(mlp_model(layers), folder / "mlp.onnx", {"input": X[:1297]}, codebooks=8, **fast)
    images = X.reshape(-1, 1, 8, 8)
    lutcompile.compile_model(cnn_model(), folder / "cnn.onnx", {"image": images[:600]}, codebooks=4, **fast)
    onnx.save(spn_model(layers), str(folder / "spn.onnx"))
    onnx.save(spn_cnn_model(images[:600]), str(folder / "spncnn.onnx"))
    np.savez(folder / "feeds.npz", mlp=X[1297:1297 + MLP_ROWS], cnn=images[1297:1297 + CNN_IMAGES],
             spn=X[1297:1297 + MLP_ROWS], spncnn=images[1297:1297 + CNN_IMAGES])
    return folder


def _spn_node(x: str, y: str, name: str, params: spn.SpnParams, relu: bool,
              geometry: ConvGeometry | None = None) -> onnx.NodeProto:
    """An SpnMatMul node, or with a `geometry` an SpnConv node, as the compiler writes it."""
    attrs = spn.node_attributes(params, relu)
    if geometry is not None:
        attrs.update(conv_attributes(geometry))
    attrs = {k: numpy_helper.from_array(v, k) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    op_type = SPN_OP_TYPE if geometry is None else SPN_CONV_OP_TYPE
    return helper.make_node(op_type, [x], [y], name=name, domain=DOMAIN, **attrs)


def _spn_graph_model(nodes, name: str, x: onnx.ValueInfoProto, y: onnx.ValueInfoProto) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def spn_model(layers) -> onnx.ModelProto:
    """The digits MLP's first two layers as SpnMatMul nodes (ternary SVD initialisation, r = M + 1,
    so that W_c's rows end inside a byte), ReLU fused: [N, 64] -> [N, 32]."""
    nodes, x = [], "input"
    for i, (W, b) in enumerate(layers[:2]):
        nodes.append(_spn_node(x, f"h{i}", f"spn{i}", spn.ternary_init(W, b, W.shape[1] + 1), relu=True))
        x = f"h{i}"
    return _spn_graph_model(nodes, "spn", helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64]),
                            helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 32]))


def spn_cnn_model(images: np.ndarray) -> onnx.ModelProto:
    """`cnn_model` as sum-product layers: both Convs as SpnConv nodes (ReLU fused) and the Gemm as
    an SpnMatMul, each fitted (spn.fit_layer) on the rows it gets from `images` [n, 1, 8, 8]
    through the layers before it, at r = M + 1 (W_c's rows end inside a byte):
    [N, 1, 8, 8] -> SpnConv 1->8 -> SpnConv 8->8 -> Flatten -> SpnMatMul 72->10."""
    cnn = cnn_model()
    weights = {t.name: numpy_helper.to_array(t) for t in cnn.graph.initializer}
    convs = [n for n in cnn.graph.node if n.op_type == "Conv"]
    nodes, x, h = [], "image", np.asarray(images, np.float32)
    for node, y in zip(convs, ("a_relu", "b_relu")):
        W, b = weights[node.input[1]], weights[node.input[2]]
        a = {k: list(v) for k, v in ((a.name, helper.get_attribute_value(a)) for a in node.attribute)}
        g = ConvGeometry(W.shape[1], tuple(a["kernel_shape"]), tuple(a.get("strides", (1, 1))),
                         tuple(a.get("pads", (0, 0, 0, 0))), tuple(a.get("dilations", (1, 1))))
        params = spn.fit_layer(im2col_reference(h, g), W.reshape(len(W), -1).T, b, len(W) + 1)
        nodes.append(_spn_node(x, y, f"spn{node.name}", params, relu=True, geometry=g))
        x, h = y, spn.conv_reference(h, params, g, relu=True)
    W, b = weights["Wc"], weights["bc"]  # the Gemm's, stored [M, D] (transB)
    fc = spn.fit_layer(h.reshape(len(h), -1), W.T, b, len(W) + 1)
    nodes += [helper.make_node("Flatten", [x], ["flat"], name="flatten"),
              _spn_node("flat", "logits", "spnfc", fc, relu=False)]
    return _spn_graph_model(nodes, "spncnn", helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8]),
                            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]))


# ---------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    index: int
    base: str  # one of BASES
    node: str  # the custom node corrupted, or "" for an input case
    kind: str  # what was done, e.g. "scale=nan"
    expect: str  # "error", "ok" or "any"
    model: bytes  # the serialised model
    feed: dict[str, np.ndarray]
    needles: tuple[str, ...] = ()  # an expected error must contain one of these (the node's name)

    @property
    def label(self) -> str:
        return f"#{self.index} {self.base}/{self.node or 'input'}: {self.kind}"


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto | None:
    return next((a for a in node.attribute if a.name == name), None)


def _value(node: onnx.NodeProto, name: str):
    return helper.get_attribute_value(_attr(node, name))


def _drop(node: onnx.NodeProto, name: str) -> None:
    a = _attr(node, name)
    if a is not None:
        node.attribute.remove(a)


def _put(node: onnx.NodeProto, name: str, value) -> None:
    _drop(node, name)
    if isinstance(value, np.ndarray):
        value = numpy_helper.from_array(value, name)
    node.attribute.append(helper.make_attribute(name, value))


def _put_typed(node: onnx.NodeProto, name: str, kind: int, values: list) -> None:
    """An attribute of an explicit type (make_attribute would infer ints for [] or [1, 2])."""
    _drop(node, name)
    a = onnx.AttributeProto(name=name, type=kind)
    {onnx.AttributeProto.INTS: a.ints, onnx.AttributeProto.FLOATS: a.floats}[kind].extend(values)
    node.attribute.append(a)


def _tables(node: onnx.NodeProto) -> onnx.TensorProto:
    return _attr(node, "tables").t


def _applies_to(ops: tuple[str, ...], mutations: list[Callable]) -> list[Callable]:
    """Mark mutations as applying to nodes of the op types `ops` only (unmarked ones: LOOKUPS)."""
    for mutate in mutations:
        mutate.ops = ops
    return mutations


def _for_conv(mutations: list[Callable]) -> list[Callable]:
    """Mark mutations of a conv op's geometry: applied to LutConv and SpnConv nodes."""
    return _applies_to(CONVS, mutations)


# Each mutation takes (node, rng) and returns (description, expectation); it edits the node
# in place. Sizes come from the node itself, so one mutation fits every node it applies to.

def _size_mutations() -> list[Callable]:
    out = []
    for name in ("D", "M", "C", "K"):
        for how in ("zero", "negative", "plus_one", "minus_one", "int32_overflow", "huge", "int64_min"):
            def mutate(node, rng, name=name, how=how):
                v = int(_value(node, name))
                new = {"zero": 0, "negative": -int(rng.integers(1, 100)), "plus_one": v + 1, "minus_one": v - 1,
                       "int32_overflow": 2**31 + int(rng.integers(0, 8)), "huge": 2**62, "int64_min": INT64_MIN}[how]
                _put(node, name, new)
                return f"{name}={new}", "error"
            out.append(mutate)
    return out


def _drop_mutations(names) -> list[Callable]:
    def make(name):
        def mutate(node, rng):
            _drop(node, name)
            return f"drop {name}", "error"
        return mutate
    return [make(n) for n in names]


def _wrong_type_mutations() -> list[Callable]:
    """Every required attribute with another attribute type."""
    def as_float(node, rng, name):
        _put(node, name, float(np.asarray(_value(node, name)).reshape(-1)[0]))

    def as_string(node, rng, name):
        _put(node, name, b"sixteen")

    def as_floats(node, rng, name):
        _put_typed(node, name, onnx.AttributeProto.FLOATS, [float(v) for v in np.asarray(_value(node, name)).reshape(-1)])

    def as_ints(node, rng, name):
        values = np.clip(np.nan_to_num(np.asarray(_value(node, name))), -1e9, 1e9)
        _put_typed(node, name, onnx.AttributeProto.INTS, [int(v) for v in values])

    def as_int(node, rng, name):
        _put(node, name, int(np.asarray(_value(node, name)).reshape(-1)[0]))

    def tables_dtype(dtype):
        def change(node, rng, name):
            _put(node, name, numpy_helper.to_array(_tables(node)).astype(dtype))
        change.__name__ = f"tables as {np.dtype(dtype).name}"
        return change

    def tables_as_ints(node, rng, name):
        _put_typed(node, name, onnx.AttributeProto.INTS, numpy_helper.to_array(_tables(node)).reshape(-1).tolist())

    plan = [(n, f) for n in ("D", "M", "C", "K", "relu") for f in (as_float, as_string)]
    plan += [(n, f) for n in ("split_dims", "kernel_shape", "pads") for f in (as_floats, as_int)]
    plan += [(n, f) for n in ("thresholds", "offsets", "bias") for f in (as_ints, as_float)]
    plan += [("scale", as_int), ("scale", as_string), ("in_channels", as_float)]
    plan += [("tables", f) for f in (tables_dtype(np.int8), tables_dtype(np.float32), tables_dtype(np.int64),
                                    tables_as_ints, as_string)]
    out = []
    for name, change in plan:
        def mutate(node, rng, name=name, change=change):
            change(node, rng, name)
            return f"{name}: {change.__name__.replace('_', ' ')}", "error"
        out += _for_conv([mutate]) if name in GEOMETRY else [mutate]
    return out


def _length_mutations() -> list[Callable]:
    """Arrays one short, one long, empty, or cut to a random length."""
    out = []
    for name in ("split_dims", "thresholds", "offsets", "bias", "kernel_shape", "strides", "pads", "dilations"):
        for how in ("short", "long", "empty", "random"):
            def mutate(node, rng, name=name, how=how):
                values = list(_value(node, name))
                n = {"short": len(values) - 1, "long": len(values) + 1, "empty": 0,
                     "random": int(rng.choice([k for k in range(3 * len(values) + 2) if k != len(values)]))}[how]
                new = (values * (n // max(1, len(values)) + 1))[:n] if values else [0] * n
                kind = onnx.AttributeProto.INTS if _attr(node, name).type == onnx.AttributeProto.INTS \
                    else onnx.AttributeProto.FLOATS
                _put_typed(node, name, kind, new)
                return f"{name}: {len(values)} -> {n} values", "error"
            out += _for_conv([mutate]) if name in GEOMETRY else [mutate]
    return out


def _split_dim_mutations() -> list[Callable]:
    out = []
    for how in ("D", "minus_one", "int32_wrap", "int32_max", "int64_max", "int64_min"):
        def mutate(node, rng, how=how):
            values = list(_value(node, "split_dims"))
            i = int(rng.integers(len(values)))
            D = int(_value(node, "D"))
            values[i] = {"D": D, "minus_one": -1, "int32_wrap": 2**32 + values[i], "int32_max": 2**31 - 1,
                         "int64_max": INT64_MAX, "int64_min": INT64_MIN}[how]
            _put(node, "split_dims", values)
            return f"split_dims[{i}]={values[i]}", "error"
        out.append(mutate)
    return out


def _float_value_mutations() -> list[Callable]:
    out = []
    for value in (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0):
        def mutate(node, rng, value=value):
            _put(node, "scale", value)
            return f"scale={value}", "error"
        out.append(mutate)
    for name in ("offsets", "bias"):
        for value in (float("nan"), float("inf"), float("-inf")):
            def mutate(node, rng, name=name, value=value):
                values = list(_value(node, name))
                i = int(rng.integers(len(values)))
                values[i] = value
                _put(node, name, values)
                return f"{name}[{i}]={value}", "error"
            out.append(mutate)
    for value in (2, -1, 2**40):
        def mutate(node, rng, value=value):
            _put(node, "relu", value)
            return f"relu={value}", "error"
        out.append(mutate)
    return out


def _table_tensor_mutations() -> list[Callable]:
    """The tables TensorProto itself: wrong shapes, empty, inconsistent raw data, bad dims."""
    def reshape(dims_of):
        def mutate(node, rng):
            t = numpy_helper.to_array(_tables(node))
            M, C, K = t.shape
            dims = dims_of(M, C, K)
            flat = np.resize(t.reshape(-1), int(np.prod(dims))).astype(np.uint8)
            _put(node, "tables", flat.reshape(dims))
            return f"tables shape {list(t.shape)} -> {list(dims)}", "ok" if tuple(dims) == t.shape else "error"
        return mutate

    def raw(edit, what):
        def mutate(node, rng):
            t = _tables(node)
            edit(t, rng)
            return f"tables {what}", "error"
        return mutate

    def truncate(t, rng):
        t.raw_data = t.raw_data[:int(rng.integers(0, len(t.raw_data)))]

    def extend(t, rng):
        t.raw_data = t.raw_data + bytes(int(rng.integers(1, 64)))

    def dims_to(values):
        def edit(t, rng):
            new = values(list(t.dims), rng)
            del t.dims[:]
            t.dims.extend(new)
        return edit

    def no_data(t, rng):
        t.ClearField("raw_data")

    def two_fields(t, rng):
        t.int32_data.extend([1] * (len(t.raw_data)))

    def as_int32_data(t, rng):  # a legal encoding of the same uint8 values: still valid
        values = np.frombuffer(t.raw_data, np.uint8).astype(np.int32)
        t.ClearField("raw_data")
        t.int32_data.extend(values.tolist())

    def external(t, rng):
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value="../../../../etc/passwd")

    out = [reshape(lambda M, C, K: (M, C, K - 1)), reshape(lambda M, C, K: (M, C + 1, K)),
           reshape(lambda M, C, K: (M + 1, C, K)), reshape(lambda M, C, K: (M * C * K,)),
           reshape(lambda M, C, K: (M, C, K, 1)), reshape(lambda M, C, K: (0, C, K)),
           reshape(lambda M, C, K: (M, 0, K)), reshape(lambda M, C, K: (C, M, K)),
           raw(truncate, "raw data truncated"), raw(extend, "raw data too long"), raw(no_data, "without data"),
           raw(two_fields, "with two data fields"), raw(external, "as external data outside the folder"),
           raw(dims_to(lambda d, rng: [-d[0], d[1], d[2]]), "with a negative dimension"),
           raw(dims_to(lambda d, rng: [2**40, d[1], d[2]]), "with dims [2^40, C, 16]"),
           raw(dims_to(lambda d, rng: [2**62, 2**62, 16]), "with dims overflowing int64"),
           raw(dims_to(lambda d, rng: [d[0] * 2, d[1] // 2 or 1, 16]), "with dims of another split")]

    def valid_encoding(node, rng):
        as_int32_data(_tables(node), rng)
        return "tables as int32_data (a legal encoding)", "ok"
    return out + [valid_encoding]


def _setting(expect: str, what: str | None = None, **values) -> Callable:
    """A mutation that sets each named attribute, in order, to its value (a callable: computed from
    (node, rng) when applied; None: the attribute dropped); described as `what` or by the values."""
    def mutate(node, rng):
        said = []
        for name, value in values.items():
            v = value(node, rng) if callable(value) else value
            if v is None:
                _drop(node, name)
            else:
                _put(node, name, v)
            said.append(f"no attribute {name}" if v is None else f"{name}={v}")
        return what or ", ".join(said), expect
    return mutate


def _plus_one(name: str) -> Callable:
    return lambda node, rng: int(_value(node, name)) + 1


def _geometry_mutations() -> list[Callable]:
    """A conv op's geometry out of range (LutConv and SpnConv alike)."""
    plan = [("in_channels", v) for v in (0, -1, 2**31, _plus_one("in_channels"))]
    plan += [("kernel_shape", v) for v in ([0, 4], [-4, 4], [4097, 1], [2**31, 2**31], [2**62, 2])]
    plan += [("strides", v) for v in ([0, 1], [-1, 1], [1, 4097], [INT64_MAX, 1])]
    plan += [("dilations", v) for v in ([0, 1], [1, -2], [4097, 1], [2**40, 2**40])]
    plan += [("pads", v) for v in ([-1, 0, 0, 0], [0, 0, 65537, 0], [2**40, 0, 0, 0], [INT64_MIN, 0, 0, INT64_MAX])]
    return _for_conv([_setting("error", **{name: value}) for name, value in plan])


def _conv_valid_mutations() -> list[Callable]:
    """Another valid geometry for a LutConv or SpnConv: the run must match the reference."""
    def shift_pads(node, rng):  # same sum per axis: same output size, other patches
        top, left, bottom, right = _value(node, "pads")
        dy, dx = int(rng.integers(-top, bottom + 1)), int(rng.integers(-left, right + 1))
        _put(node, "pads", [top + dy, left + dx, bottom - dy, right - dx])
        return f"pads {[top, left, bottom, right]} -> {_value(node, 'pads')}", "ok"

    def other_geometry(node, rng):  # valid, but the next node may not fit the new output size
        name = str(rng.choice(["strides", "dilations", "pads"]))
        size = 4 if name == "pads" else 2
        value = [int(v) for v in rng.integers(0 if name == "pads" else 1, 4, size)]
        _put(node, name, value)
        return f"{name}={value}", "any"
    return _for_conv([shift_pads, other_geometry])


def _max_pool_mutations() -> list[Callable]:
    """LutConv's fused MaxPool (compile/fuse.py), [window h, w, stride h, w]: out of range, or valid."""
    plan = ([0, 2, 2, 2], [2, 2, 0, 2], [4097, 1, 1, 1], [2, 2, 2], [2, 2, 2, 2, 2], [2**40, 2, 2, 2],
            [INT64_MIN, 2, 2, INT64_MAX])

    def max_pool(node, rng):  # valid, but the window may exceed the output, or the next node not fit
        value = [int(v) for v in rng.integers(1, 4, 4)]
        _put(node, "max_pool", value)
        return f"max_pool={value}", "any"
    return _applies_to((CONV_OP_TYPE,), [_setting("error", max_pool=v) for v in plan] + [max_pool])


def _spn_conv_mutations() -> list[Callable]:
    """SpnConv's geometry against its layer: D not in_channels*kh*kw, past the 2^24 patch inputs,
    a kernel wider than any padded input, and valid geometries of the same D."""
    def zero_wb(node, rng):  # an all-zero wb [1, ceil(D / 4)] for the D just set
        return np.zeros((1, (int(_value(node, "D")) + 3) // 4), np.uint8)

    def flat_kernel(node, rng):
        kh, kw = _value(node, "kernel_shape")
        return [kh * kw, 1] if rng.integers(2) else [1, kh * kw]

    def same_d(node, rng):  # fresh ternary wb for the D just set
        return spn.pack_ternary(rng.integers(-1, 2, (int(_value(node, "R")), int(_value(node, "D")))))

    out = [_setting("error", "D = in_channels*kh*kw + 4, wb that wide",
                    D=lambda n, rng: int(_value(n, "D")) + 4, wb=same_d),
           _setting("error", "in_channels*kh*kw = 2^48, past D", in_channels=2**24, kernel_shape=[4096, 4096]),
           # refused before the geometry is read (build_spn_conv)
           _setting("error", "D = 2^24 + 1 patch inputs (R = 1)", D=2**24 + 1, R=1, wb=zero_wb, a=[1.0],
                    wc=lambda n, rng: np.zeros((int(_value(n, "M")), 1), np.uint8)),
           # valid at session creation; every kernel here is at least 2 wide: refused on the input
           _setting("error", "dilations [4096, 4096]: a kernel wider than the padded input", dilations=[4096, 4096]),
           _setting("error", "in_channels = D, 1x1 kernel: the input's channels differ",
                    in_channels=lambda n, rng: int(_value(n, "D")), kernel_shape=[1, 1]),
           # valid; the output size changes, so this node's input or the next node may not fit
           _setting("any", kernel_shape=flat_kernel),
           _setting("any", strides=[4096, 4096]),
           _setting("any", pads=[65536] * 4, strides=[4096, 4096]),
           # SpnConv has no max_pool (docs/lutmatmul.md): refused, as it would change the output
           _setting("error", "max_pool on an SpnConv", max_pool=[2, 2, 2, 2])]
    return _applies_to((SPN_CONV_OP_TYPE,), out)


def _extra_attribute(node, rng):
    extra = [("note", b"descriptive"), ("source_op", b"Conv"), ("level", 3), ("group", 2),
             ("calibration", np.arange(4, dtype=np.float32)), ("K_", [1, 2, 3])]
    name, value = extra[int(rng.integers(len(extra)))]
    _put(node, name, value)
    return f"extra attribute {name}", "ok"


def _valid_mutations() -> list[Callable]:
    """Values the operator allows: the run must match the reference."""
    def thresholds(node, rng):
        values = rng.standard_normal(len(_value(node, "thresholds"))).astype(np.float32)
        values[rng.random(len(values)) < 0.1] = np.nan  # NaN compares false: goes left
        values[rng.random(len(values)) < 0.05] = np.inf
        values[rng.random(len(values)) < 0.05] = -np.inf
        _put(node, "thresholds", [float(v) for v in values])
        return "random thresholds with NaN and inf", "ok"

    def split_dims(node, rng):
        D = int(_value(node, "D"))
        _put(node, "split_dims", [int(v) for v in rng.integers(0, D, len(_value(node, "split_dims")))])
        return "random split dims in [0, D)", "ok"

    def split_extremes(node, rng):
        D = int(_value(node, "D"))
        _put(node, "split_dims", [int(v) for v in rng.choice([0, D - 1], len(_value(node, "split_dims")))])
        return "split dims 0 and D-1 only", "ok"

    def tables(node, rng):
        t = numpy_helper.to_array(_tables(node))
        _put(node, "tables", rng.integers(0, 256, t.shape, dtype=np.uint8))
        return "random tables", "ok"

    def saturated(node, rng):
        t = numpy_helper.to_array(_tables(node))
        _put(node, "tables", np.full(t.shape, 255, np.uint8))
        return "tables all 255", "ok"

    def scale(node, rng):
        value = float(rng.choice([1e-30, 1e-42, 3.0e38, float(rng.uniform(0.001, 10))]))
        _put(node, "scale", value)
        return f"scale={value:g}", "ok"

    def offsets_bias(node, rng):
        name = str(rng.choice(["offsets", "bias"]))
        values = (rng.standard_normal(len(_value(node, name))) * 10 ** rng.uniform(-3, 30)).astype(np.float32)
        _put(node, name, [float(v) for v in values])
        return f"random {name}", "ok"

    def relu(node, rng):
        _put(node, "relu", 1 - int(_value(node, "relu")))
        return "relu flipped", "ok"

    return [thresholds, split_dims, split_extremes, tables, saturated, scale, offsets_bias, relu,
            *_applies_to(OURS, [_extra_attribute])]  # the one of them every op of ours takes


def _graph_mutations() -> list[Callable]:
    """The node's wiring: extra, missing or empty inputs and outputs; an op type our domain lacks."""
    def extra_input(node, rng):
        node.input.append(node.input[0])
        return "a second input", "error"

    def no_input(node, rng):
        del node.input[:]
        return "no input", "error"

    def empty_input(node, rng):
        node.input[0] = ""
        return "input name empty (an omitted optional input)", "error"

    def extra_output(node, rng):
        node.output.append(node.name + "/extra")
        return "a second output", "error"

    def unknown_op(node, rng):
        node.op_type = "LutMatMulV9"
        return "unknown op type in our domain", "error"

    # another op of our domain: its attributes are missing, or the input is not its shape (the
    # conv ops read 4-D images whose width is not D)
    def sibling(swap: dict[str, str], what: str):
        def mutate(node, rng):
            node.op_type = swap[node.op_type]
            return f"op type changed to {node.op_type} ({what})", "error"
        return mutate
    pairs = {"rows <-> conv": [(OP_TYPE, CONV_OP_TYPE), (SPN_OP_TYPE, SPN_CONV_OP_TYPE)],
             "lookup <-> sum-product": [(OP_TYPE, SPN_OP_TYPE), (CONV_OP_TYPE, SPN_CONV_OP_TYPE)]}
    return [extra_input, no_input, empty_input, extra_output, unknown_op] + \
        [sibling({**dict(swaps), **{b: a for a, b in swaps}}, what) for what, swaps in pairs.items()]


def _packed(node, name):
    return numpy_helper.to_array(_attr(node, name).t).copy()


def _spn_valid_mutations() -> list[Callable]:
    """New weights and scales for an SpnMatMul or SpnConv: the run must match the reference."""
    def valid_weights(node, rng):  # fresh ternary weights, packed as the op stores them
        for name in ("wb", "wc"):
            rows, cols = _packed(node, name).shape[0], int(_value(node, "D" if name == "wb" else "R"))
            _put(node, name, spn.pack_ternary(rng.integers(-1, 2, (rows, cols))))
        return "new ternary weights", "ok"

    def valid_scales(node, rng):
        _put(node, "a", [float(v) for v in rng.standard_normal(int(_value(node, "R"))) * 10.0 ** rng.integers(-3, 4)])
        _put(node, "relu", int(rng.integers(2)))
        return "new a and relu", "any"  # the next node may not take what this one now gives

    # uint8 activations (docs/lutmatmul.md, activations = 1): the integer path, checked against the reference
    return _applies_to(SPNS, [valid_weights, valid_scales, _setting("ok", "uint8 activations", activations=1)])


def _spn_mutations() -> list[Callable]:
    """SpnMatMul's and SpnConv's attributes out of range, malformed or missing."""
    def code3(node, rng):
        w = _packed(node, "wb")
        w[rng.integers(len(w)), rng.integers(w.shape[1])] |= 0b11 << (2 * int(rng.integers(4)))
        _put(node, "wb", w)
        return "wb holds code 3", "error"

    def tail(node, rng):  # r = M + 1 in every base model: W_c's rows end inside their last byte
        R = int(_value(node, "R"))
        w = _packed(node, "wc")
        w[rng.integers(len(w)), R // 4] |= 0b01 << (2 * (R % 4))
        _put(node, "wc", w)
        return "wc has a weight past its row", "error"

    out = [code3, tail]
    out += [_setting("error", None, **{name: None}) for name in ("D", "M", "R", "wb", "a", "wc", "bias", "relu")]
    out += [_setting("error", f"R = {v}", R=v) for v in (0, -1, 2**31, INT64_MAX)]
    out += [_setting("error", "D one more than wb's", D=_plus_one("D")),
            _setting("error", "relu = 2", relu=2),
            _setting("error", "a all NaN", a=lambda n, rng: [float("nan")] * int(_value(n, "R"))),
            _setting("error", "bias all inf", bias=lambda n, rng: [float("inf")] * int(_value(n, "M"))),
            _setting("error", "a of one value", a=[1.0]),
            _setting("error", "wb a column short", wb=lambda n, rng: _packed(n, "wb")[:, :-1].copy()),
            _setting("error", "wb as int8", wb=lambda n, rng: _packed(n, "wb").astype(np.int8)),
            _setting("error", "wc flattened", wc=lambda n, rng: _packed(n, "wc").reshape(-1)),
            _setting("error", "wb as a float", wb=1.5),
            _setting("error", "activations = 2", activations=2),
            _setting("error", "activations = -1", activations=-1),
            _setting("error", "activations as a float", activations=1.0)]
    return _applies_to(SPNS, out + _graph_mutations())


VALID_MUTATIONS = _valid_mutations() + _conv_valid_mutations() + _spn_valid_mutations()
NODE_MUTATIONS: list[Callable] = (_size_mutations() + _drop_mutations(REQUIRED) + _for_conv(_drop_mutations(GEOMETRY))
                                  + _wrong_type_mutations() + _length_mutations() + _split_dim_mutations()
                                  + _float_value_mutations() + _table_tensor_mutations() + _geometry_mutations()
                                  + _max_pool_mutations() + VALID_MUTATIONS + _graph_mutations() + _spn_mutations()
                                  + _spn_conv_mutations())


def _relaxed(model: onnx.ModelProto, keep_rank: bool) -> onnx.ModelProto:
    """The model with its input's shape unconstrained, so odd shapes reach our kernel."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensor_type = out.graph.input[0].type.tensor_type
    if keep_rank:
        for d in tensor_type.shape.dim:
            d.Clear()
            d.dim_param = "free"
    else:
        tensor_type.ClearField("shape")
    return out


# onnxruntime checks a feed's element type itself, before any node runs, and its message
# names only the types
FEED_TYPE_ERROR = "Unexpected input data type"


def _input_cases(base: str, x: np.ndarray) -> list[tuple[str, str, Callable[[np.random.Generator], np.ndarray]]]:
    """(description, expectation, make feed) for one base model's input."""
    def nan_inf(rng):
        y = x.copy()
        flat = y.reshape(-1)
        flat[rng.integers(0, flat.size, flat.size // 5)] = rng.choice([np.nan, np.inf, -np.inf])
        return y

    shared = [("zero rows", "ok", lambda rng: x[:0]), ("NaN and inf values", "ok", nan_inf),
              ("float64", "error", lambda rng: x.astype(np.float64)),
              ("int32", "error", lambda rng: x.astype(np.int32)),
              ("float16", "error", lambda rng: x.astype(np.float16)),
              ("scalar", "error", lambda rng: np.array(1.0, np.float32))]
    if base in ("mlp", "spn"):  # both read [..., 64]
        return shared + [
            ("one row", "ok", lambda rng: x[0]), ("rank 3", "ok", lambda rng: x[:60].reshape(3, 20, 64)),
            ("rank 9", "ok", lambda rng: x[:2].reshape(1, 1, 1, 1, 1, 1, 1, 2, 64)),
            ("width 63", "error", lambda rng: x[:, :63].copy()),
            ("width 65", "error", lambda rng: np.concatenate([x, x[:, :1]], axis=1)),
            ("width 0", "error", lambda rng: x[:, :0].copy()),
            ("zero rows of width 0", "error", lambda rng: np.zeros((0, 0), np.float32)),
            ("width 1", "error", lambda rng: x[:, :1].copy()),
            ("width 640", "error", lambda rng: np.tile(x, (1, 10))),
            ("rank 3 with zero rows", "ok", lambda rng: np.zeros((4, 0, 64), np.float32)),
        ]
    return shared + [
        ("one image", "ok", lambda rng: x[:1]),
        ("2 channels", "error", lambda rng: np.concatenate([x, x], axis=1)),
        ("0 channels", "error", lambda rng: x[:, :0].copy()),
        ("1x1 image", "error", lambda rng: x[:, :, :1, :1].copy()),
        ("2x2 image", "error", lambda rng: x[:, :, :2, :2].copy()),
        ("zero height", "error", lambda rng: x[:, :, :0].copy()),
        ("16x16 image", "error", lambda rng: np.tile(x, (1, 1, 2, 2))),
        ("height 2^20 + 1", "error", lambda rng: np.zeros((1, 1, 2**20 + 1, 1), np.float32)),
        ("rank 3", "error", lambda rng: x[:, 0].copy()),
        ("rank 5", "error", lambda rng: x[:, None].copy()),
        ("zero images of 1x1", "error", lambda rng: np.zeros((0, 1, 1, 1), np.float32)),
    ]


def _file_mutations(rng: np.random.Generator, data: bytes) -> list[tuple[str, str, bytes]]:
    """Byte-level damage to the serialised model: onnxruntime refuses it or runs it."""
    flipped = bytearray(data)
    for i in rng.integers(0, len(data), 8):
        flipped[i] ^= 1 << int(rng.integers(8))
    cut = int(rng.integers(1, len(data)))
    return [("8 random bit flips", "any", bytes(flipped)), (f"file cut at byte {cut}", "any", data[:cut])]


def generate_cases(folder: str | os.PathLike, count: int = CASES) -> list[Case]:
    """`count` cases from the base models in `folder`, the same ones on every call."""
    folder = Path(folder)
    rng = np.random.default_rng(SEED)
    bases = {name: onnx.load(str(folder / f"{name}.onnx")) for name in BASES}
    with np.load(folder / "feeds.npz") as npz:
        feeds = {name: npz[name] for name in bases}
    lookup = {name: [n.name for n in m.graph.node if n.domain == DOMAIN] for name, m in bases.items()}
    input_plan = [(base, kind) for base in bases for kind in range(len(_input_cases(base, feeds[base])))]
    cases: list[Case] = []

    def add(base, node, kind, expect, model: bytes, feed, needles=()):
        cases.append(Case(len(cases), base, node, kind, expect, model, feed, tuple(needles)))

    def targets(model: onnx.ModelProto, ops: tuple[str, ...]) -> list[onnx.NodeProto]:
        return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in ops]

    def node_case(j: int):
        mutate = NODE_MUTATIONS[j % len(NODE_MUTATIONS)]
        ops = getattr(mutate, "ops", LOOKUPS)
        fitting = [name for name, m in bases.items() if targets(m, ops)]
        base = fitting[int(rng.integers(len(fitting)))]
        model = onnx.ModelProto()
        model.CopyFrom(bases[base])
        nodes = targets(model, ops)
        node = nodes[int(rng.integers(len(nodes)))]
        name = node.name
        kind, expect = mutate(node, rng)
        ours = node.op_type in OURS  # else onnxruntime names only the unknown op type
        add(base, name, kind, expect, model.SerializeToString(), {model.graph.input[0].name: feeds[base]},
            [name if ours else node.op_type])

    def input_case(j: int):
        base, k = input_plan[j % len(input_plan)]
        kind, expect, make = _input_cases(base, feeds[base])[k]
        x = make(rng)
        model = _relaxed(bases[base], keep_rank=x.ndim == feeds[base].ndim)
        needles = [FEED_TYPE_ERROR] if x.dtype != np.float32 else \
            [model.graph.input[0].name] + lookup[base]
        add(base, "", kind, expect, model.SerializeToString(), {model.graph.input[0].name: x}, needles)

    def file_case():
        base = BASES[int(rng.integers(len(BASES)))]
        for kind, expect, data in _file_mutations(rng, bases[base].SerializeToString()):
            add(base, "", kind, expect, data, {bases[base].graph.input[0].name: feeds[base]})

    # every mutation and input case once, then a seeded mix with fresh random values
    for j in range(len(NODE_MUTATIONS)):
        node_case(j)
    for j in range(len(input_plan)):
        input_case(j)
    while len(cases) < count:
        r = rng.random()
        if r < 0.3:  # valid values: the runs that must match the reference
            node_case(NODE_MUTATIONS.index(VALID_MUTATIONS[int(rng.integers(len(VALID_MUTATIONS)))]))
        elif r < 0.8:
            node_case(int(rng.integers(len(NODE_MUTATIONS))))
        elif r < 0.93:
            input_case(int(rng.integers(len(input_plan))))
        else:
            file_case()
    return cases[:count]


# ---------------------------------------------------------------------------------------
# running one case

MARK = "fuzz-case: "  # prefixes the child's JSON lines


def _probe(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every custom node's input and output added as graph outputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for node in probe.graph.node:
        if node.domain == DOMAIN:
            for name in list(node.input[:1]) + list(node.output[:1]):
                if name and name not in present:
                    probe.graph.output.append(helper.make_empty_tensor_value_info(name))
                    present.add(name)
    return probe


def _reference(node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    geometry = geometry_from_node(node)
    if node.op_type in SPNS:
        params, relu = spn.params_from_node(node)
        if geometry is None:
            return spn.kernel_reference(x, params, relu)
        return spn.conv_reference(x, params, geometry, relu)
    params = params_from_node(node)
    if geometry is not None:
        return apply_conv_reference(x, params, geometry)
    return apply_reference(x, params)


def run_case(case: Case, library: str) -> dict:
    """Run one case in this process: {"index", "outcome": "ok" | "error", "failure": text or None}."""
    import onnxruntime as ort

    verdict = {"index": case.index, "outcome": None, "failure": None}
    try:
        model = onnx.load_from_string(case.model)
        data = _probe(model).SerializeToString()
    except Exception:  # unparsable in Python too: onnxruntime must refuse the bytes
        model, data = None, case.model
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 2  # small enough; LutConv's tasks still go through the thread pool
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # every tensor its own allocation (no arena), so AddressSanitizer sees the end of each
    so.enable_cpu_mem_arena = False
    so.register_custom_ops_library(library)
    try:
        session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        values = dict(zip([o.name for o in session.get_outputs()], session.run(None, case.feed)))
    except Exception as exc:
        verdict["outcome"] = "error"
        message = str(exc)
        if case.expect == "ok":
            verdict["failure"] = f"expected a run, got {type(exc).__name__}: {message[:400]}"
        elif not type(exc).__module__.startswith("onnxruntime") and not isinstance(exc, UnicodeDecodeError):
            # (onnxruntime's binding raises UnicodeDecodeError when its message quotes a
            # damaged file's invalid UTF-8)
            verdict["failure"] = f"not an onnxruntime error: {type(exc).__name__}: {message[:400]}"
        elif case.expect == "error" and not any(n in message for n in case.needles):
            verdict["failure"] = f"the error names none of {case.needles[:4]}: {message[:400]}"
        return verdict
    verdict["outcome"] = "ok"
    if case.expect == "error":
        verdict["failure"] = "expected an onnxruntime error, but the model ran"
        return verdict
    if model is None:  # bytes onnx cannot parse but onnxruntime ran: nothing to compare against
        return verdict
    values.update(case.feed)
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        try:
            want = _reference(node, values[node.input[0]])
        except Exception as exc:
            verdict["failure"] = f"onnxruntime ran node {node.name}, which the reference rejects: {exc}"
            return verdict
        got = values[node.output[0]]
        if got.shape != want.shape or got.tobytes() != want.tobytes():
            verdict["failure"] = f"node {node.name}: output differs from the reference"
            return verdict
    return verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run fuzz cases, one JSON line per case start and verdict")
    p.add_argument("models", help="folder written by build_base_models")
    p.add_argument("--library", required=True, help="the custom-op library to register")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--stop", type=int, default=None)
    args = p.parse_args(argv)
    cases = generate_cases(args.models)
    for case in cases[args.start:args.stop]:
        print(MARK + json.dumps({"start": case.index}), flush=True)
        print(MARK + json.dumps(run_case(case, args.library)), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# running every case in child processes


@dataclass
class FuzzRun:
    cases: list[Case]
    verdicts: dict[int, dict]  # index -> run_case's verdict
    crashes: dict[int, str]  # index -> how the child died (signal, exit status, hang)
    stderr: str  # everything the children wrote on stderr (sanitizer reports)
    seconds: float

    def failures(self) -> list[str]:
        out = [f"{self.cases[i].label}: CRASH ({how})" for i, how in sorted(self.crashes.items())]
        out += [f"{self.cases[i].label}: {v['failure']}" for i, v in sorted(self.verdicts.items()) if v["failure"]]
        missing = set(range(len(self.cases))) - set(self.verdicts) - set(self.crashes)
        out += [f"{self.cases[i].label}: never ran" for i in sorted(missing)]
        return out

    def count(self, outcome: str) -> int:
        return sum(v["outcome"] == outcome for v in self.verdicts.values())


def run_isolated(folder: str | os.PathLike, library: str, env: dict[str, str] | None = None,
                 case_timeout: float = 120.0, stop: int | None = None) -> FuzzRun:
    """Run the cases (all, or the first `stop`) in child processes; a child that dies or hangs
    costs one case, not the run."""
    import signal

    start_time = time.monotonic()
    cases = generate_cases(folder)[:stop]
    verdicts: dict[int, dict] = {}
    crashes: dict[int, str] = {}
    stderr_parts: list[str] = []
    child_env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    child_env.setdefault("OMP_NUM_THREADS", "1")
    nxt = 0
    while nxt < len(cases):
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(folder), "--library", library,
                                 "--start", str(nxt), "--stop", str(len(cases))], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=child_env, text=True)
        started = None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        hung = False
        while True:
            if not sel.select(timeout=case_timeout):
                hung = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            if not line.startswith(MARK):  # onnxruntime prints some warnings on stdout
                continue
            msg = json.loads(line[len(MARK):])
            if "start" in msg:
                started = msg["start"]
            else:
                verdicts[msg["index"]] = msg
                started = None
        sel.close()
        proc.stdout.close()
        stderr_parts.append(proc.stderr.read())
        proc.stderr.close()
        code = proc.wait()
        if started is None and not hung and code == 0:
            break  # every remaining case ran
        where = started if started is not None else (max(verdicts, default=nxt - 1) + 1)
        if hung:
            crashes[where] = f"no progress for {case_timeout:.0f} s"
        elif code < 0:
            crashes[where] = f"killed by {signal.Signals(-code).name}"
        else:
            crashes[where] = f"exit status {code}"
        nxt = where + 1
    return FuzzRun(cases, verdicts, crashes, "".join(stderr_parts), time.monotonic() - start_time)


if __name__ == "__main__":
    sys.exit(main())
