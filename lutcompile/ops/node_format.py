"""The lookup ops' node format: LutParams (and a LutConv's patch geometry) to and from ONNX
node attributes (docs/lutmatmul.md). The rewrite writes it; the reference runtime, the torch
program, `inspect` and `diff` read it."""
from __future__ import annotations

import numpy as np
import onnx

from .spec import CONV_OP_TYPE, DOMAIN, K, LOOKUP_OP_TYPES, SPN_CONV_OP_TYPE, ConvGeometry, LutParams


def is_lookup(node: onnx.NodeProto) -> bool:
    """A LutMatMul or LutConv node of our domain."""
    return node.domain == DOMAIN and node.op_type in LOOKUP_OP_TYPES


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values (TENSOR attributes as numpy arrays, strings decoded)."""
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            value = onnx.numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[a.name] = value
    return out


def lut_attributes(params: LutParams, info: dict[str, str | int] | None = None) -> dict:
    """The numeric attributes of a lookup node (plus descriptive ones from `info`)."""
    attrs = {
        "D": params.D,
        "M": params.M,
        "C": params.C,
        "K": K,
        "split_dims": [int(d) for d in params.split_dims.reshape(-1)],
        "thresholds": [float(t) for t in params.thresholds.reshape(-1)],
        "tables": np.ascontiguousarray(params.tables),
        "scale": float(params.scale),
        "offsets": [float(o) for o in params.offsets],
        "bias": [float(b) for b in params.bias],
        "relu": int(params.relu),
    }
    attrs.update(info or {})
    return attrs


def conv_attributes(g: ConvGeometry) -> dict:
    attrs = {"in_channels": g.in_channels, "kernel_shape": list(g.kernel), "strides": list(g.strides),
             "pads": list(g.pads), "dilations": list(g.dilations)}
    if g.max_pool is not None:
        attrs["max_pool"] = list(g.max_pool)
    return attrs


def parameter_bytes(attrs: dict) -> int:
    """Bytes a node's parameters take as the kernel stores them: a lookup's uint8 tables, int32
    split dims, float32 thresholds, offsets and bias; an SpnMatMul's packed 2-bit wb and wc,
    float32 a and bias. `attrs` as lut_attributes, spn.node_attributes or attributes(node) give
    them; the one formula behind the compile report, `inspect` and `diff`."""
    packed = sum(int(np.asarray(attrs[k]).size) for k in ("tables", "wb", "wc") if attrs.get(k) is not None)
    return packed + 4 * sum(len(attrs.get(k, ())) for k in ("split_dims", "thresholds", "offsets", "bias", "a"))


def geometry_from_node(node: onnx.NodeProto) -> ConvGeometry | None:
    """A LutConv's or SpnConv's patch geometry; None for a LutMatMul or SpnMatMul."""
    if node.op_type not in (CONV_OP_TYPE, SPN_CONV_OP_TYPE):
        return None
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    pool = a.get("max_pool")
    return ConvGeometry(int(a["in_channels"]), tuple(a["kernel_shape"]), tuple(a["strides"]),
                        tuple(a["pads"]), tuple(a["dilations"]), None if pool is None else tuple(pool))


def set_attributes(node: onnx.NodeProto, values: dict) -> None:
    """Overwrite (or add) the named attributes of a NodeProto in place; numpy arrays become
    TENSOR attributes. The others keep their values and order."""
    keep = [a for a in node.attribute if a.name not in values]
    del node.attribute[:]
    node.attribute.extend(keep)
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            value = onnx.numpy_helper.from_array(value, name)
        node.attribute.append(onnx.helper.make_attribute(name, value))


def set_lut_attributes(node: onnx.NodeProto, params: LutParams) -> None:
    """Overwrite a lookup NodeProto's numeric attributes in place (after fine-tuning)."""
    set_attributes(node, lut_attributes(params))


def params_from_node(node: onnx.NodeProto) -> LutParams:
    """Read a lookup node's attributes back into LutParams (validated)."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    C = int(a["C"])
    tables = onnx.numpy_helper.to_array(a["tables"])
    return LutParams(D=int(a["D"]),
                     split_dims=np.array(a["split_dims"]).reshape(C, -1),
                     thresholds=np.array(a["thresholds"], dtype=np.float32).reshape(C, -1),
                     tables=tables, scale=a["scale"], offsets=np.array(a["offsets"]),
                     bias=np.array(a["bias"]), relu=bool(a.get("relu", 0)))
