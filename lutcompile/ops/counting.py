"""Multiplications per inference, the budget StrassenNets counts (issue 16): what a model's matrix
products multiply, exact or replaced, per row of the model's input.

A product multiplies D x M per row it computes (an int8 QDQ product too: its weight is a
DequantizeLinear of a constant, the product as many int8 multiply-adds); a lookup node M, its
summed tables by the table scale; a sum-product node r, its hidden units by `a` (with uint8
activations, its quantisation's too: ops.spn.multiplications). A Conv (and a
LutConv or SpnConv) computes one row per output position, counted from onnx's shape inference;
a MatMul over a sequence counts one row per model input row.
"""
from __future__ import annotations

import numpy as np
import onnx

from ..errors import OptionsError
from . import spn
from .node_format import attributes, is_lookup


def conv_positions(model: onnx.ModelProto) -> dict[str, int]:
    """Output positions per input row of each Conv node, by onnx's shape inference; a replaced
    node keeps its name, so the exact model's positions serve the compiled one. A Conv whose
    output size the inference leaves open is a one-line OptionsError."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 0 for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    positions = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        spatial = shapes.get(node.output[0], [])[2:]
        if not spatial or min(spatial) < 1:
            raise OptionsError(f"cannot count the multiplications of Conv {node.name}: its output size is not "
                               f"known from the model's input shape")
        positions[node.name] = int(np.prod(spatial))
    return positions


def node_multiplications(node: onnx.NodeProto, constant_dims) -> int:
    """One node's multiplications per row it computes (0 for a node that is no product);
    constant_dims(name) gives a constant input's dims, None for a computed one."""
    if spn.is_spn(node):
        a = attributes(node)
        return spn.multiplications(int(a["D"]), int(a["M"]), int(a["R"]), bool(a.get("activations", 0)))
    if is_lookup(node):
        return int(attributes(node)["M"])
    if node.op_type in ("Gemm", "MatMul", "Conv") and len(node.input) > 1:
        dims = constant_dims(node.input[1])
        return 0 if dims is None else int(np.prod(dims))
    return 0


def multiplications(model: onnx.ModelProto, positions: dict[str, int] | None = None) -> int:
    """The model's multiplications per inference (a row of its input): each product's
    node_multiplications times its output positions (`positions`, default conv_positions(model))."""
    positions = conv_positions(model) if positions is None else positions
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def constant_dims(name: str):
        if name in init:
            return list(init[name].dims)
        node = producer.get(name)
        return constant_dims(node.input[0]) if node is not None and node.op_type == "DequantizeLinear" else None
    return sum(node_multiplications(n, constant_dims) * positions.get(n.name, 1) for n in model.graph.node)
