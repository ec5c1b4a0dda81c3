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

from . import external_data
from .lut import ConvGeometry, im2col_reference

MATMUL_OPS = ("MatMul", "Gemm")
PRODUCT_OPS = ("MatMul", "Gemm", "Conv")
# A Conv patch narrower than this costs fewer multiply-adds per output than the lookups and
# the encode would: the node stays exact.
MIN_CONV_PATCH = 16
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
    transpose_input: bool = False  # X is the input with its last two axes swapped
    transpose_output: bool = False  # the node's output is Y with its last two axes swapped
    conv: ConvGeometry | None = None  # a Conv: rows are the input's patches

    def rows(self, value: np.ndarray, rng: np.random.Generator | None = None,
             per_image: int | None = None) -> np.ndarray:
        """The rows [n, D] this node multiplies, from one batch of its input tensor.

        For a Conv, `per_image` patches per image are sampled (all when None), so the
        stored calibration rows stay bounded.
        """
        if self.conv is not None:
            N, _, H, W = value.shape
            OH, OW = self.conv.output_size(H, W)
            if per_image is None or per_image >= OH * OW:
                return im2col_reference(value, self.conv)
            rng = rng or np.random.default_rng(0)
            chosen = np.concatenate([n * OH * OW + np.sort(rng.choice(OH * OW, per_image, replace=False))
                                     for n in range(N)])
            return im2col_reference(value, self.conv, chosen)
        if self.transpose_input:
            value = np.swapaxes(value, -1, -2)
        return value.reshape(-1, value.shape[-1])

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
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise FrontendError(f"{path} is not an ONNX model ({type(exc).__name__})") from exc
    _load_external_data(model, os.path.dirname(os.path.abspath(path)))
    if not model.graph.node:
        raise FrontendError(f"{path} is not an ONNX model (no graph nodes)")
    try:
        external_data.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise FrontendError(f"{path} fails onnx.checker: {first}") from exc
    return model


def _nested_tensors(graph: onnx.GraphProto, with_initializers: bool):
    """Tensors of Constant-like attributes and subgraphs (and, if asked, the graph's initializers)."""
    if with_initializers:
        yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            for g in list(a.graphs) + ([a.g] if a.type == onnx.AttributeProto.GRAPH else []):
                yield from _nested_tensors(g, True)


def _load_external_data(model: onnx.ModelProto, folder: str) -> None:
    """Map the tensors stored beside the model, refusing any location outside its folder.

    Initializers stay outside the proto (see external_data.py), so a model over 2 GB loads;
    the rare external tensor elsewhere (a Constant node, a subgraph) is read into the proto.
    """
    def mapped(t: onnx.TensorProto) -> np.ndarray:
        try:
            return external_data.map_file(t, folder)
        except external_data.ExternalDataError as exc:
            raise FrontendError(str(exc)) from exc

    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            external_data.attach(t, mapped(t))
    for t in _nested_tensors(model.graph, with_initializers=False):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.CopyFrom(numpy_helper.from_array(np.asarray(mapped(t)), t.name))


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
            return external_data.tensor_array(self._initializers[name])
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


def analyse(model: onnx.ModelProto, op_types: tuple[str, ...] = PRODUCT_OPS,
            fuse_activation: bool = True) -> ModelAnalysis:
    """Find the replaceable products of a model; record why the others stay exact."""
    model = external_data.infer_shapes(model)
    name_nodes(model)
    graph = model.graph
    constants = _Constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {o.name for o in graph.output}
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
              for vi in list(graph.input) + list(graph.value_info) + list(graph.output)
              if vi.type.tensor_type.HasField("shape")}
    ranks = {name: len(dims) for name, dims in shapes.items()}

    def sole_consumer(tensor: str) -> onnx.NodeProto | None:
        users = consumers.get(tensor, [])
        if len(users) == 1 and tensor not in graph_outputs:
            return users[0]
        return None

    targets: list[TargetNode] = []
    skipped: list[SkippedNode] = []
    for node in graph.node:
        if node.op_type not in PRODUCT_OPS:
            continue
        if node.op_type not in op_types:
            skipped.append(SkippedNode(node.name, node.op_type, "op type not selected"))
            continue
        found = _normalise_conv(node, constants, shapes) if node.op_type == "Conv" else \
            _normalise(node, constants, ranks)
        if isinstance(found, str):
            skipped.append(SkippedNode(node.name, node.op_type, found))
            continue
        x_name, weight, bias, flip_in, flip_out, *conv = found
        if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
            skipped.append(SkippedNode(node.name, node.op_type, "weight or bias is not finite"))
            continue
        absorbed = [node.name]
        parameters = [n for n in node.input if n and n != x_name]
        out = node.output[0]
        # fold a constant vector added right after a MatMul
        nxt = sole_consumer(out)
        if node.op_type == "MatMul" and not flip_out and nxt is not None and nxt.op_type == "Add":
            other = nxt.input[1] if nxt.input[0] == out else nxt.input[0]
            vec = constants.get(other)
            if vec is not None and vec.size == weight.shape[1] and vec.shape[-1:] == (weight.shape[1],):
                bias = vec.reshape(-1).astype(np.float32) + (0 if bias is None else bias)
                absorbed.append(nxt.name)
                parameters.append(other)
                out = nxt.output[0]
                nxt = sole_consumer(out)
        activation = None
        if fuse_activation and not flip_out and nxt is not None and nxt.op_type in ACTIVATIONS:
            activation = nxt.op_type
            absorbed.append(nxt.name)
            out = nxt.output[0]
        targets.append(TargetNode(node.name, node.op_type, x_name, out, weight.astype(np.float32),
                                  bias, absorbed, activation, parameters, flip_in, flip_out,
                                  conv[0] if conv else None))
    return ModelAnalysis(model, targets, skipped,
                         [i.name for i in graph.input if constants.get(i.name) is None],
                         [o.name for o in graph.output])


def _normalise(node: onnx.NodeProto, constants: _Constants, ranks: dict[str, int]):
    """The product as Y = X @ W + b, or the reason it cannot be replaced.

    Returns (x_name, W [D, M], bias [M] | None, transpose_input, transpose_output): when the
    constant is the left operand, Y = W' X is computed as (X^T W'^T)^T, so the lookup node
    sits between two transposes of the last two axes; Gemm's transA on the activation is a
    transpose of the input.
    """
    a_name, b_name = node.input[0], node.input[1]
    a_const, b_const = constants.get(a_name), constants.get(b_name)
    if a_const is not None and b_const is not None:
        return "both operands are constant (nothing to compute at run time)"
    if a_const is None and b_const is None:
        return "no constant weight operand"
    const = b_const if b_const is not None else a_const
    if not np.issubdtype(const.dtype, np.floating):
        return f"weight dtype {const.dtype} is not floating point"
    if const.ndim != 2:
        return f"weight has rank {const.ndim}, expected 2"
    const = const.astype(np.float32)
    if node.op_type == "MatMul":
        if b_const is not None:
            return a_name, const, None, False, False
        rank = ranks.get(b_name)
        if rank is None:
            return "constant operand is on the left and the activation's rank is unknown"
        # A @ X with X [..., D, N]: (X^T @ A^T)^T; a 1-D X needs no transposes
        return b_name, np.ascontiguousarray(const.T), None, rank >= 2, rank >= 2
    # Gemm: Y = alpha * A' @ B' + beta * C, with A' = A^T if transA, B' = B^T if transB
    alpha = np.float32(_attr(node, "alpha", 1.0))
    trans_a, trans_b = bool(_attr(node, "transA", 0)), bool(_attr(node, "transB", 0))
    if b_const is not None:
        x_name, weight, flip_in, flip_out = a_name, (const.T if trans_b else const), trans_a, False
    else:  # Y^T = B'^T A'^T: the activation B' transposed is the input
        x_name, weight, flip_in, flip_out = b_name, (const if trans_a else const.T), not trans_b, True
    weight = np.ascontiguousarray(alpha * weight, dtype=np.float32)
    M = weight.shape[1]
    bias = None
    if len(node.input) > 2 and node.input[2]:
        c = constants.get(node.input[2])
        if c is None:
            return "Gemm bias C is not constant"
        c = c.astype(np.float32)
        # C must be constant along the rows of the (possibly transposed) output
        along = (1, M) if not flip_out else (M, 1)
        if c.size == 1:
            c = np.full(M, c.reshape(()), np.float32)
        elif c.shape in (along, (M,) if not flip_out else ()):
            c = c.reshape(-1)
        else:
            return f"Gemm bias C of shape {c.shape} is not a vector along the output features"
        bias = np.ascontiguousarray(np.float32(_attr(node, "beta", 1.0)) * c, dtype=np.float32)
    return x_name, weight, bias, flip_in, flip_out


def _normalise_conv(node: onnx.NodeProto, constants: _Constants, shapes: dict[str, list]):
    """A 2-D, group-1 Conv with a constant weight as patches @ W + b, or why it stays exact."""
    weight = constants.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return "no constant weight operand"
    if constants.get(node.input[0]) is not None:
        return "both operands are constant (nothing to compute at run time)"
    if weight.ndim != 4:
        return f"{weight.ndim - 2}-D convolution (only 2-D is supported)"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"weight dtype {weight.dtype} is not floating point"
    group = _attr(node, "group", 1)
    if group != 1:
        kind = "depthwise" if group == weight.shape[0] and weight.shape[1] == 1 else "grouped"
        return f"{kind} convolution (group={group}): each output sees too few inputs to pay"
    M, Cin, kh, kw = weight.shape
    if Cin * kh * kw < MIN_CONV_PATCH:
        return (f"patch of {Cin}x{kh}x{kw} = {Cin * kh * kw} inputs is too small to pay "
                f"(lookups need at least {MIN_CONV_PATCH})")
    strides = tuple(_attr(node, "strides", [1, 1]))
    dilations = tuple(_attr(node, "dilations", [1, 1]))
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    pads = list(_attr(node, "pads", [0, 0, 0, 0]))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        dims = shapes.get(node.input[0])
        if not dims or None in dims[2:]:
            return f"auto_pad={auto_pad} with an unknown input size"
        pads = [0, 0, 0, 0]
        for axis, (size, k, s, d) in enumerate(zip(dims[2:], (kh, kw), strides, dilations)):
            total = max(0, (-(-size // s) - 1) * s + d * (k - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            pads[axis], pads[axis + 2] = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    geometry = ConvGeometry(Cin, (kh, kw), strides, tuple(pads), dilations)
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = constants.get(node.input[2])
        if bias is None:
            return "Conv bias is not constant"
        bias = bias.astype(np.float32).reshape(-1)
    W = np.ascontiguousarray(weight.reshape(M, -1).T, dtype=np.float32)  # [D, M], d = (c*kh+ky)*kw+kx
    return node.input[0], W, bias, False, False, geometry
