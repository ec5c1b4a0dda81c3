"""`lutcompile inspect`: list a compiled model's lookup nodes and check that their tables hold together.

    lutcompile inspect fast.onnx [--json]

Every `LutMatMul` node (domain `ai.lutcompile`, see docs/lutmatmul.md) is read back with
`rewrite.params_from_node`, which validates the array shapes through `LutParams`, and is then
checked further: the required attributes are present, `K` is 16, `D`, `M` and `C` agree with
the arrays (`tables` is uint8 [M, C, 16], `split_dims` has C*4 entries, `thresholds` C*15,
`offsets` C, `bias` M), every split dimension lies in [0, D), thresholds, offsets and bias are
finite, `scale` is finite and > 0, `relu` is 0 or 1, the node has one input and one output
whose statically known last dimensions are D and M, and the model imports the
`ai.lutcompile` opset. Thresholds need not be sorted in any way.

JSON schema (`--json`; `inspect_model(...).to_json()`), version "lutcompile.inspect/1":

    {
      "schema": "lutcompile.inspect/1",
      "model": str | null,              # path, when inspected from a file
      "consistent": bool,               # no problem anywhere
      "opset": {domain: int},           # the model's opset imports ("" is the ONNX domain)
      "lookup_nodes": [                 # graph order
        {
          "name": str, "domain": str,
          "inputs": [str], "outputs": [str],
          "D": int | null, "M": int | null, "C": int | null, "K": int | null,
          "relu": bool | null,
          "partition": str | null, "table_loss": str | null, "source_op": str | null,
          "scale": float | null,
          "threshold_range": [float, float] | null,   # min and max over the finite thresholds
          "split_dims_used": int | null,              # distinct input dimensions tested
          "param_bytes": int,           # tables + thresholds + split_dims (int32) + offsets + bias
          "problems": [str]             # empty when the node is consistent
        }
      ],
      "exact_nodes": [{"name": str, "op_type": str}],  # MatMul / Gemm nodes left exact
      "problems": [str]                 # every problem, each prefixed by its node's name
    }
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .lut import DEPTH, DOMAIN, K, NODES, OP_TYPE
from .rewrite import params_from_node

SCHEMA = "lutcompile.inspect/1"
REQUIRED = ("D", "M", "C", "K", "split_dims", "thresholds", "tables", "scale", "offsets", "bias")
EXACT_OPS = ("MatMul", "Gemm")


@dataclass
class LookupNode:
    name: str
    domain: str
    inputs: list[str]
    outputs: list[str]
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
    problems: list[str] = field(default_factory=list)


@dataclass
class Inspection:
    model: str | None
    opset: dict[str, int]
    lookup_nodes: list[LookupNode]
    exact_nodes: list[dict[str, str]]
    problems: list[str]

    @property
    def consistent(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "consistent": self.consistent,
                "opset": dict(self.opset), "lookup_nodes": [asdict(n) for n in self.lookup_nodes],
                "exact_nodes": list(self.exact_nodes), "problems": list(self.problems)}


def attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values (TENSOR attributes as numpy arrays, strings decoded)."""
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, onnx.TensorProto):
            value = onnx.numpy_helper.to_array(value)
        elif isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        out[a.name] = value
    return out


def lut_param_bytes(attrs: dict) -> int:
    """Bytes a LutMatMul's parameters take as the kernel stores them (the compile report's figure):
    uint8 tables, int32 split dims, float32 thresholds, offsets and bias."""
    tables = attrs.get("tables")
    size = int(np.asarray(tables).size) if tables is not None else 0
    return (size + 4 * len(attrs.get("split_dims", ())) + 4 * len(attrs.get("thresholds", ()))
            + 4 * len(attrs.get("offsets", ())) + 4 * len(attrs.get("bias", ())))


def is_lookup(node: onnx.NodeProto) -> bool:
    return node.op_type == OP_TYPE


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def check_node(node: onnx.NodeProto, shapes: dict[str, list[int | None]] | None = None) -> LookupNode:
    """Describe one LutMatMul node and list what is inconsistent about it."""
    a = attributes(node)
    info = LookupNode(node.name, node.domain, list(node.input), list(node.output))
    problems = info.problems
    if node.domain != DOMAIN:
        problems.append(f"domain '{node.domain}', expected '{DOMAIN}'")
    if len(node.input) != 1 or len(node.output) != 1:
        problems.append(f"has {len(node.input)} input(s) and {len(node.output)} output(s), expected 1 and 1")
    missing = [k for k in REQUIRED if k not in a]
    if missing:
        problems.append(f"missing attribute(s) {', '.join(missing)}")
    for key in ("D", "M", "C", "K"):
        if isinstance(a.get(key), int):
            setattr(info, key, int(a[key]))
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
    info.param_bytes = lut_param_bytes(a)
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
    if shapes is not None and len(node.input) == 1 and len(node.output) == 1:
        for tensor, width, label in ((node.input[0], D, "D"), (node.output[0], M, "M")):
            shape = shapes.get(tensor)
            if shape and shape[-1] is not None and shape[-1] != width:
                problems.append(f"tensor '{tensor}' has last dimension {shape[-1]}, but {label} = {width}")
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


def inspect_model(model: onnx.ModelProto | str | os.PathLike) -> Inspection:
    """Every LutMatMul node of `model` with its configuration and problems (see the module doc)."""
    path = None
    if not isinstance(model, onnx.ModelProto):
        from .frontend import load_model
        path = os.fspath(model)
        model = load_model(path)
    opset = {o.domain: int(o.version) for o in model.opset_import}
    shapes = _static_shapes(model)
    nodes, exact, problems = [], [], []
    for node in model.graph.node:
        if is_lookup(node):
            info = check_node(node, shapes)
            nodes.append(info)
            problems += [f"{info.name}: {p}" for p in info.problems]
        elif node.op_type in EXACT_OPS:
            exact.append({"name": node.name, "op_type": node.op_type})
    if nodes and DOMAIN not in opset:
        problems.append(f"the model has LutMatMul nodes but does not import the '{DOMAIN}' opset")
    return Inspection(path, opset, nodes, exact, problems)


def format_inspection(result: Inspection) -> str:
    """The terminal table and summary line of `lutcompile inspect`."""
    lines = []
    if result.lookup_nodes:
        rows = [("node", "D x M", "C", "relu", "partition", "tables", "source", "scale", "thresholds",
                 "bytes", "status")]
        for n in result.lookup_nodes:
            rows.append((n.name, f"{n.D} x {n.M}", _s(n.C), {True: "yes", False: "no", None: "-"}[n.relu],
                         n.partition or "-", n.table_loss or "-", n.source_op or "-",
                         "-" if n.scale is None else f"{n.scale:.4g}",
                         "-" if n.threshold_range is None
                         else f"{n.threshold_range[0]:.3g}..{n.threshold_range[1]:.3g}",
                         human_bytes(n.param_bytes), "ok" if not n.problems else "INCONSISTENT"))
        lines += format_table(rows)
    else:
        lines.append("no LutMatMul nodes: this model is not compiled by lutcompile")
    exact = ", ".join(f"{e['name']} ({e['op_type']})" for e in result.exact_nodes) or "none"
    lines.append(f"exact MatMul/Gemm left: {exact}")
    total = sum(n.param_bytes for n in result.lookup_nodes)
    if not result.consistent:
        verdict = f"{len(result.problems)} problem(s) found"
    else:
        verdict = "tables consistent" if result.lookup_nodes else "nothing to check"
    lines.append(f"{len(result.lookup_nodes)} lookup node(s), {human_bytes(total)} of lookup parameters; "
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
