"""An ONNX graph as a differentiable torch program, for the fine-tune pass.

A small interpreter over the op set lutcompile meets in MLPs and CNNs, rather than a
converter: the fine-tune pass needs LutMatMul nodes in the forward (frozen, or with trainable
tables), chosen initializers as trainable parameters, and the updated values written back to
the same ONNX initializers. The tests hold its outputs to onnxruntime's on the same models.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..onnx_io import external_data
from ..ops.node_format import attributes, geometry_from_node, params_from_node, set_attributes, set_lut_attributes
from ..ops.spec import DOMAIN, DEPTH, K, LutParams
from ..ops.spn import SpnParams, full_precision_init, is_spn, ternarize
from ..ops.spn import node_attributes as spn_node_attributes, params_from_node as spn_params_from_node


class UnsupportedOp(ValueError):
    """The graph holds an op the torch program cannot run."""


def fake_quantise(T: torch.Tensor) -> torch.Tensor:
    """T [C, 16, M] rounded to the kernel's 8-bit grid, with a straight-through gradient."""
    offsets = T.amin(dim=(1, 2), keepdim=True)
    scale = (T - offsets).amax().clamp_min(1e-12) / 255.0
    q = torch.clamp(torch.round((T - offsets) / scale), 0, 255)
    return T + (q * scale + offsets - T).detach()


class LutModule(torch.nn.Module):
    """LutMatMul in torch. The forward is the kernel's: hard codes from the trees, 8-bit tables.

    train_tables: the tables and bias train, through a straight-through 8-bit rounding.
    train_trees: the thresholds train too, and gradients reach the layer's input, so earlier
    layers learn to feed the trees: the hard forward is kept, and the backward is that of a
    soft tree (each split a sigmoid of (x - threshold) / tau, a leaf's probability the product
    along its path, the output the probability-weighted tables), added as y_soft - y_soft.detach().
    tau is `temperature` times the spread of each codebook's thresholds.
    With train_tables, the forward re-quantises the tables on their own range, which gives back
    the stored values for every node the fitter or the train stage writes; a node narrowed by
    compile/prune.py (which runs after training) keeps only some columns of that range.
    """

    def __init__(self, params: LutParams, train_tables: bool = False, train_trees: bool = False,
                 temperature: float = 0.1):
        super().__init__()
        self.D, self.C, self.M, self.relu = params.D, params.C, params.M, params.relu
        self.register_buffer("split_dims", torch.from_numpy(params.split_dims.astype(np.int64)))
        self.thresholds = torch.nn.Parameter(torch.from_numpy(params.thresholds.copy()), requires_grad=train_trees)
        self.temperature = temperature
        self.register_buffer("tau", self._tau(params.thresholds))
        # tables in float: q * scale + offset[c], laid out [C, 16, M]
        T = params.tables.transpose(1, 2, 0).astype(np.float32) * np.float32(params.scale)
        T = T + params.offsets[:, None, None]
        self.tables = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(T)), requires_grad=train_tables)
        self.bias = torch.nn.Parameter(torch.from_numpy(params.bias.copy()), requires_grad=train_tables)
        self.quantised = params  # the frozen values, reproduced exactly when nothing trains

    def _tau(self, thresholds: np.ndarray) -> torch.Tensor:
        spread = thresholds.std(axis=1, keepdims=True)
        spread = np.where(spread > 0, spread, np.maximum(np.abs(thresholds).max(axis=1, keepdims=True), 1.0))
        return torch.from_numpy((self.temperature * spread).astype(np.float32))

    def replace_trees(self, split_dims: np.ndarray, thresholds: np.ndarray, tables: np.ndarray) -> None:
        """New trees (split_dims [C, 4], thresholds [C, 15]) and float tables [C, 16, M] in place
        (the train stage's re-split, finetune.train); the bias stays."""
        with torch.no_grad():
            self.split_dims.copy_(torch.from_numpy(np.asarray(split_dims, dtype=np.int64)))
            self.thresholds.copy_(torch.from_numpy(np.asarray(thresholds, dtype=np.float32)))
            self.tables.copy_(torch.from_numpy(np.asarray(tables, dtype=np.float32)))
            self.tau.copy_(self._tau(np.asarray(thresholds, dtype=np.float32)))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        node = torch.zeros(x.shape[0], self.C, dtype=torch.int64, device=x.device)
        cols = torch.arange(self.C, device=x.device)
        thresholds = self.thresholds.detach()
        for level in range(DEPTH):
            values = x[:, self.split_dims[:, level]]
            thr = thresholds[cols, (1 << level) - 1 + node]
            node = 2 * node + (values > thr).long()
        return node

    def leaf_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, 16]: the soft tree's probability of each leaf (differentiable in x and thresholds)."""
        P = torch.ones(x.shape[0], self.C, 1, dtype=x.dtype, device=x.device)
        for level in range(DEPTH):
            first = (1 << level) - 1
            values = x[:, self.split_dims[:, level]].unsqueeze(-1)  # [N, C, 1]
            right = torch.sigmoid((values - self.thresholds[:, first:2 * first + 1]) / self.tau)  # [N, C, 2^l]
            P = torch.stack([P * (1 - right), P * right], dim=-1).reshape(x.shape[0], self.C, -1)
        return P

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x.reshape(-1, self.D).float())
        if self.relu:
            y = torch.relu(y)
        return y.reshape(*x.shape[:-1], self.M)

    def linear(self, flat: torch.Tensor) -> torch.Tensor:
        """The output before the fused activation, of rows `flat` [N, D]."""
        idx = self.codes(flat) + torch.arange(self.C, device=flat.device) * K
        T = fake_quantise(self.tables) if self.tables.requires_grad else self.tables
        y = F.embedding_bag(idx, T.reshape(self.C * K, self.M), mode="sum") + self.bias
        if self.thresholds.requires_grad:  # hard forward, soft-tree backward
            soft = torch.einsum("nck,ckm->nm", self.leaf_probabilities(flat), T.detach())
            y = y + (soft - soft.detach())
        return y

    @property
    def trained(self) -> bool:
        return self.tables.requires_grad or self.thresholds.requires_grad

    def export_params(self) -> LutParams:
        """The trained values as LutParams: tables re-quantised, thresholds as trained, split
        dimensions as the module holds them (the fitter's, unless the train stage re-split)."""
        from .fit import quantise_tables
        p = self.quantised
        if self.tables.requires_grad:
            tables, scale, offsets = quantise_tables(self.tables.detach().double().numpy())
        else:
            tables, scale, offsets = p.tables, p.scale, p.offsets
        split_dims = self.split_dims.numpy().astype(np.int32)
        return LutParams(p.D, split_dims, self.thresholds.detach().numpy().copy(), tables, scale, offsets,
                         self.bias.detach().numpy().astype(np.float32), p.relu)


class LutConvModule(torch.nn.Module):
    """LutConv in torch: unfold the NCHW input into patches, look them up, fold back (and
    max-pool, with a fused MaxPool). SpnConv too, with an SpnModule as `lut`."""

    def __init__(self, lut: torch.nn.Module, geometry):
        super().__init__()
        self.lut, self.g = lut, geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.g
        top, left, bottom, right = g.pads
        N, _, H, W = x.shape
        OH, OW = g.output_size(H, W)
        cols = F.unfold(F.pad(x, (left, right, top, bottom)), g.kernel, dilation=g.dilations, stride=g.strides)
        y = self.lut(cols.transpose(1, 2)).transpose(1, 2).reshape(N, -1, OH, OW)  # [N, M, OH, OW]
        if g.max_pool is None:
            return y
        kh, kw, sh, sw = g.max_pool
        return F.max_pool2d(y, (kh, kw), (sh, sw))


def _ternary(w: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.spn.ternarize of the latent weights `w` (no gradient): (t in {-1, 0, 1}, the scale of
    each slice along `axis`, kept as a broadcastable dimension)."""
    t, scale = ternarize(w.detach().numpy(), axis)
    return torch.from_numpy(t.astype(np.float32)), torch.from_numpy(np.expand_dims(scale, axis).astype(np.float32))


def fake_quantize_rows(v: torch.Tensor) -> torch.Tensor:
    """ops.spn.quantize_rows in torch, dequantised (lo + step q), with an identity straight-through
    gradient: what a product with uint8 activations sees of each row of v [..., K]."""
    with torch.no_grad():
        lo = v.amin(dim=-1, keepdim=True)
        step = (v.amax(dim=-1, keepdim=True) - lo) / 255
        step = torch.where(step == 0, torch.ones_like(step), step)
        seen = lo + step * torch.clamp(torch.round((v - lo) / step), 0, 255)
    return v + (seen - v).detach()


class SpnModule(torch.nn.Module):
    """StrassenNets' sum-product layer (ops/spn.py) in torch, trained as the authors do: latent
    real weights ternarised by TWN in every forward, with an identity straight-through gradient,
    and `a` real. The forward is y = ((x (sb tb)^T) a) (tc sc)^T + b, which `params()` writes as
    the exported layer's ternary tb, tc with both scales folded into a. With uint8 activations
    each product's input rows are fake-quantised (fake_quantize_rows) as the kernel quantises
    them: x, and the exported layer's hidden row (x tb^T) (a sb sc)."""

    def __init__(self, wb: np.ndarray, a: np.ndarray, wc: np.ndarray, bias: np.ndarray, relu: bool = False,
                 trainable: bool = True, scales_only: bool = False, uint8_activations: bool = False):
        """trainable: every parameter trains; scales_only: `a` alone (the authors' last phase,
        the ternary pattern frozen)."""
        super().__init__()
        self.uint8_activations = uint8_activations
        self.wb = torch.nn.Parameter(torch.as_tensor(np.asarray(wb, np.float32)), requires_grad=trainable)
        self.a = torch.nn.Parameter(torch.as_tensor(np.asarray(a, np.float32)), requires_grad=trainable or scales_only)
        self.wc = torch.nn.Parameter(torch.as_tensor(np.asarray(wc, np.float32)), requires_grad=trainable)
        self.bias = torch.nn.Parameter(torch.as_tensor(np.asarray(bias, np.float32)), requires_grad=trainable)
        self.relu = relu
        self.trained = trainable or scales_only

    @classmethod
    def from_params(cls, params: SpnParams, relu: bool = False, trainable: bool = True,
                    scales_only: bool = False) -> "SpnModule":
        """An exported layer as latent weights the forward starts from exactly: each ternary row
        of Wb (column of Wc) scaled to unit norm, as the SVD's factors are, and a divided by both
        scales. TWN gives the ternary matrices back, with those scales, so the forward is the
        node's layer; at unit norm the latents sit about 1/sqrt(nonzeros) from their thresholds,
        where Adam's steps can flip them (at +-1 they would need about a thousand steps)."""
        sb = 1.0 / np.sqrt(np.maximum(np.count_nonzero(params.wb, axis=1), 1))
        sc = 1.0 / np.sqrt(np.maximum(np.count_nonzero(params.wc, axis=0), 1))
        return cls(params.wb * sb[:, None], params.a / (sb * sc), params.wc * sc[None, :], params.bias, relu,
                   trainable, scales_only, params.uint8_activations)

    @classmethod
    def from_layer(cls, weight: np.ndarray, bias: np.ndarray | None, width: int) -> "SpnModule":
        """The SVD initialisation (ops.spn.full_precision_init) as the latent weights."""
        wb, a, wc = full_precision_init(weight, width)
        return cls(wb, a, wc, np.zeros(np.asarray(weight).shape[1]) if bias is None else bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tb, sb = _ternary(self.wb, 1)
        tc, sc = _ternary(self.wc, 0)
        wb = self.wb + (sb * tb - self.wb).detach()  # the ternary value, the latent's gradient
        wc = self.wc + (tc * sc - self.wc).detach()
        if self.uint8_activations:  # the exported hidden row (a sb sc) is what the kernel quantises
            sc_safe = torch.where(sc == 0, torch.ones_like(sc), sc)
            s = fake_quantize_rows((fake_quantize_rows(x) @ wb.T) * (self.a * sc_safe))
            y = s @ (wc / sc_safe).T + self.bias
        else:
            y = ((x @ wb.T) * self.a) @ wc.T + self.bias
        return torch.relu(y) if self.relu else y

    def params(self) -> SpnParams:
        """The layer the forward computes, as exported: ternary tb, tc, and a times both scales."""
        with torch.no_grad():
            tb, sb = _ternary(self.wb, 1)
            tc, sc = _ternary(self.wc, 0)
            a = self.a * sb[:, 0] * sc[0, :]
        return SpnParams(tb.numpy().astype(np.int8), a.numpy().astype(np.float32), tc.numpy().astype(np.int8),
                         self.bias.detach().numpy().astype(np.float32), self.uint8_activations)


def _pads(attrs: dict, x: torch.Tensor, kernel) -> list[int]:
    """ONNX pads [begins..., ends...] of a Conv or pool on input x, auto_pad resolved."""
    spatial = x.dim() - 2
    auto = attrs.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * (2 * spatial)
    if auto in ("SAME_UPPER", "SAME_LOWER"):  # output size ceil(in / stride); the odd pad at the end (UPPER)
        strides = attrs.get("strides", [1] * spatial)
        dilations = attrs.get("dilations", [1] * spatial)
        total = [max(0, (-(-n // s) - 1) * s + (k - 1) * d + 1 - n)
                 for n, k, s, d in zip(x.shape[2:], kernel, strides, dilations)]
        small = [p // 2 for p in total]
        large = [p - p // 2 for p in total]
        return small + large if auto == "SAME_UPPER" else large + small
    if auto != "NOTSET":
        raise UnsupportedOp(f"auto_pad={auto} is not supported")
    return list(attrs.get("pads", [0] * (2 * spatial)))


def _pad_input(x: torch.Tensor, pads: list[int], value: float = 0.0) -> tuple[torch.Tensor, int | None]:
    """Symmetric pads become the conv's own padding; asymmetric ones are applied first."""
    n = len(pads) // 2
    begin, end = pads[:n], pads[n:]
    if begin == end:
        return x, begin
    torch_pads = []
    for b, e in zip(reversed(begin), reversed(end)):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value), [0] * n


def _conv(x, w, b=None, **a):
    spatial = w.dim() - 2
    x, padding = _pad_input(x, _pads(a, x, w.shape[2:]))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return conv(x, w, b, stride=a.get("strides", 1), padding=padding,
                dilation=a.get("dilations", 1), groups=a.get("group", 1))


def _pool(kind):
    def run(x, **a):
        spatial = x.dim() - 2
        k = a["kernel_shape"]
        pads = _pads(a, x, k)
        padded, padding = _pad_input(x, pads, value=-math.inf if kind == "max" else 0.0)
        stride = a.get("strides", [1] * spatial)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return fn(padded, k, stride, padding, dilation=a.get("dilations", 1), ceil_mode=ceil)
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        include = bool(a.get("count_include_pad", 0))
        if padded is not x and not include:  # asymmetric pads applied here: divide by the real elements only
            ones, _ = _pad_input(torch.ones_like(x[:1, :1]), pads)
            return fn(padded, k, stride, padding, ceil_mode=ceil) / fn(ones, k, stride, padding, ceil_mode=ceil)
        return fn(padded, k, stride, padding, ceil_mode=ceil, count_include_pad=include)
    return run


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((a.t() if transA else a) @ (b.t() if transB else b))
    return y if c is None else y + beta * c


def _reshape(x, shape, allowzero=0):
    shape = [int(s) for s in shape.tolist()]
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _flatten(x, axis=1):
    axis = axis + x.dim() if axis < 0 else axis  # 0..rank: axis = rank gives [numel, 1]
    return x.reshape(int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis:])))


def _axes(node_axes, axes_input):
    if axes_input is not None:
        return [int(v) for v in axes_input.tolist()]
    return list(node_axes) if node_axes is not None else None


def _squeeze(x, axes=None, **a):
    axes = _axes(a.get("axes"), axes)
    if axes is None:
        return x.squeeze()
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _unsqueeze(x, axes=None, **a):
    axes = _axes(a.get("axes"), axes)
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return x


def _softmax(x, axis=-1, opset=13):
    if opset < 13 and axis % x.dim() != x.dim() - 1:  # old semantics: flatten from axis
        shape = x.shape
        return torch.softmax(x.reshape(*shape[:axis], -1), dim=-1).reshape(shape)
    return torch.softmax(x, dim=axis)


def _batchnorm(x, scale, bias, mean, var, epsilon=1e-5, **_):
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + epsilon) * scale.reshape(shape) \
        + bias.reshape(shape)


def _clip(x, lo=None, hi=None, min=None, max=None):
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    return torch.clamp(x, min=None if lo is None else float(lo), max=None if hi is None else float(hi))


_ONNX_TORCH_DTYPE = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 11: torch.float64}


def _gather(x, i, axis=0):
    axis = axis % x.dim()
    i = i.long()
    i = torch.where(i < 0, i + x.shape[axis], i)  # ONNX counts negative indices from the end
    picked = torch.index_select(x, axis, i.reshape(-1))
    return picked.reshape(tuple(x.shape[:axis]) + tuple(i.shape) + tuple(x.shape[axis + 1:]))


def _layer_norm(x, scale, bias=None, axis=-1, epsilon=1e-5, **_):
    return F.layer_norm(x, x.shape[axis % x.dim():], scale, bias, epsilon)


def _reduce_mean(x, axes_input=None, axes=None, keepdims=1, noop_with_empty_axes=0):
    axes = _axes(axes, axes_input)
    if not axes:
        return x if noop_with_empty_axes else x.mean().reshape([1] * x.dim() if keepdims else [])
    return x.mean(dim=tuple(axes), keepdim=bool(keepdims))


def _slice(x, starts, ends, axes=None, steps=None):
    """ONNX Slice: per listed axis, start:end:step, clamped as Python clamps (steps > 0 here)."""
    starts, ends = starts.tolist(), ends.tolist()
    axes = list(range(len(starts))) if axes is None else axes.tolist()
    steps = [1] * len(starts) if steps is None else steps.tolist()
    if any(step <= 0 for step in steps):
        raise UnsupportedOp("Slice with a negative step is not supported")
    index = [slice(None)] * x.dim()
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[axis] = slice(start, end, step)
    return x[tuple(index)]


def _constant_of_shape(shape, value=None):
    value = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    return torch.full([int(s) for s in shape.tolist()], value[0].item(),
                      dtype=torch.from_numpy(value.copy()).dtype)


def _expand(x, shape):  # ONNX Expand broadcasts both ways: a 1 in `shape` keeps x's extent
    return x.expand(torch.broadcast_shapes(x.shape, tuple(int(s) for s in shape.tolist())))

OPS: dict[str, Callable] = {
    "Gemm": _gemm,
    "MatMul": lambda a, b: a @ b,
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Relu": lambda x: torch.relu(x),
    "LeakyRelu": lambda x, alpha=0.01: F.leaky_relu(x, alpha),
    "Sigmoid": lambda x: torch.sigmoid(x),
    "Tanh": lambda x: torch.tanh(x),
    "Identity": lambda x: x,
    "Dropout": lambda x, *_, **__: x,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda x, perm=None: x.permute(*(perm if perm is not None else reversed(range(x.dim())))),
    "Conv": _conv,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "BatchNormalization": _batchnorm,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Shape": lambda x, start=0, end=None: torch.tensor(x.shape[start:end], dtype=torch.int64),
    "Gather": _gather,
    "Cast": lambda x, to, **_: x.to(_ONNX_TORCH_DTYPE[to]),
    "Clip": _clip,
    "Softmax": _softmax,
    "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce_mean,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Neg": torch.neg,
    "Pow": torch.pow,
    "Reciprocal": torch.reciprocal,
    "Where": lambda c, x, y: torch.where(c.bool(), x, y),
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Not": torch.logical_not,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le,
    "Range": lambda start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype),
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Slice": _slice,
}


class TorchProgram(torch.nn.Module):
    """Runs an ONNX graph in torch. Initializers named in `trainable` become parameters."""

    def __init__(self, model: onnx.ModelProto, trainable: set[str] = frozenset(),
                 train_tables: bool = False, train_trees: bool = False, temperature: float = 0.1,
                 train_spn_scales: bool = False):
        super().__init__()
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.input_names = [i.name for i in graph.input
                            if i.name not in {t.name for t in graph.initializer}]
        self.output_names = [o.name for o in graph.output]
        self.nodes = list(graph.node)
        self.params = torch.nn.ParameterDict()
        self.luts = torch.nn.ModuleDict()
        self._lut_key: dict[str, str] = {}  # lookup node name -> key in self.luts
        self._slot: dict[str, str] = {}  # tensor name -> key in self.params
        self._constants: dict[str, torch.Tensor] = {}
        for t in graph.initializer:
            value = torch.from_numpy(np.array(external_data.tensor_array(t)))
            if t.name in trainable:
                key = f"p{len(self.params)}"
                self.params[key] = torch.nn.Parameter(value.float())
                self._slot[t.name] = key
            else:
                self._constants[t.name] = value
        for node in self.nodes:
            if is_spn(node):
                self._lut_key[node.name] = f"spn{len(self.luts)}"
                layer = SpnModule.from_params(*spn_params_from_node(node), trainable=train_tables,
                                              scales_only=train_spn_scales)
                geometry = geometry_from_node(node)  # SpnConv: the layer on each patch
                self.luts[self._lut_key[node.name]] = layer if geometry is None else LutConvModule(layer, geometry)
            elif node.domain == DOMAIN:
                lut = LutModule(params_from_node(node), train_tables, train_trees, temperature)
                geometry = geometry_from_node(node)
                # ModuleDict keys may not hold '.', which exported node names often do
                self._lut_key[node.name] = f"lut{len(self.luts)}"
                self.luts[self._lut_key[node.name]] = lut if geometry is None else LutConvModule(lut, geometry)
            elif node.op_type == "Constant":
                a = attributes(node)
                value = a.get("value", a.get("value_float", a.get("value_floats", a.get("value_int"))))
                self._constants[node.output[0]] = torch.as_tensor(np.array(value))
            elif node.op_type not in OPS:
                raise UnsupportedOp(f"op {node.op_type} (node {node.name}) is not supported by the fine-tune pass")
        self._node_attrs = [attributes(n) for n in self.nodes]

    def lut_modules(self) -> dict[str, LutModule]:
        """Each lookup node's LutModule (a LutConv's inner one), by node name."""
        modules = {name: self.luts[key] for name, key in self._lut_key.items()}
        unwrapped = {name: m.lut if isinstance(m, LutConvModule) else m for name, m in modules.items()}
        return {name: m for name, m in unwrapped.items() if isinstance(m, LutModule)}

    def forward(self, *inputs: torch.Tensor, outputs: list[str] | None = None) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = dict(self._constants)
        env.update({name: self.params[key] for name, key in self._slot.items()})
        env.update(zip(self.input_names, inputs))
        for node, attrs in zip(self.nodes, self._node_attrs):
            if node.op_type == "Constant" and node.domain == "":
                continue
            args = [env[n] if n else None for n in node.input]
            while args and args[-1] is None:
                args.pop()
            if node.domain == DOMAIN:
                result = self.luts[self._lut_key[node.name]](args[0])
            else:
                kwargs = {k: v for k, v in attrs.items()}
                if node.op_type == "Softmax":
                    kwargs["opset"] = self.opset
                if node.op_type in ("Squeeze", "Unsqueeze") and len(args) == 2:
                    kwargs["axes"] = args.pop()
                result = OPS[node.op_type](*args, **kwargs)
            results = result if isinstance(result, tuple) else (result,)
            env.update(zip(node.output, results))
        return [env[n] for n in (outputs or self.output_names)]

    def trained_initializers(self) -> dict[str, np.ndarray]:
        return {name: self.params[key].detach().numpy() for name, key in self._slot.items()}

    def write_back(self, model: onnx.ModelProto) -> None:
        """Copy trained initializers and tables into `model` (which this program was built from)."""
        trained = self.trained_initializers()
        for i, t in enumerate(model.graph.initializer):
            if t.name not in trained:
                continue
            value = trained[t.name].astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
            if external_data.is_attached(t):  # stays outside the proto (a model over 2 GB)
                external_data.attach(t, value)
            else:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, t.name))
        for node in model.graph.node:
            lut = self.luts[self._lut_key[node.name]] if node.domain == DOMAIN else None
            lut = getattr(lut, "lut", lut)  # a LutConvModule wraps its LutModule
            if isinstance(lut, SpnModule) and lut.trained:
                set_attributes(node, spn_node_attributes(lut.params(), lut.relu))
            elif lut is not None and lut.trained:
                set_lut_attributes(node, lut.export_params())
