"""Fuzz cases for the LutMatMul / LutConv kernels in onnxruntime, shared by tests/test_fuzz.py
and scripts/sanitize.py (which runs exactly these cases against a sanitized build).

Three base models, built by `build_base_models`: the digits MLP of conftest.py compiled (three
LutMatMul nodes), a small CNN on the digits images compiled (two LutConv nodes and a LutMatMul),
and the MLP's first two layers as StrassenNets sum-product layers (two SpnMatMul nodes).
`generate_cases` derives CASES cases from them with a fixed seed: each corrupts one lookup
node's attributes or tables, the node's place in the graph, the serialised file, or the input
fed to the model. Every case says what it expects: "error" (onnxruntime must refuse it, with
a message naming the node or the input), "ok" (it must run, and every lookup node's output
must equal the numpy reference `lutcompile.lut` on the input onnxruntime gave that node, bit
for bit) or "any" (either, but a run must still match the reference).

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

from lutcompile.ops.spec import CONV_OP_TYPE, DOMAIN, OP_TYPE, apply_conv_reference, apply_reference  # noqa: E402
from lutcompile.ops.node_format import geometry_from_node, params_from_node  # noqa: E402
from lutcompile.ops import spn  # noqa: E402

SEED = 20261123
CASES = 600
MLP_ROWS = 70  # more than one 64-row block
CNN_IMAGES = 6
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# the attributes every lookup node must carry, and LutConv's geometry on top
REQUIRED = ("D", "M", "C", "K", "split_dims", "thresholds", "tables", "scale", "offsets", "bias", "relu")
GEOMETRY = ("in_channels", "kernel_shape", "strides", "pads", "dilations")


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
    """Compile both base models (no fine-tuning) into `folder`, with the inputs the cases feed."""
    import lutcompile
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import load_digits_data, mlp_model, train_digits_mlp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    X, y = load_digits_data()
    fast = dict(partition="contiguous", table_loss="ridge", finetune=False, progress=False)
    lutcompile.compile_model(mlp_model(train_digits_mlp(X[:1297], y[:1297])), folder / "mlp.onnx",
                             {"input": X[:1297]}, codebooks=8, **fast)
    images = X.reshape(-1, 1, 8, 8)
    lutcompile.compile_model(cnn_model(), folder / "cnn.onnx", {"image": images[:600]}, codebooks=4, **fast)
    onnx.save(spn_model(train_digits_mlp(X[:1297], y[:1297])), str(folder / "spn.onnx"))
    np.savez(folder / "feeds.npz", mlp=X[1297:1297 + MLP_ROWS], cnn=images[1297:1297 + CNN_IMAGES],
             spn=X[1297:1297 + MLP_ROWS])
    return folder


def spn_model(layers) -> onnx.ModelProto:
    """The digits MLP's first two layers as SpnMatMul nodes (ternary SVD initialisation, r = M + 1,
    so that W_c's rows end inside a byte), ReLU fused: [N, 64] -> [N, 32]."""
    nodes, x = [], "input"
    for i, (W, b) in enumerate(layers[:2]):
        attrs = spn.node_attributes(spn.ternary_init(W, b, W.shape[1] + 1), relu=True)
        attrs = {k: numpy_helper.from_array(v, k) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
        nodes.append(helper.make_node(spn.SPN_OP_TYPE, [x], [f"h{i}"], name=f"spn{i}", domain=DOMAIN, **attrs))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "spn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 32])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


# ---------------------------------------------------------------------------------------
# cases


@dataclass
class Case:
    index: int
    base: str  # "mlp" or "cnn"
    node: str  # the lookup node corrupted, or "" for an input case
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


def _for_conv(mutations: list[Callable]) -> list[Callable]:
    """Mark mutations of LutConv's geometry: they are applied to LutConv nodes only."""
    for mutate in mutations:
        mutate.conv_only = True
    return mutations


# Each mutation takes (node, rng) and returns (description, expectation); it edits the node
# in place. Sizes come from the node itself, so one mutation fits every node of both models.

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


def _geometry_mutations() -> list[Callable]:
    """LutConv geometry out of range, or valid."""
    plan = [("in_channels", v) for v in (0, -1, 2**31, "plus_one")]
    plan += [("kernel_shape", v) for v in ([0, 4], [-4, 4], [4097, 1], [2**31, 2**31], [2**62, 2])]
    plan += [("strides", v) for v in ([0, 1], [-1, 1], [1, 4097], [INT64_MAX, 1])]
    plan += [("dilations", v) for v in ([0, 1], [1, -2], [4097, 1], [2**40, 2**40])]
    plan += [("pads", v) for v in ([-1, 0, 0, 0], [0, 0, 65537, 0], [2**40, 0, 0, 0], [INT64_MIN, 0, 0, INT64_MAX])]
    # a fused MaxPool (compile/fuse.py): [window h, w, stride h, w]
    plan += [("max_pool", v) for v in ([0, 2, 2, 2], [2, 2, 0, 2], [4097, 1, 1, 1], [2, 2, 2], [2, 2, 2, 2, 2],
                                       [2**40, 2, 2, 2], [INT64_MIN, 2, 2, INT64_MAX])]
    out = []
    for name, value in plan:
        def mutate(node, rng, name=name, value=value):
            new = int(_value(node, name)) + 1 if value == "plus_one" else value
            _put(node, name, new)
            return f"{name}={new}", "error"
        out.append(mutate)

    def shift_pads(node, rng):  # same sum per axis: same output size, other patches
        top, left, bottom, right = _value(node, "pads")
        dy, dx = int(rng.integers(-top, bottom + 1)), int(rng.integers(-left, right + 1))
        _put(node, "pads", [top + dy, left + dx, bottom - dy, right - dx])
        return f"pads {[top, left, bottom, right]} -> {_value(node, 'pads')}", "ok"

    def max_pool(node, rng):  # valid, but the window may exceed the output, or the next node not fit
        value = [int(v) for v in rng.integers(1, 4, 4)]
        _put(node, "max_pool", value)
        return f"max_pool={value}", "any"

    def other_geometry(node, rng):  # valid, but the next node may not fit the new output size
        name = str(rng.choice(["strides", "dilations", "pads"]))
        size = 4 if name == "pads" else 2
        value = [int(v) for v in rng.integers(0 if name == "pads" else 1, 4, size)]
        _put(node, name, value)
        return f"{name}={value}", "any"
    return _for_conv(out + [shift_pads, max_pool, other_geometry])


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

    return [thresholds, split_dims, split_extremes, tables, saturated, scale, offsets_bias, relu, _extra_attribute]


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

    return [extra_input, no_input, empty_input, extra_output, unknown_op]


def _for_spn(mutations: list[Callable]) -> list[Callable]:
    """Mark mutations of SpnMatMul's attributes: they are applied to the spn base model only."""
    for mutate in mutations:
        mutate.spn_only = True
    return mutations


def _spn_mutations() -> list[Callable]:
    """SpnMatMul's attributes out of range, malformed or missing, and valid new weights."""
    def packed(node, name):
        return numpy_helper.to_array(_attr(node, name).t).copy()

    def code3(node, rng):
        w = packed(node, "wb")
        w[rng.integers(len(w)), rng.integers(w.shape[1])] |= 0b11 << (2 * int(rng.integers(4)))
        _put(node, "wb", w)
        return "wb holds code 3", "error"

    def tail(node, rng):  # R = M + 1: W_c's rows end one weight into their last byte
        w = packed(node, "wc")
        w[rng.integers(len(w)), -1] |= 0b01 << 2
        _put(node, "wc", w)
        return "wc has a weight past its row", "error"

    def plan(name, value, what):
        def mutate(node, rng):
            v = value(node, rng) if callable(value) else value
            if v is None:
                _drop(node, name)
            else:
                _put(node, name, v)
            return what, "error"
        return mutate

    def valid_weights(node, rng):  # fresh ternary weights, packed as the op stores them
        for name in ("wb", "wc"):
            w = packed(node, name)
            rows, cols = w.shape[0], int(_value(node, "D" if name == "wb" else "R"))
            _put(node, name, spn.pack_ternary(rng.integers(-1, 2, (rows, cols))))
        return "new ternary weights", "ok"

    def valid_scales(node, rng):
        _put(node, "a", [float(v) for v in rng.standard_normal(int(_value(node, "R"))) * 10.0 ** rng.integers(-3, 4)])
        _put(node, "relu", int(rng.integers(2)))
        return "new a and relu", "any"  # the next node may not take what this one now gives

    out = [code3, tail, valid_weights, valid_scales]
    out += [plan(name, None, f"no attribute {name}") for name in ("D", "M", "R", "wb", "a", "wc", "bias", "relu")]
    out += [plan("R", v, f"R = {v}") for v in (0, -1, 2**31, INT64_MAX)]
    out += [plan("D", lambda n, rng: int(_value(n, "D")) + 1, "D one more than wb's"),
            plan("relu", 2, "relu = 2"),
            plan("a", lambda n, rng: [float("nan")] * int(_value(n, "R")), "a all NaN"),
            plan("bias", lambda n, rng: [float("inf")] * int(_value(n, "M")), "bias all inf"),
            plan("a", [1.0], "a of one value"),
            plan("wb", lambda n, rng: packed(n, "wb")[:, :-1].copy(), "wb a column short"),
            plan("wb", lambda n, rng: packed(n, "wb").astype(np.int8), "wb as int8"),
            plan("wc", lambda n, rng: packed(n, "wc").reshape(-1), "wc flattened"),
            plan("wb", 1.5, "wb as a float")]
    return _for_spn(out + _graph_mutations())


VALID_MUTATIONS = _valid_mutations()
NODE_MUTATIONS: list[Callable] = (_size_mutations() + _drop_mutations(REQUIRED) + _for_conv(_drop_mutations(GEOMETRY))
                                  + _wrong_type_mutations() + _length_mutations() + _split_dim_mutations()
                                  + _float_value_mutations() + _table_tensor_mutations() + _geometry_mutations()
                                  + VALID_MUTATIONS + _graph_mutations() + _spn_mutations())


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
    bases = {name: onnx.load(str(folder / f"{name}.onnx")) for name in ("mlp", "cnn", "spn")}
    with np.load(folder / "feeds.npz") as npz:
        feeds = {name: npz[name] for name in bases}
    lookup = {name: [n.name for n in m.graph.node if n.domain == DOMAIN] for name, m in bases.items()}
    input_plan = [(base, kind) for base in bases for kind in range(len(_input_cases(base, feeds[base])))]
    cases: list[Case] = []

    def add(base, node, kind, expect, model: bytes, feed, needles=()):
        cases.append(Case(len(cases), base, node, kind, expect, model, feed, tuple(needles)))

    def node_case(j: int):
        mutate = NODE_MUTATIONS[j % len(NODE_MUTATIONS)]
        conv_only = getattr(mutate, "conv_only", False)
        base = "spn" if getattr(mutate, "spn_only", False) else "cnn" if conv_only else ("mlp", "cnn")[int(rng.integers(2))]
        model = onnx.ModelProto()
        model.CopyFrom(bases[base])
        nodes = [n for n in model.graph.node if n.domain == DOMAIN and (n.op_type == CONV_OP_TYPE or not conv_only)]
        node = nodes[int(rng.integers(len(nodes)))]
        name = node.name
        kind, expect = mutate(node, rng)
        ours = node.op_type in (OP_TYPE, CONV_OP_TYPE, spn.SPN_OP_TYPE)  # else onnxruntime names only the unknown op type
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
        base = ("mlp", "cnn")[int(rng.integers(2))]
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
    """The model with every lookup node's input and output added as graph outputs."""
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
    if node.op_type == spn.SPN_OP_TYPE:
        params, relu = spn.params_from_node(node)
        return spn.kernel_reference(x, params, relu)
    params = params_from_node(node)
    geometry = geometry_from_node(node)
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
