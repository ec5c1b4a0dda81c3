"""Stage 4, rewrite: replace each fitted product by one LutMatMul node (onnx-graphsurgeon).

The lookup node takes the product's input, produces the tensor the absorbed nodes produced
(after a folded Add and a fused Relu), and keeps the original node's name. Graph inputs,
outputs and every other node stay as they were; weights no node uses any more are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import external_data
from .frontend import TargetNode
from .lut import CONV_OP_TYPE, DOMAIN, K, OP_TYPE, ConvGeometry, LutParams

OPSET_VERSION = 1


@dataclass
class Replacement:
    target: TargetNode
    params: LutParams
    info: dict[str, str | int]  # descriptive attributes (partition, table loss, ...)


def lut_attributes(params: LutParams, info: dict[str, str | int] | None = None) -> dict:
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
    return {"in_channels": g.in_channels, "kernel_shape": list(g.kernel), "strides": list(g.strides),
            "pads": list(g.pads), "dilations": list(g.dilations)}


def geometry_from_node(node: onnx.NodeProto) -> ConvGeometry | None:
    """A LutConv node's patch geometry; None for a LutMatMul."""
    if node.op_type != CONV_OP_TYPE:
        return None
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    return ConvGeometry(int(a["in_channels"]), tuple(a["kernel_shape"]), tuple(a["strides"]),
                        tuple(a["pads"]), tuple(a["dilations"]))


def set_lut_attributes(node: onnx.NodeProto, params: LutParams) -> None:
    """Overwrite a LutMatMul NodeProto's numeric attributes in place (after fine-tuning)."""
    keep = [a for a in node.attribute if a.name not in lut_attributes(params)]
    del node.attribute[:]
    node.attribute.extend(keep)
    for name, value in lut_attributes(params).items():
        if isinstance(value, np.ndarray):
            value = onnx.numpy_helper.from_array(value, name)
        node.attribute.append(onnx.helper.make_attribute(name, value))


def params_from_node(node: onnx.NodeProto) -> LutParams:
    """Read a LutMatMul node's attributes back into LutParams (validated)."""
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    C = int(a["C"])
    tables = onnx.numpy_helper.to_array(a["tables"])
    return LutParams(D=int(a["D"]),
                     split_dims=np.array(a["split_dims"]).reshape(C, -1),
                     thresholds=np.array(a["thresholds"], dtype=np.float32).reshape(C, -1),
                     tables=tables, scale=a["scale"], offsets=np.array(a["offsets"]),
                     bias=np.array(a["bias"]), relu=bool(a.get("relu", 0)))


def rewrite(model: onnx.ModelProto, replacements: list[Replacement]) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    for rep in replacements:
        t = rep.target
        absorbed = [nodes[name] for name in t.absorbed]
        out = tensors[t.output_name]
        for node in absorbed:
            node.outputs.clear()
            node.inputs.clear()
        x = tensors[t.input_name]
        rank = len(x.shape) if x.shape is not None else 2  # from shape inference
        if t.transpose_input:
            x = _swap_last_axes(graph, x, f"{t.name}/lut_input", rank)
        y = gs.Variable(f"{t.name}/lut_output", dtype=np.float32) if t.transpose_output else out
        attrs = lut_attributes(rep.params, rep.info)
        if t.conv is not None:
            attrs.update(conv_attributes(t.conv))
        graph.nodes.append(gs.Node(op=CONV_OP_TYPE if t.conv is not None else OP_TYPE, name=t.name,
                                   domain=DOMAIN, attrs=_graphsurgeon_attributes(attrs), inputs=[x], outputs=[y]))
        if t.transpose_output:
            _swap_last_axes(graph, y, f"{t.name}/lut_output_T", rank, out)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result = gs.export_onnx(graph, do_type_check=False)
    _carry_model_fields(result, model)
    _drop_unused_weight_inputs(result, model)
    external_data.check_model(result)
    return result


def _swap_last_axes(graph: gs.Graph, x: gs.Tensor, name: str, rank: int,
                    out: gs.Tensor | None = None) -> gs.Tensor:
    """A Transpose node swapping the last two axes of `x`."""
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    out = out if out is not None else gs.Variable(name, dtype=np.float32)
    graph.nodes.append(gs.Node(op="Transpose", name=name, attrs={"perm": perm}, inputs=[x], outputs=[out]))
    return out


def _drop_unused_weight_inputs(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Old exporters list initializers as graph inputs too; once a replaced weight is gone,
    its input entry would become a required input, so it goes as well."""
    weights = {t.name for t in original.graph.initializer}
    used = {name for node in result.graph.node for name in node.input} | {o.name for o in result.graph.output}
    kept = {t.name for t in result.graph.initializer}
    stale = [i for i in result.graph.input if i.name in weights and i.name not in used | kept]
    for entry in stale:
        result.graph.input.remove(entry)


def _graphsurgeon_attributes(attrs: dict) -> dict:
    """graphsurgeon writes TENSOR attributes from gs.Constant values."""
    return {k: gs.Constant(k, v) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}


def _carry_model_fields(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Keep the original's IR version, metadata and opset imports, and add our domain."""
    result.ir_version = original.ir_version
    result.model_version = original.model_version
    result.doc_string = original.doc_string
    result.domain = original.domain
    result.metadata_props.extend(original.metadata_props)
    result.producer_name = "lutcompile"
    del result.opset_import[:]
    for op in original.opset_import:
        if op.domain != DOMAIN:
            result.opset_import.append(op)
    result.opset_import.append(onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION))
