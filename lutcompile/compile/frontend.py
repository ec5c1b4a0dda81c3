"""Stage 1, frontend: load an ONNX model and find the matrix products lookups can replace.

A target is a MatMul, Gemm or Conv whose weight operand is a constant: an initializer, a
Constant node, or either behind layout ops (Reshape, Transpose, Cast, ...; see FOLDABLE_OPS).
Its effective product is normalised to ``Y = X @ W + b`` with W [D, M]: Gemm's transB, alpha,
beta and C are folded in, and so are the per-channel affine maps right after the product (a
constant bias Add, an inference-mode BatchNormalization). A ReLU that is the product's only
consumer then is recorded, so the fitter can fuse it into the lookup node. Every other
matmul-like node stays exact, with the reason recorded.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from ..onnx_io import external_data
from ..ops.spec import ConvGeometry, im2col_reference
from ..errors import OptionsError

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
             per_image: int | None = None, keep: np.ndarray | None = None) -> np.ndarray:
        """The rows [n, D] this node multiplies, from one batch of its input tensor.

        For a Conv, `per_image` patches per image are sampled (all when None), so the
        stored calibration rows stay bounded. `keep`, a boolean [batch, tokens] mask, drops
        the rows of positions it marks False, where this node's rows are laid out that way.
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
        drop_masked = keep is not None and self.masked(value, keep)
        if self.transpose_input:
            value = np.swapaxes(value, -1, -2)
        if drop_masked:
            return value[keep]
        return value.reshape(-1, value.shape[-1])

    def masked(self, value: np.ndarray, keep: np.ndarray) -> bool:
        """Whether a mask of shape keep.shape lays out this node's rows: its input `value` is
        [batch, tokens, D] (after any transpose), not a Conv's image."""
        if self.transpose_input:
            value = np.swapaxes(value, -1, -2)
        return self.conv is None and value.shape[:-1] == keep.shape

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


@dataclass(frozen=True)
class FrontendOptions:
    """Which nodes the frontend offers for replacement."""

    op_types: tuple[str, ...] = PRODUCT_OPS
    fuse_activation: bool = True  # absorb a Relu that is the product's only consumer
    nodes_to_include: tuple[str, ...] | None = None  # only these (None: every target)
    nodes_to_exclude: tuple[str, ...] = ()


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


# Ops through which a weight stays a constant: exporters store a weight reshaped (CNTK's
# mnist-8 keeps its MatMul weight [16, 4, 4, 10] behind a Reshape to [256, 10]), transposed,
# cast, or as a Constant node. Only these are evaluated; anything else is not a constant.
FOLDABLE_OPS = ("Constant", "Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Cast")


class _Constants:
    """Constant tensors of a graph: initializers, and the outputs of FOLDABLE_OPS nodes whose
    inputs are all constant (Constant nodes included), evaluated by onnx.reference at the
    model's opset."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self._initializers = {t.name: t for t in graph.initializer}
        self._producers = {out: n for n in graph.node if n.op_type in FOLDABLE_OPS and n.domain in ("", "ai.onnx")
                           for out in n.output}
        self._opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        self._folded: dict[str, np.ndarray | None] = {}

    def get(self, name: str) -> np.ndarray | None:
        if name in self._initializers:
            return external_data.tensor_array(self._initializers[name])
        if name not in self._folded:
            self._folded[name] = self._fold(name)
        return self._folded[name]

    def sources(self, name: str) -> list[str]:
        """The initializers and Constant nodes' outputs a constant is computed from, those of
        a floating-point type only (the ones training could change), in graph order."""
        node = self._producers.get(name)
        if node is None or node.op_type == "Constant":
            value = self.get(name)
            return [name] if value is not None and np.issubdtype(value.dtype, np.floating) else []
        return list(dict.fromkeys(s for i in node.input if i for s in self.sources(i)))

    def _fold(self, name: str) -> np.ndarray | None:
        node = self._producers.get(name)
        if node is None:
            return None
        feeds = {i: self.get(i) for i in node.input if i}
        if any(v is None for v in feeds.values()):
            return None
        feeds = {k: np.asarray(v) for k, v in feeds.items()}
        inputs = [onnx.helper.make_tensor_value_info(k, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None)
                  for k, v in feeds.items()]
        graph = onnx.helper.make_graph([node], "fold", inputs,
                                       [onnx.helper.make_empty_tensor_value_info(o) for o in node.output])
        try:
            values = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=self._opsets)).run(None, feeds)
        except Exception:  # an attribute or a type the reference runtime refuses: not a constant
            return None
        return np.asarray(values[list(node.output).index(name)])


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
    constants = _Constants(model)
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
        absorbed = [node.name]
        parameters = [s for n in node.input if n and n != x_name for s in constants.sources(n)]
        out = node.output[0]
        nxt = sole_consumer(out)
        # fold the per-channel affine maps right after the product: a constant Add, an
        # inference BatchNormalization (the exporter's, when it did not fold it itself)
        rank = 4 if conv else ranks.get(out)
        while not flip_out and nxt is not None:
            affine = _channel_affine(nxt, out, constants, weight.shape[1], -3 if conv else -1, rank)
            if affine is None:
                break
            scale, shift, read = affine
            if scale is not None:
                weight = weight * scale
                bias = None if bias is None else bias * scale
            bias = shift if bias is None else bias + shift
            absorbed.append(nxt.name)
            parameters += read
            out = nxt.output[0]
            nxt = sole_consumer(out)
        if not np.all(np.isfinite(weight)) or (bias is not None and not np.all(np.isfinite(bias))):
            skipped.append(SkippedNode(node.name, node.op_type, "weight or bias is not finite"))
            continue
        activation = None
        if fuse_activation and not flip_out and nxt is not None and nxt.op_type in ACTIVATIONS:
            activation = nxt.op_type
            absorbed.append(nxt.name)
            out = nxt.output[0]
        targets.append(TargetNode(node.name, node.op_type, x_name, out, weight.astype(np.float32),
                                  None if bias is None else bias.astype(np.float32), absorbed, activation,
                                  parameters, flip_in, flip_out, conv[0] if conv else None))
    return ModelAnalysis(model, targets, skipped,
                         [i.name for i in graph.input if constants.get(i.name) is None],
                         [o.name for o in graph.output])


def _channel_affine(node: onnx.NodeProto, product: str, constants: _Constants, M: int, channel: int,
                    rank: int | None):
    """`node` as y = product * scale + shift with one value per output channel, or None.

    The channels are the product's output axis `channel` (from the end: -1 for a matrix
    product, -3 for a Conv's NCHW) of an output of rank `rank` (None: unknown). Returns
    (scale [M] or None, shift [M], the floating-point constants read), for an Add of a
    constant that broadcasts along the channels, or a BatchNormalization in inference mode
    with constant statistics over axis 1.
    """
    if node.op_type == "Add":
        other = node.input[1] if node.input[0] == product else node.input[0]
        shift = _per_channel(constants.get(other), M, channel, rank)
        return None if shift is None else (None, shift, constants.sources(other))
    if node.op_type != "BatchNormalization" or node.input[0] != product or len(node.input) != 5:
        return None
    if rank is None or rank + channel != 1 or len([o for o in node.output if o]) != 1 \
            or _attr(node, "training_mode", 0) or not _attr(node, "spatial", 1):
        return None
    gamma, beta, mean, var = (_per_channel(constants.get(n), M, -1, 1) for n in node.input[1:])
    if gamma is None or beta is None or mean is None or var is None:
        return None
    scale = gamma / np.sqrt(var + np.float32(_attr(node, "epsilon", 1e-5)))
    return scale, beta - mean * scale, [s for n in node.input[1:3] for s in constants.sources(n)]


def _per_channel(value: np.ndarray | None, M: int, channel: int, rank: int | None) -> np.ndarray | None:
    """`value` as float32 [M] if, broadcast against an output of rank `rank` (None: unknown),
    it holds one value per channel (axis `channel` from the end) or one for all; else None."""
    if value is None or not np.issubdtype(value.dtype, np.floating) or (rank is not None and value.ndim > rank):
        return None
    if value.size == 1:
        return np.full(M, value.reshape(()), np.float32)
    if value.size == M and value.ndim >= -channel and value.shape[channel] == M:
        return value.reshape(-1).astype(np.float32)
    return None


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
        stored = constants.get(node.input[2])
        if stored is None:
            return "Gemm bias C is not constant"
        # C must be constant along the rows of the output [N, M] (transposed: [M, N])
        c = _per_channel(stored, M, -2 if flip_out else -1, 2)
        if c is None:
            return f"Gemm bias C of shape {stored.shape} is not a vector along the output features"
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


def select_targets(analysis: ModelAnalysis, options: FrontendOptions) -> list[TargetNode]:
    """The targets options include and do not exclude; the others join analysis.skipped.

    Names must be MatMul, Gemm or Conv nodes of the model (targets or skipped)."""
    include, exclude = options.nodes_to_include, set(options.nodes_to_exclude)
    names = {t.name for t in analysis.targets} | {s.name for s in analysis.skipped}
    for name in list(include or ()) + sorted(exclude):
        if name not in names:
            raise OptionsError(f"node '{name}' is not a MatMul, Gemm or Conv node of the model")
    chosen = []
    for t in analysis.targets:
        if include is not None and t.name not in include:
            analysis.skipped.append(SkippedNode(t.name, t.op_type, "not in nodes_to_include"))
        elif t.name in exclude:
            analysis.skipped.append(SkippedNode(t.name, t.op_type, "in nodes_to_exclude"))
        else:
            chosen.append(t)
    return chosen
