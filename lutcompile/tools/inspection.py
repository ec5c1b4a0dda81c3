"""`lutcompile inspect`: list a compiled model's lookup nodes and check that their tables hold together.

    lutcompile inspect fast.onnx [--json]

Every lookup node (`LutMatMul` or `LutConv`, domain `ai.lutcompile`, see docs/lutmatmul.md) is
read back with `node_format.params_from_node`, which validates the array shapes through
`LutParams`, and is then checked further: the required attributes are present, `K` is 16, `D`,
`M` and `C` agree with the arrays (`tables` is uint8 [M, C, 16], `split_dims` has C*4 entries,
`thresholds` C*15, `offsets` C, `bias` M), every split dimension lies in [0, D), thresholds,
offsets and bias are finite, `scale` is finite and > 0, `relu` is 0 or 1, the node has one
input and one output, and the model imports the `ai.lutcompile` opset. Thresholds need not be
sorted in any way.

A `LutMatMul`'s input and output, where their shapes are known, have last dimensions D and M.
A `LutConv` also has its patch geometry checked, within the limits the kernel accepts:
`in_channels` (1 to 2^24) times `kernel_shape` [kh, kw] equals D, `kernel_shape`, `strides`
and `dilations` have 2 entries from 1 to 4096, `pads` [top, left, bottom, right] 4 entries
from 0 to 65536; where shapes are known, input and output have rank 4, the input has
`in_channels` channels and the output M, and, when the input's height and width are known
(1 to 2^20), the output's are the convolution's (at least 1).

JSON schema (`--json`; `inspect_model(...).to_json()`), version "lutcompile.inspect/1":

    {
      "schema": "lutcompile.inspect/1",
      "model": str | null,              # path, when inspected from a file
      "consistent": bool,               # no problem anywhere
      "opset": {domain: int},           # the model's opset imports ("" is the ONNX domain)
      "lookup_nodes": [                 # graph order, LutMatMul and LutConv nodes alike
        {
          "name": str, "op_type": "LutMatMul" | "LutConv", "domain": str,
          "inputs": [str], "outputs": [str],
          "D": int | null, "M": int | null, "C": int | null, "K": int | null,
                                        # LutConv: D = in_channels * kh * kw, M output channels
          "relu": bool | null,
          "partition": str | null, "table_loss": str | null, "source_op": str | null,
          "scale": float | null,
          "threshold_range": [float, float] | null,   # min and max over the finite thresholds
          "split_dims_used": int | null,              # distinct input dimensions tested
          "param_bytes": int,           # tables + thresholds + split_dims (int32) + offsets + bias
          "conv": null | {              # LutConv only; each entry null when missing or malformed
            "in_channels": int | null,
            "kernel_shape": [int] | null,             # [kh, kw]
            "strides": [int] | null,                  # [sh, sw]
            "pads": [int] | null,                     # [top, left, bottom, right]
            "dilations": [int] | null                 # [dh, dw]
          },
          "problems": [str]             # empty when the node is consistent
        }
      ],
      "spn_nodes": [                    # SpnMatMul and SpnConv nodes (StrassenNets), graph order
        {"name": str, "inputs": [str], "outputs": [str], "op_type": "SpnMatMul" | "SpnConv",
         "D": int | null, "M": int | null,     # SpnConv: D = in_channels * kh * kw, counts per position
         "relu": bool | null, "param_bytes": int,    # packed wb, wc (2 bits a weight) + a, bias
         "count": null | {"width": int, "multiplications": int, "additions": int,   # per row
                          "exact_multiplications": int, "exact_additions": int,
                          "wb_zeros": float, "wc_zeros": float,              # fractions
                          "activations": "float32" | "uint8"},
         "problems": [str]}
      ],
      "exact_nodes": [{"name": str, "op_type": str}],  # MatMul / Gemm / Conv nodes left exact, all
                                                       # of them (the text output names a few)
      "problems": [str]                 # every problem, each prefixed by its node's name
    }

Version 1 gained "op_type" and "conv" in each lookup node, and Conv in "exact_nodes", when
`LutConv` came, and "spn_nodes" with `SpnMatMul`; no field changed meaning for LutMatMul models.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..ops.spec import CONV_OP_TYPE, DEPTH, DOMAIN, K, MAX_POOL_LIMIT, NODES, OP_TYPE, ConvGeometry, pooled_size
from ..ops.node_format import attributes, is_lookup, parameter_bytes, params_from_node
from ..ops.spn import SPN_OP_TYPE, LayerCount, is_spn, params_from_node as spn_params_from_node

SCHEMA = "lutcompile.inspect/1"
REQUIRED = ("D", "M", "C", "K", "split_dims", "thresholds", "tables", "scale", "offsets", "bias")
EXACT_OPS = ("MatMul", "Gemm", "Conv")
# LutConv's geometry attributes: (name, entries, smallest, largest), the kernel's limits
CONV_ATTRIBUTES = (("kernel_shape", 2, 1, 4096), ("strides", 2, 1, 4096), ("pads", 4, 0, 65536),
                   ("dilations", 2, 1, 4096))
MAX_POOL = "max_pool"  # optional: a fused MaxPool's (window h, w, stride h, w), each 1 to MAX_POOL_LIMIT
MAX_IN_CHANNELS = 1 << 24
MAX_SIDE = 1 << 20  # a LutConv input's height and width
EXACT_NAMES_SHOWN = 5  # the text output names this many exact nodes; --json lists them all


@dataclass
class LookupNode:
    name: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    op_type: str = OP_TYPE
    D: int | None = None
    M: int | None = None
    C: int | None = None
    K: int | None = None
    relu: bool | None = None
    partition: str | None = None
    table_loss: str | None = None
    source_op: str | None = None
    scale: float | None = None
    threshold_range: list[float] | None = None
    split_dims_used: int | None = None
    param_bytes: int = 0
    conv: dict | None = None  # LutConv: in_channels, kernel_shape, strides, pads, dilations (and max_pool, if fused)
    problems: list[str] = field(default_factory=list)

    def geometry(self) -> ConvGeometry | None:
        """The LutConv's patch geometry, when every entry is well formed and within the limits."""
        c = self.conv
        if c is None or any(v is None for v in c.values()) or not 1 <= c["in_channels"] <= MAX_IN_CHANNELS:
            return None
        if any(not low <= v <= high for key, _, low, high in CONV_ATTRIBUTES for v in c[key]):
            return None
        pool = c.get(MAX_POOL)
        if pool is not None and not all(1 <= v <= MAX_POOL_LIMIT for v in pool):
            return None
        return ConvGeometry(c["in_channels"], tuple(c["kernel_shape"]), tuple(c["strides"]),
                            tuple(c["pads"]), tuple(c["dilations"]), None if pool is None else tuple(pool))


@dataclass
class SpnNode:
    """An SpnMatMul node: its shape, its count per row against the exact layer's (spn.LayerCount)."""

    name: str
    inputs: list[str]
    outputs: list[str]
    op_type: str = SPN_OP_TYPE  # or SpnConv (then D is the patch width, the count per output position)
    D: int | None = None
    M: int | None = None
    relu: bool | None = None
    count: LayerCount | None = None  # None when the node cannot be read
    param_bytes: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class Inspection:
    model: str | None
    opset: dict[str, int]
    lookup_nodes: list[LookupNode]
    exact_nodes: list[dict[str, str]]
    problems: list[str]
    spn_nodes: list[SpnNode] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "consistent": self.consistent,
                "opset": dict(self.opset), "lookup_nodes": [asdict(n) for n in self.lookup_nodes],
                "spn_nodes": [asdict(n) for n in self.spn_nodes],
                "exact_nodes": list(self.exact_nodes), "problems": list(self.problems)}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _ints(value, entries: int) -> list[int] | None:
    """`value` as a list of `entries` ints, or None."""
    if isinstance(value, (list, tuple)) and len(value) == entries and all(_is_int(v) for v in value):
        return [int(v) for v in value]
    return None


def _check_conv(a: dict, info: LookupNode) -> None:
    """Read and check a LutConv's geometry attributes into info.conv (D is checked if known)."""
    problems = info.problems
    conv = dict.fromkeys(("in_channels", "kernel_shape", "strides", "pads", "dilations"))
    info.conv = conv
    missing = [k for k in conv if k not in a]
    if missing:
        problems.append(f"missing attribute(s) {', '.join(missing)}")
    if "in_channels" in a:
        if not _is_int(a["in_channels"]):
            problems.append("in_channels must be an integer")
        else:
            conv["in_channels"] = int(a["in_channels"])
            if not 1 <= conv["in_channels"] <= MAX_IN_CHANNELS:
                problems.append(f"in_channels is {conv['in_channels']}, expected 1 to {MAX_IN_CHANNELS}")
    for key, entries, low, high in CONV_ATTRIBUTES:
        if key not in a:
            continue
        values = _ints(a[key], entries)
        if values is None:
            problems.append(f"{key} must be {entries} integers, got {a[key]!r}")
            continue
        conv[key] = values
        bad = [v for v in values if not low <= v <= high]
        if bad:
            bound = "positive" if low == 1 else "non-negative"
            problems.append(f"{key} {values} must be {bound} and at most {high}")
    if MAX_POOL in a:
        pool = _ints(a[MAX_POOL], 4)
        if pool is None or not all(1 <= v <= MAX_POOL_LIMIT for v in pool):
            problems.append(f"{MAX_POOL} must be 4 integers from 1 to {MAX_POOL_LIMIT} (window h, w, stride h, w), "
                            f"got {a[MAX_POOL]!r}")
        conv[MAX_POOL] = pool
    if conv["in_channels"] is not None and conv["kernel_shape"] is not None and info.D is not None:
        kh, kw = conv["kernel_shape"]
        if conv["in_channels"] * kh * kw != info.D:
            problems.append(f"in_channels * kh * kw = {conv['in_channels']} * {kh} * {kw} = "
                            f"{conv['in_channels'] * kh * kw}, but D = {info.D}")


def _check_shapes(node: onnx.NodeProto, info: LookupNode, shapes: dict[str, list[int | None]]) -> None:
    """The statically known input and output shapes against D, M (and a LutConv's geometry)."""
    problems = info.problems
    x, y = shapes.get(node.input[0]), shapes.get(node.output[0])
    if info.conv is None:
        for tensor, shape, width, label in ((node.input[0], x, info.D, "D"), (node.output[0], y, info.M, "M")):
            if shape and shape[-1] is not None and width is not None and shape[-1] != width:
                problems.append(f"tensor '{tensor}' has last dimension {shape[-1]}, but {label} = {width}")
        return
    for tensor, shape, what, channels, label in ((node.input[0], x, "input", info.conv["in_channels"],
                                                  "in_channels"),
                                                 (node.output[0], y, "output", info.M, "M")):
        if shape is None:
            continue
        if len(shape) != 4:
            problems.append(f"{what} '{tensor}' has rank {len(shape)}, expected 4 (NCHW)")
        elif shape[1] is not None and channels is not None and shape[1] != channels:
            problems.append(f"{what} '{tensor}' has {shape[1]} channels, but {label} = {channels}")
    g = info.geometry()
    if g is None or x is None or len(x) != 4 or x[2] is None or x[3] is None:
        return
    H, W = x[2], x[3]
    if not (1 <= H <= MAX_SIDE and 1 <= W <= MAX_SIDE):
        problems.append(f"input '{node.input[0]}' is {H} x {W}; height and width must lie in [1, {MAX_SIDE}]")
        return
    OH, OW = g.output_size(H, W)
    want, what = (OH, OW), "the convolution"
    if g.max_pool is not None and OH >= 1 and OW >= 1:
        kh, kw = g.max_pool[:2]
        if OH < kh or OW < kw:
            problems.append(f"the convolution's output of {OH} x {OW} is smaller than the fused max_pool window "
                            f"{kh} x {kw}")
            return
        want, what = pooled_size(OH, OW, g.max_pool), "the convolution and max_pool"
    if OH < 1 or OW < 1:
        problems.append(f"input '{node.input[0]}' of {H} x {W} is smaller than the dilated kernel "
                        f"(output {OH} x {OW})")
    elif y is not None and len(y) == 4 and any(d is not None and d != w for d, w in zip(y[2:], want)):
        problems.append(f"output '{node.output[0]}' is {y[2]} x {y[3]}, but {what} of a "
                        f"{H} x {W} input gives {want[0]} x {want[1]}")


def check_node(node: onnx.NodeProto, shapes: dict[str, list[int | None]] | None = None) -> LookupNode:
    """Describe one LutMatMul or LutConv node and list what is inconsistent about it."""
    a = attributes(node)
    info = LookupNode(node.name, node.domain, list(node.input), list(node.output), node.op_type)
    problems = info.problems
    if node.domain != DOMAIN:
        problems.append(f"domain '{node.domain}', expected '{DOMAIN}'")
    if len(node.input) != 1 or len(node.output) != 1:
        problems.append(f"has {len(node.input)} input(s) and {len(node.output)} output(s), expected 1 and 1")
    missing = [k for k in REQUIRED if k not in a]
    if missing:
        problems.append(f"missing attribute(s) {', '.join(missing)}")
    for key in ("D", "M", "C", "K"):
        if _is_int(a.get(key)):
            setattr(info, key, int(a[key]))
    if node.op_type == CONV_OP_TYPE:
        _check_conv(a, info)
    for key in ("partition", "table_loss", "source_op"):
        if isinstance(a.get(key), str):
            setattr(info, key, a[key])
    if "relu" in a:
        info.relu = bool(a["relu"])
        if a["relu"] not in (0, 1):
            problems.append(f"relu is {a['relu']}, expected 0 or 1")
    if "scale" in a:
        scale = float(a["scale"])
        info.scale = scale if np.isfinite(scale) else None  # JSON has no NaN or Inf
        if not (np.isfinite(scale) and scale > 0):
            problems.append(f"scale must be finite and > 0, got {scale}")
    info.param_bytes = parameter_bytes(a)
    if shapes is not None and len(node.input) == 1 and len(node.output) == 1:
        _check_shapes(node, info, shapes)
    if missing:
        return info
    wrong = [k for k in ("D", "M", "C", "K") if getattr(info, k) is None]
    if wrong:
        problems.append(f"attribute(s) {', '.join(wrong)} must be integers")
        return info
    D, M, C = info.D, info.M, info.C
    if info.K != K:
        problems.append(f"K is {info.K}, expected {K}")
    tables = np.asarray(a["tables"])
    if tables.dtype != np.uint8:
        problems.append(f"tables have dtype {tables.dtype}, expected uint8")
    if tables.shape != (M, C, K):
        problems.append(f"tables have shape {list(tables.shape)}, expected [M, C, 16] = [{M}, {C}, {K}]")
    for key, want in (("split_dims", C * DEPTH), ("thresholds", C * NODES), ("offsets", C), ("bias", M)):
        if len(a[key]) != want:
            problems.append(f"{key} has {len(a[key])} entries, expected {want}")
    split = np.asarray(a["split_dims"], dtype=np.int64)
    if split.size:
        bad = int(np.sum((split < 0) | (split >= D)))
        if bad:
            problems.append(f"{bad} split dimension(s) outside [0, {D}) (range {split.min()}..{split.max()})")
        info.split_dims_used = int(len(np.unique(split)))
    thr = np.asarray(a["thresholds"], dtype=np.float32)
    finite = np.isfinite(thr)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} threshold(s) are not finite")
    if finite.any():
        info.threshold_range = [float(thr[finite].min()), float(thr[finite].max())]
    for key in ("offsets", "bias"):
        values = np.asarray(a[key], dtype=np.float32)
        if not np.all(np.isfinite(values)):
            problems.append(f"{int((~np.isfinite(values)).sum())} {key} value(s) are not finite")
    try:
        params = params_from_node(node)
        if params.D != D or params.M != M or params.C != C:
            problems.append(f"attributes say D, M, C = {D}, {M}, {C}; the arrays say "
                            f"{params.D}, {params.M}, {params.C}")
    except Exception as exc:  # LutParams validation, reshape of wrong-length lists
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not problems:  # otherwise it restates what is already listed
            problems.append(f"params_from_node fails: {message}")
    return info


def check_spn_node(node: onnx.NodeProto) -> SpnNode:
    """An SpnMatMul node read back (spn.params_from_node, which SpnParams validates), with its
    count; a node that cannot be read gets the reason as its problem."""
    info = SpnNode(node.name, list(node.input), list(node.output), node.op_type)
    a = attributes(node)
    info.param_bytes = parameter_bytes(a)
    try:
        params, info.relu = spn_params_from_node(node)
        info.D, info.M = params.wb.shape[1], params.wc.shape[0]
        for key, want in (("D", info.D), ("M", info.M), ("R", params.width)):
            if a.get(key) != want:
                info.problems.append(f"attribute {key} = {a.get(key)}, the arrays say {want}")
        for key in ("wb", "wc"):
            if np.any((np.asarray(a[key], np.uint8)[..., None] >> np.array([0, 2, 4, 6], np.uint8)) & 3 == 3):
                info.problems.append(f"{key} holds the invalid 2-bit code 3")
        if not np.all(np.isfinite(params.a)) or not np.all(np.isfinite(params.bias)):
            info.problems.append("a or bias holds values that are not finite")
        info.count = LayerCount.of(params)
    except Exception as exc:  # a missing attribute, wrong sizes
        info.problems.append(f"cannot be read: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    return info


def inspect_model(model: onnx.ModelProto | str | os.PathLike) -> Inspection:
    """Every LutMatMul and LutConv node of `model` with its configuration and problems (see the
    module doc), and the MatMul, Gemm and Conv nodes left exact."""
    path = None
    if not isinstance(model, onnx.ModelProto):
        from ..compile.frontend import load_model
        path = os.fspath(model)
        model = load_model(path)
    opset = {o.domain: int(o.version) for o in model.opset_import}
    shapes = _static_shapes(model)
    nodes, exact, problems, spn_nodes = [], [], [], []
    for node in model.graph.node:
        if is_lookup(node) or is_spn(node):
            info = check_node(node, shapes) if is_lookup(node) else check_spn_node(node)
            (nodes if is_lookup(node) else spn_nodes).append(info)
            problems += [f"{info.name}: {p}" for p in info.problems]
        elif node.op_type in EXACT_OPS and node.domain in ("", "ai.onnx"):
            exact.append({"name": node.name, "op_type": node.op_type})
    if (nodes or spn_nodes) and DOMAIN not in opset:
        kinds = " and ".join(dict.fromkeys(n.op_type for n in nodes + spn_nodes))
        problems.append(f"the model has {kinds} nodes but does not import the '{DOMAIN}' opset")
    return Inspection(path, opset, nodes, exact, problems, spn_nodes)


def format_geometry(conv: dict | None) -> str:
    """A LutConv's geometry in a table cell: "16ch 3x3 s1 p1 d1" (pairs and pads written out
    in full when their entries differ: "s1x2", "p0,1,0,1"), and "+ maxpool 2x2/2" when one is fused."""
    if conv is None:
        return "-"

    def entries(key: str, sep: str) -> str:
        v = conv.get(key)
        if v is None:
            return "?"
        return str(v[0]) if len(set(v)) == 1 else sep.join(map(str, v))

    cin = "?" if conv.get("in_channels") is None else conv["in_channels"]
    k = conv.get("kernel_shape")
    kernel = "?" if k is None else "x".join(map(str, k))
    text = f"{cin}ch {kernel} s{entries('strides', 'x')} p{entries('pads', ',')} d{entries('dilations', 'x')}"
    if MAX_POOL in conv:
        pool = conv[MAX_POOL]
        if pool is None:
            return text + " + maxpool ?"
        strides = str(pool[2]) if pool[2] == pool[3] else f"{pool[2]}x{pool[3]}"
        text += f" + maxpool {pool[0]}x{pool[1]}/{strides}"
    return text


def format_exact(exact: list[dict[str, str]], shown: int = EXACT_NAMES_SHOWN) -> str:
    """The "exact ... left" line: every node when there are at most `shown`, otherwise the count
    per op type and the first few names (`--json` lists them all)."""
    label = "exact MatMul/Gemm/Conv left"
    if not exact:
        return f"{label}: none"
    names = [f"{e['name']} ({e['op_type']})" for e in exact]
    if len(exact) <= shown:
        return f"{label}: {', '.join(names)}"
    head = max(1, shown - 2)
    counts = ", ".join(f"{n} {op}" for op, n in Counter(e["op_type"] for e in exact).items())
    return (f"{label}: {len(exact)} ({counts}): {', '.join(names[:head])} and {len(exact) - head} more "
            f"(--json lists them all)")


def format_inspection(result: Inspection) -> str:
    """The terminal table and summary line of `lutcompile inspect`."""
    lines = []
    if result.lookup_nodes:
        convs = any(n.conv is not None for n in result.lookup_nodes)  # the column only for CNNs
        rows = [("node", "D x M") + (("conv",) if convs else ())
                + ("C", "relu", "partition", "tables", "source", "scale", "thresholds", "bytes", "status")]
        for n in result.lookup_nodes:
            rows.append((n.name, f"{_s(n.D)} x {_s(n.M)}") + ((format_geometry(n.conv),) if convs else ())
                        + (_s(n.C), {True: "yes", False: "no", None: "-"}[n.relu],
                           n.partition or "-", n.table_loss or "-", n.source_op or "-",
                           "-" if n.scale is None else f"{n.scale:.4g}",
                           "-" if n.threshold_range is None
                           else f"{n.threshold_range[0]:.3g}..{n.threshold_range[1]:.3g}",
                           human_bytes(n.param_bytes), "ok" if not n.problems else "INCONSISTENT"))
        lines += format_table(rows)
    elif not result.spn_nodes:
        lines.append("no LutMatMul, LutConv or SpnMatMul nodes: this model is not compiled by lutcompile")
    if result.spn_nodes:
        rows = [("sum-product node", "op", "D x M", "r", "relu", "activations", "mults/row", "vs exact", "adds/row",
                 "vs exact", "zeros Wb / Wc", "bytes", "status")]
        for n in result.spn_nodes:
            c = n.count
            rows.append((n.name, n.op_type, f"{_s(n.D)} x {_s(n.M)}") + (("-",) * 8 if c is None else (
                str(c.width), {True: "yes", False: "no", None: "-"}[n.relu], c.activations, f"{c.multiplications:,}",
                f"{c.exact_multiplications:,}", f"{c.additions:,}", f"{c.exact_additions:,}",
                f"{100 * c.wb_zeros:.0f} % / {100 * c.wc_zeros:.0f} %")) + (
                human_bytes(n.param_bytes), "ok" if not n.problems else "INCONSISTENT"))
        lines += format_table(rows)
    lines.append(format_exact(result.exact_nodes))
    total = sum(n.param_bytes for n in result.lookup_nodes)
    if not result.consistent:
        verdict = f"{len(result.problems)} problem(s) found"
    else:
        verdict = "tables consistent" if result.lookup_nodes or result.spn_nodes else "nothing to check"
    spn = (f", {len(result.spn_nodes)} sum-product node(s) with "
           f"{sum(n.count.multiplications for n in result.spn_nodes if n.count):,} multiplications per row"
           if result.spn_nodes else "")
    lines.append(f"{len(result.lookup_nodes)} lookup node(s), {human_bytes(total)} of lookup parameters{spn}; "
                 f"{verdict}")
    return "\n".join(lines)


def _s(value) -> str:
    return "-" if value is None else str(value)


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns two spaces apart, as the compile summary prints them."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
