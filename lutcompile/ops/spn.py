"""StrassenNets' sum-product layer (Tschannen, Khanna and Anandkumar 2018), the second
replacement method's arithmetic (issue 16): its parameters, a numpy reference, its operation
count, the ternarisation and the initialisation from a layer, and a lowering to standard ONNX
ops that any onnxruntime runs.

A layer y = x W + b (x [n, D], W [D, M], the ONNX row convention) becomes

    y = ((x @ Wb.T) * a) @ Wc.T + b

with Wb in {-1, 0, 1}^{r x D}, a in R^r and Wc in {-1, 0, 1}^{M x r}. The r products with `a`
are the only multiplications: the hidden width r is the multiplication budget; the ternary
products are additions and subtractions.

With `uint8_activations`, each product's input row is quantised on the fly to 8 bits (per row:
its minimum, and a step of (max - min) / 255) and the ternary products are integer sums, which
a CPU computes as int8 dot products (docs/lutmatmul.md, `activations = 1`); the quantisation
costs D + R divisions and 2 (R + M) multiplications per row more (operations()).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
import scipy.linalg
from onnx import helper, numpy_helper

from ..errors import OptionsError
from .node_format import geometry_from_node
from .spec import DOMAIN, SPN_CONV_OP_TYPE, SPN_OP_TYPE, SPN_OP_TYPES, ConvGeometry, im2col_reference

TWN_THRESHOLD = 0.7  # Li & Liu's ternary weight networks: keep |w| > 0.7 mean |w|, as the authors' code


# with uint8 activations, D and R are at most this: 255 * 2^23 sums in int32
UINT8_MAX_INPUTS = 1 << 23


@dataclass(frozen=True)
class SpnParams:
    """One sum-product layer: wb int8 [r, D], a float32 [r], wc int8 [M, r], bias float32 [M];
    uint8_activations: each product's input rows quantised to 8 bits (quantize_rows)."""

    wb: np.ndarray
    a: np.ndarray
    wc: np.ndarray
    bias: np.ndarray
    uint8_activations: bool = False

    def __post_init__(self):
        r, D = self.wb.shape
        M = self.wc.shape[0]
        if self.a.shape != (r,) or self.wc.shape != (M, r) or self.bias.shape != (M,):
            raise OptionsError(f"sum-product shapes disagree: wb {self.wb.shape}, a {self.a.shape}, "
                               f"wc {self.wc.shape}, bias {self.bias.shape}")
        for name in ("wb", "wc"):
            values = getattr(self, name)
            if not np.isin(values, (-1, 0, 1)).all():
                raise OptionsError(f"sum-product {name} must be ternary (-1, 0, 1)")
        if self.uint8_activations and max(D, r) > UINT8_MAX_INPUTS:
            raise OptionsError(f"with uint8 activations D and r are at most 2^23, got {D} and {r}")

    @property
    def width(self) -> int:
        return len(self.a)

    @property
    def sparsity(self) -> tuple[float, float]:
        """The fraction of zeros in wb and in wc."""
        return float(np.mean(self.wb == 0)), float(np.mean(self.wc == 0))


def reference(x: np.ndarray, params: SpnParams) -> np.ndarray:
    """y = ((x Wb^T) a) Wc^T + b, in float64 (the independent reference of every path)."""
    hidden = np.asarray(x, np.float64) @ params.wb.T.astype(np.float64)
    return (hidden * params.a.astype(np.float64)) @ params.wc.T.astype(np.float64) + params.bias


@dataclass(frozen=True)
class OperationCount:
    """Per input row: multiplications and additions (a subtraction counts as an addition)."""

    multiplications: int
    additions: int


def operations(params: SpnParams) -> OperationCount:
    """The sum-product layer's count: each hidden unit adds its nonzero inputs (k nonzeros, k - 1
    additions), multiplies once by a; each output adds its nonzero hidden units and the bias.
    With uint8 activations, quantize_rows and dequantize: per row a subtraction and a division
    per input of each product (D + R), and per output of each product two multiplications and
    an addition (R + M)."""
    per_hidden = np.count_nonzero(params.wb, axis=1)
    per_output = np.count_nonzero(params.wc, axis=1)
    # an output of j nonzeros: j - 1 additions, and one for the bias (none when j = 0: y = b)
    additions = int(np.maximum(per_hidden - 1, 0).sum()) + int(per_output.sum())
    (r, D), M = params.wb.shape, params.wc.shape[0]
    quantized = params.uint8_activations
    return OperationCount(multiplications=multiplications(D, M, r, quantized),
                          additions=additions + ((D + r) + (r + M) if quantized else 0))


def multiplications(D: int, M: int, r: int, uint8_activations: bool = False) -> int:
    """A sum-product layer's multiplications per row: r, and with uint8 activations the
    quantisation's D + r divisions and the dequantisation's 2 (r + M) multiplications."""
    return r + ((D + r) + 2 * (r + M) if uint8_activations else 0)


def exact_operations(D: int, M: int) -> OperationCount:
    """The exact layer's count: D multiplications per output, D - 1 additions and the bias."""
    return OperationCount(multiplications=D * M, additions=D * M)


def ternarize(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """TWN (Li & Liu 2016) along slices of `axis`: t = sign(w) where |w| > 0.7 mean|w|, else 0,
    and the scale s = mean |w| over the kept entries, so that w ~ s t. Returns (t int8, s)."""
    w = np.asarray(w, np.float64)
    magnitude = np.abs(w)
    threshold = TWN_THRESHOLD * magnitude.mean(axis=axis, keepdims=True)
    kept = magnitude > threshold
    count = kept.sum(axis=axis, keepdims=True)
    scale = np.where(count > 0, (magnitude * kept).sum(axis=axis, keepdims=True) / np.maximum(count, 1), 0.0)
    return (np.sign(w) * kept).astype(np.int8), np.squeeze(scale, axis=axis)


def full_precision_init(weight: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real-valued sum-product layer equal to x W when width >= rank W, from the SVD
    W = U S V^T [D, M]: Wb = U^T [r, D], a = S, Wc = V [M, r] (truncated below the rank)."""
    U, S, Vt = np.linalg.svd(np.asarray(weight, np.float64), full_matrices=False)
    r = min(width, len(S))
    wb, a, wc = U[:, :r].T, S[:r], Vt[:r].T
    if width > r:  # hidden units past the rank: zero, for later training to use
        wb = np.vstack([wb, np.zeros((width - r, wb.shape[1]))])
        a = np.concatenate([a, np.zeros(width - r)])
        wc = np.hstack([wc, np.zeros((wc.shape[0], width - r))])
    return wb, a, wc


def ternary_init(weight: np.ndarray, bias: np.ndarray | None, width: int,
                 uint8_activations: bool = False) -> SpnParams:
    """The SVD initialisation ternarised: Wb per hidden unit (row), Wc per hidden unit (column);
    both scales fold into `a`, so the layer stays y = Wc (a * Wb x) + b with ternary Wb, Wc."""
    wb, a, wc = full_precision_init(weight, width)
    tb, sb = ternarize(wb, axis=1)
    tc, sc = ternarize(wc, axis=0)
    M = np.asarray(weight).shape[1]
    return SpnParams(tb, (a * sb * sc).astype(np.float32), tc,
                     np.zeros(M, np.float32) if bias is None else np.asarray(bias, np.float32), uint8_activations)


def fit_scales(X: np.ndarray, params: SpnParams, target: np.ndarray, ridge: float = 1e-6) -> SpnParams:
    """`params` with `a` refitted by least squares so that the layer reproduces `target` [n, M]
    (x W + b, say) on the rows X [n, D]: y - b is linear in a, sum_k a_k h_k(x) wc[:, k] with
    h = x Wb^T, so the normal equations are ((H^T H) * (Wc^T Wc)) a = diag(H^T (T - b) Wc), an
    r x r system (scipy.linalg.solve; `ridge` times its mean diagonal keeps dead units at 0)."""
    H = np.asarray(X, np.float64) @ params.wb.T.astype(np.float64)
    wc = params.wc.astype(np.float64)
    gram = (H.T @ H) * (wc.T @ wc)
    rhs = np.sum(H * ((np.asarray(target, np.float64) - params.bias) @ wc), axis=0)
    lam = ridge * max(float(np.mean(np.diag(gram))), 1e-30)
    a = scipy.linalg.solve(gram + lam * np.eye(len(gram)), rhs, assume_a="pos")
    return replace(params, a=a.astype(np.float32))


def fit_layer(X: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, width: int,
              target: np.ndarray | None = None, uint8_activations: bool = False) -> SpnParams:
    """The untrained sum-product layer of y = x W + b at hidden width `width`: the ternarised
    SVD (ternary_init), its `a` refitted on the rows X to `target` (default x W + b) as a float
    layer (the least squares see no quantisation)."""
    params = ternary_init(weight, bias, width, uint8_activations)
    if target is None:
        target = np.asarray(X, np.float64) @ np.asarray(weight, np.float64) + params.bias
    return fit_scales(X, params, target)


@dataclass(frozen=True)
class LayerCount:
    """What report.json, inspect and diff say of one sum-product node, per input row."""

    width: int  # r, the multiplications
    multiplications: int
    additions: int
    exact_multiplications: int  # the D x M product's
    exact_additions: int
    wb_zeros: float  # the fraction of zeros in Wb and in Wc
    wc_zeros: float
    activations: str = "float32"  # or "uint8": quantised per row, counted in the operations

    @classmethod
    def of(cls, params: SpnParams) -> "LayerCount":
        ops, exact = operations(params), exact_operations(params.wb.shape[1], params.wc.shape[0])
        return cls(params.width, ops.multiplications, ops.additions, exact.multiplications, exact.additions,
                   *params.sparsity, "uint8" if params.uint8_activations else "float32")




def is_spn(node: onnx.NodeProto) -> bool:
    """An SpnMatMul or SpnConv node of our domain."""
    return node.domain == DOMAIN and node.op_type in SPN_OP_TYPES


def pack_ternary(t: np.ndarray) -> np.ndarray:
    """A ternary matrix [rows, cols] as the op stores it: uint8 [rows, ceil(cols / 4)], weight i
    of a row in bits 2(i mod 4) and 2(i mod 4) + 1 of byte i // 4 (0 -> 0, +1 -> 1, -1 -> 2)."""
    t = np.asarray(t)
    codes = np.where(t == 1, 1, np.where(t == -1, 2, 0)).astype(np.uint8)
    codes = np.pad(codes, ((0, 0), (0, (-t.shape[1]) % 4))).reshape(t.shape[0], -1, 4)
    return (codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6).astype(np.uint8)


def unpack_ternary(packed: np.ndarray, cols: int) -> np.ndarray:
    """pack_ternary's inverse: int8 [rows, cols] (code 3 reads as 0 here; the kernel refuses it)."""
    packed = np.asarray(packed, np.uint8)
    codes = (packed[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    codes = codes.reshape(packed.shape[0], -1)[:, :cols]
    return np.where(codes == 1, 1, np.where(codes == 2, -1, 0)).astype(np.int8)


def _fold(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """For each row j of ternary t [R, D]: ((0 + x[:, p1]) + x[:, p2] ...) - x[:, q1] - ..., over
    its +1 inputs p ascending, then its -1 inputs q, every step a float32 add or subtract: the
    kernel's order (custom_ops/spnkernel.h), all rows j and inputs n at once, step by step."""
    h = np.zeros((x.shape[0], t.shape[0]), np.float32)
    for sign in (1, -1):
        lists = [np.flatnonzero(row == sign) for row in t]
        steps = max((len(v) for v in lists), default=0)
        index = np.array([np.pad(v, (0, steps - len(v)), constant_values=-1) for v in lists]).reshape(len(t), steps)
        for k in range(steps):
            rows = np.flatnonzero(index[:, k] >= 0)
            values = x[:, index[rows, k]]
            h[:, rows] = h[:, rows] + values if sign == 1 else h[:, rows] - values
    return h


def quantize_rows(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each row of v [n, K] float32 as 8 bits (docs/lutmatmul.md, activations = 1): lo = its
    minimum, step = (max - lo) / 255 (1 where that is 0), q = rint((v - lo) / step) clipped to
    [0, 255], every step a float32 operation. Returns (q int64, lo, step, bad): bad marks rows
    holding a non-finite value or whose max - lo is not finite, whose outputs are NaN."""
    v = np.asarray(v, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(v).all(axis=1)
        safe = np.where(finite[:, None], v, np.float32(0))
        lo, hi = safe.min(axis=1), safe.max(axis=1)
        span = hi - lo
        bad = ~finite | ~np.isfinite(span)
        step = span / np.float32(255)
        step = np.where((step == 0) | bad, np.float32(1), step).astype(np.float32)
        q = np.rint((safe - lo[:, None]) / step[:, None])
    return np.clip(np.where(bad[:, None], 0, q), 0, 255).astype(np.int64), lo, step, bad


def _quantized_product(v: np.ndarray, t: np.ndarray) -> np.ndarray:
    """v [n, K] times ternary t [J, K]^T through quantize_rows: the integer sums acc = q t^T,
    then step * float(acc) + lo * float(sum of each row of t), each a float32 operation; NaN on
    bad rows."""
    q, lo, step, bad = quantize_rows(v)
    acc = (q @ t.T.astype(np.int64)).astype(np.float32)
    sums = t.astype(np.int64).sum(axis=1).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        out = step[:, None] * acc + lo[:, None] * sums[None, :]
    return np.where(bad[:, None], np.float32(np.nan), out).astype(np.float32)


def kernel_reference(x: np.ndarray, params: SpnParams, relu: bool = False) -> np.ndarray:
    """SpnMatMul in numpy, bit for bit the kernel's float32 arithmetic (docs/lutmatmul.md)."""
    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    product = _quantized_product if params.uint8_activations else _fold
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN here as in the kernel
        s = product(flat, params.wb) * params.a.astype(np.float32)
        y = product(s, params.wc) + params.bias.astype(np.float32)
    if relu:
        y = np.where(y > 0, y, np.float32(0))
    return y.astype(np.float32).reshape(*lead, params.wc.shape[0])


def conv_reference(X: np.ndarray, params: SpnParams, g: ConvGeometry, relu: bool = False) -> np.ndarray:
    """SpnConv in numpy, bit for bit the kernel: the layer on each patch of X [N, Cin, H, W]
    (spec.im2col_reference, zeros in the padding), written [N, M, OH, OW]."""
    N, _, H, W = np.shape(X)
    OH, OW = g.output_size(H, W)
    rows = kernel_reference(im2col_reference(X, g), params, relu)  # [N * OH * OW, M]
    return np.ascontiguousarray(rows.reshape(N, OH, OW, params.wc.shape[0]).transpose(0, 3, 1, 2))


def node_attributes(params: SpnParams, relu: bool = False) -> dict:
    """The SpnMatMul node's attributes (values as onnx.helper.make_attribute takes them)."""
    r, D = params.wb.shape
    return {"D": int(D), "M": int(params.wc.shape[0]), "R": int(r), "wb": pack_ternary(params.wb),
            "a": [float(v) for v in params.a], "wc": pack_ternary(params.wc),
            "bias": [float(v) for v in params.bias], "relu": int(relu),
            "activations": int(params.uint8_activations)}


def params_from_node(node: onnx.NodeProto) -> tuple[SpnParams, bool]:
    """An SpnMatMul node's layer and its relu flag."""
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    D, R = int(a["D"]), int(a["R"])
    wb = unpack_ternary(numpy_helper.to_array(a["wb"]), D)
    wc = unpack_ternary(numpy_helper.to_array(a["wc"]), R)
    return (SpnParams(wb, np.array(a["a"], np.float32), wc, np.array(a["bias"], np.float32),
                      bool(a.get("activations", 0))), bool(a.get("relu", 0)))


def portable_nodes(params: SpnParams, x: str, y: str, prefix: str, relu: bool = False,
                   geometry: ConvGeometry | None = None) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The layer as standard ONNX ops (--portable): MatMul by the ternary Wb^T, Mul by a, MatMul
    by the ternary Wc^T, Add the bias (then Relu); with a `geometry` (SpnConv), a Conv by Wb
    [r, Cin, kh, kw] of that geometry, Mul by a per hidden channel, a 1x1 Conv by Wc [M, r, 1, 1].
    The ternary constants are stored as int8 and Cast to float32 (onnxruntime folds the Casts
    when the session loads), so the file holds a byte per weight, not four."""
    r, M = params.width, params.wc.shape[0]
    names = {k: f"{prefix}/spn_{k}" for k in ("wb", "a", "wc", "bias", "wb_float", "wc_float", "hidden", "scaled",
                                              "mixed", "biased")}
    if geometry is None:
        wb, a, wc, bias = params.wb.T, params.a, params.wc.T, params.bias
        products = [dict(op_type="MatMul"), dict(op_type="MatMul")]
    else:
        g = geometry
        wb, a = params.wb.reshape(r, g.in_channels, *g.kernel), params.a.reshape(r, 1, 1)
        wc, bias = params.wc.reshape(M, r, 1, 1), params.bias.reshape(M, 1, 1)
        products = [dict(op_type="Conv", kernel_shape=list(g.kernel), strides=list(g.strides), pads=list(g.pads),
                         dilations=list(g.dilations)), dict(op_type="Conv", kernel_shape=[1, 1])]
    initializers = [numpy_helper.from_array(wb.astype(np.int8), names["wb"]),
                    numpy_helper.from_array(a.astype(np.float32), names["a"]),
                    numpy_helper.from_array(wc.astype(np.int8), names["wc"]),
                    numpy_helper.from_array(bias.astype(np.float32), names["bias"])]
    added = names["biased"] if relu else y
    nodes = [helper.make_node("Cast", [names[k]], [names[f"{k}_float"]], to=onnx.TensorProto.FLOAT,
                              name=f"{prefix}/spn_{k}_cast") for k in ("wb", "wc")]
    nodes += [helper.make_node(inputs=[x, names["wb_float"]], outputs=[names["hidden"]], name=f"{prefix}/spn_in",
                               **products[0]),
              helper.make_node("Mul", [names["hidden"], names["a"]], [names["scaled"]], name=f"{prefix}/spn_scale"),
              helper.make_node(inputs=[names["scaled"], names["wc_float"]], outputs=[names["mixed"]],
                               name=f"{prefix}/spn_out", **products[1]),
              helper.make_node("Add", [names["mixed"], names["bias"]], [added], name=f"{prefix}/spn_bias")]
    if relu:
        nodes.append(helper.make_node("Relu", [added], [y], name=f"{prefix}/spn_relu"))
    return nodes, initializers


def lower_to_standard_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every SpnMatMul and SpnConv node written as standard ONNX ops
    (portable_nodes), in the node's place, so that any onnxruntime runs it without lutcompile's
    library; the same results within float rounding (a GEMM or a convolution sums in its own order)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    for node in out.graph.node:
        if is_spn(node):
            params, relu = params_from_node(node)
            if params.uint8_activations:
                raise OptionsError(f"node {node.name}: uint8 activations (quantised per row) have no standard-op "
                                   f"form here; only float sum-product layers lower")
            lowered, initializers = portable_nodes(params, node.input[0], node.output[0], node.name, relu,
                                                   geometry_from_node(node))
            nodes += lowered
            out.graph.initializer.extend(initializers)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(n.domain == DOMAIN for n in out.graph.node):
        kept = [o for o in out.opset_import if o.domain != DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(kept)
    return out
