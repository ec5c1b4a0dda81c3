"""Stage 4, rewrite: replace each fitted product by its new node (onnx-graphsurgeon).

The new node (LutMatMul, LutConv, ...: the replacement method's) takes the product's input, produces the tensor the absorbed nodes produced
(after a folded bias Add or BatchNormalization and a fused Relu), and keeps the original
node's name. Graph inputs, outputs and every other node stay as they were; weights no node
uses any more are dropped (from the graph inputs too, where an old exporter listed them there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..onnx_io import external_data
from .frontend import TargetNode
from ..ops.spec import DOMAIN

OPSET_VERSION = 1


@dataclass
class Replacement:
    """The node that takes a target's place: what a replacement method (compile/methods.py) fitted."""

    target: TargetNode
    op_type: str
    domain: str
    attributes: dict  # values as onnx.helper.make_attribute takes them (numpy arrays: TENSOR)


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
        graph.nodes.append(gs.Node(op=rep.op_type, name=t.name, domain=rep.domain,
                                   attrs=_graphsurgeon_attributes(rep.attributes), inputs=[x], outputs=[y]))
        if t.transpose_output:
            _swap_last_axes(graph, y, f"{t.name}/lut_output_T", rank, out)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result = gs.export_onnx(graph, do_type_check=False)
    _carry_model_fields(result, model)
    _keep_weight_inputs(result, model)
    external_data.check_model(result)
    return result


def _swap_last_axes(graph: gs.Graph, x: gs.Tensor, name: str, rank: int,
                    out: gs.Tensor | None = None) -> gs.Tensor:
    """A Transpose node swapping the last two axes of `x`."""
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    out = out if out is not None else gs.Variable(name, dtype=np.float32)
    graph.nodes.append(gs.Node(op="Transpose", name=name, attrs={"perm": perm}, inputs=[x], outputs=[out]))
    return out


def _keep_weight_inputs(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """List the weights as graph inputs again where the original did.

    onnx-graphsurgeon drops every initializer from the graph inputs, but old exporters list
    them there too, and below IR 4 the format requires it (onnx.checker: "in initializer but
    not in graph input"). Each weight that is still an initializer gets its original input
    entry back, in the original order; below IR 4, so does every other initializer. The
    weights of replaced nodes are gone from both.
    """
    weights = {t.name for t in result.graph.initializer}
    listed = {i.name: i for i in result.graph.input}
    inputs = [listed.pop(i.name, i) for i in original.graph.input if i.name in listed or i.name in weights]
    inputs += listed.values()
    if result.ir_version < 4:
        named = {i.name for i in inputs}
        inputs += [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in result.graph.initializer if t.name not in named]
    del result.graph.input[:]
    result.graph.input.extend(inputs)


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
