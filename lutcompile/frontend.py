"""Stage 1, frontend: load an ONNX model and find the matrix products lookups can replace.

A target is a MatMul or Gemm whose weight operand is a constant. Its effective product is
normalised to ``Y = X @ W + b`` with W [D, M]: Gemm's transB, alpha, beta and C are folded in,
and so is a constant vector added right after a MatMul. A ReLU that is the product's only
consumer is recorded, so the fitter can fuse it into the lookup node. Every other matmul-like
node stays exact, with the reason recorded.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

MATMUL_OPS = ("MatMul", "Gemm")
# Activations the fitter knows how to apply (for loss-aware fitting and fusion).
ACTIVATIONS = ("Relu",)


class FrontendError(ValueError):
    """The model cannot be read or analysed."""


@dataclass
class TargetNode:
    """One matrix product the compiler will replace, normalised to Y = X @ W + b."""

    name: str
    op_type: str
    input_name: str  # the activation X [..., D]
    output_name: str  # the tensor the lookup node will produce
    weight: np.ndarray  # float32 [D, M]
    bias: np.ndarray | None  # float32 [M], or None
    absorbed: list[str]  # names of the graph nodes the lookup node replaces
    activation: str | None = None  # a fused activation ("Relu"), part of `absorbed`
    parameter_names: list[str] = field(default_factory=list)  # the constants it reads (weight, bias)

    @property
    def D(self) -> int:
        return int(self.weight.shape[0])

    @property
    def M(self) -> int:
        return int(self.weight.shape[1])


@dataclass
class SkippedNode:
    name: str
    op_type: str
    reason: str


@dataclass
class ModelAnalysis:
    model: onnx.ModelProto  # shape-inferred, every node named
    targets: list[TargetNode]
    skipped: list[SkippedNode]
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model file, with a one-line error if it is not one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FrontendError(f"model file not found: {path}")
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise FrontendError(f"{path} is not an ONNX model ({type(exc).__name__})") from exc
    if not model.graph.node:
        raise FrontendError(f"{path} is not an ONNX model (no graph nodes)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise FrontendError(f"{path} fails onnx.checker: {first}") from exc
    return model


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, so reports and rewrites can refer to it."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"{node.op_type}_{i}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)


class _Constants:
    """Constant tensors of a graph: initializers and Constant nodes."""

    def __init__(self, graph: onnx.GraphProto):
        self._initializers = {t.name: t for t in graph.initializer}
        self._constant_nodes = {
            n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output
        }

    def get(self, name: str) -> np.ndarray | None:
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name])
        node = self._constant_nodes.get(name)
        if node is None:
            return None
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name == "value_float":
                return np.array(attr.f, dtype=np.float32)
            if attr.name == "value_floats":
                return np.array(attr.floats, dtype=np.float32)
        return None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def analyse(model: onnx.ModelProto, op_types: tuple[str, ...] = MATMUL_OPS,
            fuse_activation: bool = True) -> ModelAnalysis:
    """Find the replaceable products of a model; record why the others stay exact."""
    model = onnx.shape_inference.infer_shapes(model)
    name_nodes(model)
    graph = model.graph
    constants = _Constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}

    def sole_consumer(tensor: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        if len(users) == 1 and tensor not in graph_outputs:
            return users[0]
        return None

    targets: list[TargetNode] = []
    skipped: list[SkippedNode] = []
    for node in graph.node:
        if node.op_type not in MATMUL_OPS:
            continue
        if node.op_type not in op_types:
            skipped.append(SkippedNode(node.name, node.op_type, "op type not selected"))
            continue
        found = _normalise(node, constants)
        if isinstance(found, str):
            skipped.append(SkippedNode(node.name, node.op_type, found))
            continue
        x_name, weight, bias = found
        if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
            skipped.append(SkippedNode(node.name, node.op_type, "weight or bias is not finite"))
            continue
        absorbed = [node.name]
        parameters = [n for n in node.input[1:] if n]
        out = node.output[0]
        # fold a constant vector added right after a MatMul
        nxt = sole_consumer(out)
        if node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            vec = constants.get(other)
            if vec is not None and vec.size == weight.shape[1] and vec.shape[-1:] == (weight.shape[1],):
                bias = vec.reshape(-1).astype(np.float32) + (0 if bias is None else bias)
                absorbed.append(nxt.name)
                parameters.append(other)
                out = nxt.output[0]
                nxt = sole_consumer(out)
        activation = None
        if fuse_activation and nxt is not None and nxt.op_type in ACTIVATIONS:
            activation = nxt.op_type
            absorbed.append(nxt.name)
            out = nxt.output[0]
        targets.append(TargetNode(node.name, node.op_type, x_name, out, weight.astype(np.float32),
                                  bias, absorbed, activation, parameters))
    return ModelAnalysis(model, targets, skipped,
                         [i.name for i in graph.input if constants.get(i.name) is None],
                         [o.name for o in graph.output])


def _normalise(node: onnx.NodeProto, constants: _Constants):
    """(x_name, W [D, M], bias [M] | None) for a replaceable product, or the reason it is not."""
    a_name, b_name = node.input[0], node.input[1]
    a_const, b_const = constants.get(a_name), constants.get(b_name)
    if b_const is None:
        if a_const is not None:
            return "constant operand is on the left (not supported yet)"
        return "no constant weight operand"
    if a_const is not None:
        return "both operands are constant (nothing to compute at run time)"
    if not np.issubdtype(b_const.dtype, np.floating):
        return f"weight dtype {b_const.dtype} is not floating point"
    if node.op_type == "MatMul":
        if b_const.ndim != 2:
            return f"weight has rank {b_const.ndim}, expected 2"
        return a_name, b_const.astype(np.float32), None
    # Gemm: Y = alpha * A' @ B' + beta * C
    if _attr(node, "transA", 0):
        return "Gemm with transA=1 (not supported yet)"
    weight = b_const.T if _attr(node, "transB", 0) else b_const
    if weight.ndim != 2:
        return f"weight has rank {weight.ndim}, expected 2"
    weight = np.float32(_attr(node, "alpha", 1.0)) * weight.astype(np.float32)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = constants.get(node.input[2])
        if c is None:
            return "Gemm bias C is not constant"
        if c.size not in (1, weight.shape[1]) or (c.ndim == 2 and c.shape[0] != 1):
            return f"Gemm bias C of shape {c.shape} is not a row vector"
        bias = np.float32(_attr(node, "beta", 1.0)) * np.broadcast_to(
            c.astype(np.float32).reshape(-1), (weight.shape[1],))
        bias = np.ascontiguousarray(bias, dtype=np.float32)
    return a_name, weight, bias
