"""The lookup-table operator's parameters and its numpy reference semantics.

`docs/lutmatmul.md` specifies the operator; this module is that text in numpy. The C kernel
(`lutcompile.kernel`) must agree with `encode_reference` and `scan_reference` bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K = 16  # prototypes per codebook: a 4-bit code
DEPTH = 4  # tree levels per codebook
NODES = K - 1  # thresholds per codebook: 1 + 2 + 4 + 8
DOMAIN = "ai.lutcompile"
OP_TYPE = "LutMatMul"


@dataclass
class LutParams:
    """Everything one LutMatMul node carries.

    split_dims: int32 [C, 4]   input dimension tested at each tree level
    thresholds: float32 [C, 15] heap-ordered: level l, node i at index 2**l - 1 + i
    tables:     uint8 [M, C, 16] quantised lookup tables
    scale:      shared dequantisation scale
    offsets:    float32 [C] per-codebook dequantisation offsets
    bias:       float32 [M]
    relu:       fused ReLU epilogue
    """

    D: int
    split_dims: np.ndarray
    thresholds: np.ndarray
    tables: np.ndarray
    scale: float
    offsets: np.ndarray
    bias: np.ndarray
    relu: bool = False

    def __post_init__(self) -> None:
        self.split_dims = np.ascontiguousarray(self.split_dims, dtype=np.int32)
        self.thresholds = np.ascontiguousarray(self.thresholds, dtype=np.float32)
        self.tables = np.ascontiguousarray(self.tables, dtype=np.uint8)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.float32)
        self.bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        self.scale = float(np.float32(self.scale))
        C, M = self.C, self.M
        expected = {
            "split_dims": (self.split_dims.shape, (C, DEPTH)),
            "thresholds": (self.thresholds.shape, (C, NODES)),
            "tables": (self.tables.shape, (M, C, K)),
            "offsets": (self.offsets.shape, (C,)),
            "bias": (self.bias.shape, (M,)),
        }
        for name, (got, want) in expected.items():
            if got != want:
                raise ValueError(f"LutParams.{name} has shape {got}, expected {want}")
        if self.split_dims.size and (self.split_dims.min() < 0 or self.split_dims.max() >= self.D):
            raise ValueError(f"LutParams.split_dims must lie in [0, {self.D})")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"LutParams.scale must be finite and positive, got {self.scale}")

    @property
    def C(self) -> int:
        return int(self.split_dims.shape[0])

    @property
    def M(self) -> int:
        return int(self.tables.shape[0])

    def base(self) -> np.ndarray:
        """bias + the offsets summed left to right in float32, as the kernel does."""
        total = np.float32(0.0)
        for o in self.offsets:
            total = np.float32(total + o)
        return (self.bias + total).astype(np.float32)

    def dequantised_tables(self) -> np.ndarray:
        """float32 [M, C, 16]: what the tables stand for, before the shared offsets."""
        return self.tables.astype(np.float32) * np.float32(self.scale)


def encode_reference(X: np.ndarray, split_dims: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """uint8 [N, C] codes of the rows of X [N, D] through the balanced trees."""
    X = np.asarray(X, dtype=np.float32)
    C = split_dims.shape[0]
    node = np.zeros((X.shape[0], C), dtype=np.int64)
    cols = np.arange(C)
    for level in range(DEPTH):
        values = X[:, split_dims[:, level]]  # [N, C]
        thr = thresholds[cols, (1 << level) - 1 + node]  # [N, C]
        node = 2 * node + (values > thr)
    return node.astype(np.uint8)


def scan_reference(codes: np.ndarray, params: LutParams) -> np.ndarray:
    """float32 [N, M] output from codes [N, C], in the kernel's exact arithmetic."""
    N, C = codes.shape
    acc = np.zeros((N, params.M), dtype=np.uint32)
    for c in range(C):
        acc += params.tables[:, c, :].T[codes[:, c].astype(np.int64)]  # [N, M]
    y = acc.astype(np.float32) * np.float32(params.scale) + params.base()
    if params.relu:
        y = np.where(y > 0, y, np.float32(0)).astype(np.float32)
    return y.astype(np.float32)


def apply_reference(X: np.ndarray, params: LutParams) -> np.ndarray:
    """LutMatMul on X [..., D] in numpy."""
    X = np.asarray(X, dtype=np.float32)
    lead = X.shape[:-1]
    flat = X.reshape(-1, X.shape[-1])
    y = scan_reference(encode_reference(flat, params.split_dims, params.thresholds), params)
    return y.reshape(*lead, params.M)


CONV_OP_TYPE = "LutConv"
LOOKUP_OP_TYPES = (OP_TYPE, CONV_OP_TYPE)
# StrassenNets' sum-product layer (ops/spn.py; docs/lutmatmul.md, "The SpnMatMul operator"), and
# the same layer on a Conv's patches ("The SpnConv operator")
SPN_OP_TYPE = "SpnMatMul"
SPN_CONV_OP_TYPE = "SpnConv"
SPN_OP_TYPES = (SPN_OP_TYPE, SPN_CONV_OP_TYPE)


@dataclass
class ConvGeometry:
    """Where a LutConv's patches come from (see docs/lutmatmul.md, LutConv)."""

    in_channels: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    # a MaxPool fused after the convolution (compile/fuse.py): (window h, w, stride h, w), no
    # padding, dilation 1, floor rounding; the op's output is the pooled one
    max_pool: tuple[int, int, int, int] | None = None

    @property
    def D(self) -> int:
        return self.in_channels * self.kernel[0] * self.kernel[1]

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = self.pads
        return ((H + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (W + left + right - dw * (kw - 1) - 1) // sw + 1)


MAX_POOL_LIMIT = 4096  # a fused MaxPool's largest window side and stride (lut_conv_set_pool)


def pooled_size(OH: int, OW: int, window: tuple[int, int, int, int]) -> tuple[int, int]:
    """The output size of a fused MaxPool (window h, w, stride h, w) over OH x OW: floor rounding."""
    kh, kw, sh, sw = window
    return (OH - kh) // sh + 1, (OW - kw) // sw + 1


def max_pool_reference(Y: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """MaxPool of Y [N, M, OH, OW] with (window h, w, stride h, w), no padding, floor rounding."""
    kh, kw, sh, sw = window
    N, M, OH, OW = Y.shape
    PH, PW = pooled_size(OH, OW, window)
    out = np.full((N, M, PH, PW), -np.inf, dtype=Y.dtype)
    for ky in range(kh):
        for kx in range(kw):
            out = np.maximum(out, Y[:, :, ky:ky + sh * (PH - 1) + 1:sh, kx:kx + sw * (PW - 1) + 1:sw])
    return out


def im2col_reference(X: np.ndarray, g: ConvGeometry, positions: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, D] patches of X [N, Cin, H, W], rows ordered (n, oy, ox).

    `positions`, if given, selects rows (flat indices into n*OH*OW + oy*OW + ox), so a
    calibration sample never materialises every patch.
    """
    X = np.asarray(X, dtype=np.float32)
    N, Cin, H, W = X.shape
    top, left, bottom, right = g.pads
    padded = np.pad(X, ((0, 0), (0, 0), (top, bottom), (left, right)))
    OH, OW = g.output_size(H, W)
    (kh, kw), (sh, sw), (dh, dw) = g.kernel, g.strides, g.dilations
    if positions is None:
        positions = np.arange(N * OH * OW)
    n, rest = np.divmod(positions, OH * OW)
    oy, ox = np.divmod(rest, OW)
    ky, kx = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
    rows = oy[:, None, None] * sh + ky[None] * dh  # [R, kh, kw]
    cols = ox[:, None, None] * sw + kx[None] * dw
    patches = padded[n[:, None, None, None], np.arange(Cin)[None, :, None, None],
                     rows[:, None], cols[:, None]]  # [R, Cin, kh, kw]
    return patches.reshape(len(positions), g.D)  # not -1: zero rows have no size to infer


def apply_conv_reference(X: np.ndarray, params: LutParams, g: ConvGeometry) -> np.ndarray:
    """LutConv on X [N, Cin, H, W] in numpy: [N, M, OH, OW] (pooled, with a fused MaxPool)."""
    N, _, H, W = X.shape
    OH, OW = g.output_size(H, W)
    y = apply_reference(im2col_reference(X, g), params)  # [N*OH*OW, M]
    y = y.reshape(N, OH, OW, params.M).transpose(0, 3, 1, 2).copy()
    return y if g.max_pool is None else max_pool_reference(y, g.max_pool)
