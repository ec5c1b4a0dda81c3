"""`lutcompile diff`: what changed between two ONNX models, node by node (typically an original
model and the model lutcompile compiled from it).

    lutcompile diff MODEL_A MODEL_B [--calib NPZ] [--json] [--exit-code]

Nodes are paired by name (the compiler keeps each replaced node's name; unnamed nodes get the
names the compiler gives them, `<op>_<index>`). A pair is

- "replaced"  when the op type or domain differs (Gemm -> ai.lutcompile:LutMatMul,
              Conv -> ai.lutcompile:LutConv),
- "changed"   when the op is the same but inputs, outputs, attributes or the values of the
              initializers it reads differ (say, weights the fine-tune pass retrained),
- "unchanged" otherwise.

Attributes and parameters compare by value: a tensor (an initializer, a TENSOR attribute such
as a Constant's `value` or a lookup's `tables`) by dtype, shape and values, NaN equal to NaN,
whatever its name or encoding (raw bytes or typed fields); other attributes by type and value.
Subgraph and sparse-tensor attributes compare as serialised protos.

A node only in A is "absorbed" when a lookup node of B (LutMatMul or LutConv) took its place:
walking from the lookup's namesake in A along sole consumers missing from B (a folded Add, a
fused Relu) reaches the tensor the lookup produces; otherwise it is "removed". A node only in
B is "added".

Parameter bytes of a node: the bytes of the initializers (and Constant-node values) it reads,
or, for a lookup node, of its attributes as the kernel stores them (uint8 tables, int32 split
dimensions, float32 thresholds, offsets and bias; `node_format.parameter_bytes`), which is the
compile report's figure. D x M: a lookup's `D` and `M` (a LutConv's D is in_channels * kh * kw,
M its output channels); for MatMul / Gemm with a constant 2-D weight, the weight's shape
(after Gemm's transB); for a Conv with a constant weight [M, Cin/group, kh, kw], the same
patch width (Cin/group) * kh * kw by M output channels.

With calibration data (`--calib`, the same .npz format as compiling), both models run in
onnxruntime on its rows, with each paired node's first output added as a graph output. For a
pair, B's output tensor is compared with A's tensor of the same name (a lookup node produces the
tensor its last absorbed node produced; when B added helper nodes after it, such as the
Transpose after a product with the constant on the left, the tensor they lead to):

    relative_error = ||B[t] - A[t]||_F / ||A[t]||_F        over all rows (float64 sums)

This is the error accumulated up to that tensor (earlier replaced nodes feed later ones), not
a node's error in isolation (the compile summary's `rel.err` is that). When the data has
integer `labels`, the top-1 accuracy of each model's first output is reported too.

Exit status of `lutcompile diff`: 0 when the comparison ran (whether or not the models differ:
comparing an original with its compiled model is the normal use); with `--exit-code`, 1 when
the graphs differ and 0 when they are identical, like `git diff --exit-code`. Bad input:
2 bad command line, 3 unreadable model, 4 bad calibration data (see `lutcompile.cli`).

JSON schema (`--json`; `ModelDiff.to_json()`), version "lutcompile.diff/1":

    {
      "schema": "lutcompile.diff/1",
      "model_a": str | null, "model_b": str | null,      # paths, when read from files
      "identical": bool,
      "summary": {
        "nodes_a": int, "nodes_b": int,
        "replaced": int, "changed": int, "unchanged": int,
        "absorbed": int, "removed": int, "added": int,
        "param_bytes_a": int, "param_bytes_b": int,    # every node's parameters, each counted once
        "graph_changes": [str]                         # graph inputs, outputs, opset imports
      },
      "nodes": [                                       # A's order; nodes only in B at the end
        {
          "name": str,
          "status": "replaced" | "changed" | "unchanged" | "absorbed" | "removed" | "added",
          "changes": [str],              # what differs: "op_type", "domain", "inputs", "outputs",
                                         # "attributes: <names>", "parameters: <names>"
          "a": side | null, "b": side | null,          # null when the node is absent there
          "absorbed_into": str | null,   # "absorbed": the B node that took its place
          "absorbs": [str],              # a B lookup node: the A nodes it absorbed
          "output": str | null,          # paired nodes: the tensor compared with calibration
                                         # data (B's output, past any helper node B added)
          "relative_error": float | null # with calibration data, for paired nodes
        }
      ],
      "calibration": null | {
        "data": str,                     # the .npz path, or "<in memory>"
        "rows": int,                     # rows compared
        "labels": bool,
        "accuracy_a": float | null, "accuracy_b": float | null   # top-1, when labels exist
      }
    }

    side = {
      "op_type": str, "domain": str,     # "" is the ONNX domain
      "inputs": [str], "outputs": [str],
      "D": int | null, "M": int | null,
      "param_bytes": int,
      "lut": null | {"C": int, "relu": bool, "partition": str | null,
                     "table_loss": str | null, "source_op": str | null},
      "spn": null | {"width": int, "multiplications": int, "additions": int,   # SpnMatMul, per row
                     "exact_multiplications": int, "exact_additions": int, "wb_zeros": float, "wc_zeros": float,
                     "activations": "float32" | "uint8"},
      "multiplications": int | null      # per row (per output position of a Conv): D x M for an
                                         # exact product, M for a lookup (its scale), r for an SpnMatMul
                                         # (more with uint8 activations: ops.spn.multiplications)
    }
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..onnx_io import external_data
from ..ops.node_format import attributes, is_lookup, parameter_bytes
from ..ops.spn import LayerCount, is_spn, params_from_node as spn_params_from_node
from .inspection import format_table

SCHEMA = "lutcompile.diff/1"
STATUSES = ("replaced", "changed", "unchanged", "absorbed", "removed", "added")
log = logging.getLogger("lutcompile")


@dataclass
class Side:
    op_type: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    D: int | None
    M: int | None
    param_bytes: int
    lut: dict | None
    spn: dict | None = None  # an SpnMatMul's ops.spn.LayerCount
    multiplications: int | None = None  # per row (a Conv: per output position)

    def to_json(self) -> dict:
        return dict(op_type=self.op_type, domain=self.domain, inputs=list(self.inputs),
                    outputs=list(self.outputs), D=self.D, M=self.M, param_bytes=self.param_bytes,
                    lut=None if self.lut is None else dict(self.lut), spn=None if self.spn is None else dict(self.spn),
                    multiplications=self.multiplications)


@dataclass
class NodeDiff:
    name: str
    status: str
    a: Side | None
    b: Side | None
    changes: list[str] = field(default_factory=list)
    absorbed_into: str | None = None
    absorbs: list[str] = field(default_factory=list)
    output: str | None = None
    relative_error: float | None = None

    def to_json(self) -> dict:
        return dict(name=self.name, status=self.status, changes=list(self.changes),
                    a=None if self.a is None else self.a.to_json(),
                    b=None if self.b is None else self.b.to_json(),
                    absorbed_into=self.absorbed_into, absorbs=list(self.absorbs),
                    output=self.output, relative_error=self.relative_error)


@dataclass
class ModelDiff:
    model_a: str | None
    model_b: str | None
    nodes: list[NodeDiff]
    nodes_a: int
    nodes_b: int
    param_bytes_a: int
    param_bytes_b: int
    graph_changes: list[str]
    calibration: dict | None = None

    def count(self, status: str) -> int:
        return sum(n.status == status for n in self.nodes)

    @property
    def identical(self) -> bool:
        return not self.graph_changes and all(n.status == "unchanged" for n in self.nodes)

    def node(self, name: str) -> NodeDiff:
        return next(n for n in self.nodes if n.name == name)

    def to_json(self) -> dict:
        summary = {"nodes_a": self.nodes_a, "nodes_b": self.nodes_b}
        summary.update({s: self.count(s) for s in STATUSES})
        summary.update(param_bytes_a=self.param_bytes_a, param_bytes_b=self.param_bytes_b,
                       graph_changes=list(self.graph_changes))
        return {"schema": SCHEMA, "model_a": self.model_a, "model_b": self.model_b,
                "identical": self.identical, "summary": summary,
                "nodes": [n.to_json() for n in self.nodes],
                "calibration": None if self.calibration is None else dict(self.calibration)}


class _Graph:
    """A model's nodes by name, its constants, and who consumes each tensor."""

    def __init__(self, model: onnx.ModelProto):
        from ..compile.frontend import name_nodes
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        name_nodes(self.model)
        graph = self.model.graph
        self.nodes = list(graph.node)
        self.by_name = {n.name: n for n in self.nodes}
        self.initializers = {t.name: t for t in graph.initializer}
        self.constants = {n.output[0]: n.attribute[0].t for n in self.nodes
                          if n.op_type == "Constant" and n.output and n.attribute
                          and n.attribute[0].type == onnx.AttributeProto.TENSOR}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for t in n.input:
                self.consumers[t].append(n)
        self.produced = {t for n in self.nodes for t in n.output if t}
        self.produced |= {i.name for i in graph.input}
        self._arrays: dict[str, np.ndarray] = {}
        from ..compile.prune import narrowed_columns
        self.columns = narrowed_columns(self.model)  # tensors holding only some original columns

    def array(self, name: str) -> np.ndarray | None:
        if name not in self._arrays:
            proto = self.initializers.get(name) or self.constants.get(name)
            self._arrays[name] = None if proto is None else external_data.tensor_array(proto)
        return self._arrays[name]

    def parameters(self, node: onnx.NodeProto) -> list[str]:
        return [t for t in node.input if t and self.array(t) is not None]

    def side(self, node: onnx.NodeProto) -> Side:
        D = M = lut = None
        if is_spn(node):
            a = attributes(node)
            try:
                count = asdict(LayerCount.of(spn_params_from_node(node)[0]))
            except Exception:  # unreadable: inspect says why
                count = None
            return Side(node.op_type, node.domain, list(node.input), list(node.output), _int(a.get("D")),
                        _int(a.get("M")), parameter_bytes(a), None, count,
                        None if count is None else count["multiplications"])
        if is_lookup(node):
            a = attributes(node)
            D, M = _int(a.get("D")), _int(a.get("M"))
            lut = {"C": _int(a.get("C")), "relu": bool(a.get("relu", 0)),
                   "partition": _str(a.get("partition")), "table_loss": _str(a.get("table_loss")),
                   "source_op": _str(a.get("source_op"))}
            nbytes = parameter_bytes(a)
        else:
            nbytes = sum(int(self.array(t).nbytes) for t in self.parameters(node))
            if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
                left, right = self.array(node.input[0]), self.array(node.input[1])
                flags = {x.name: x.i for x in node.attribute if x.name in ("transA", "transB")}
                if right is not None and left is None and right.ndim == 2:  # X @ W
                    D, M = right.shape[::-1] if flags.get("transB") else right.shape
                elif left is not None and right is None and left.ndim == 2:  # W @ X
                    D, M = left.shape if flags.get("transA") else left.shape[::-1]
                D, M = (None, None) if D is None else (int(D), int(M))
            elif node.op_type == "Conv" and len(node.input) > 1 and self.array(node.input[0]) is None:
                weight = self.array(node.input[1])  # [M, Cin/group, kh, kw]: patches [D] to M
                if weight is not None and weight.ndim >= 3:
                    D, M = int(np.prod(weight.shape[1:])), int(weight.shape[0])
        # a lookup multiplies once per output, its sums by the table scale; a product D per output
        mults = M if lut is not None else None if D is None else D * M
        return Side(node.op_type, node.domain, list(node.input), list(node.output), D, M, nbytes, lut,
                    multiplications=mults)

    def total_param_bytes(self) -> int:
        seen, total = set(), 0
        for n in self.nodes:
            if is_lookup(n) or is_spn(n):
                total += parameter_bytes(attributes(n))
                continue
            for t in self.parameters(n):
                if t not in seen:
                    seen.add(t)
                    total += int(self.array(t).nbytes)
        return total


def _int(v) -> int | None:
    return int(v) if isinstance(v, (int, np.integer)) else None


def _str(v) -> str | None:
    return v if isinstance(v, str) else None


def _changes(ga: _Graph, gb: _Graph, a: onnx.NodeProto, b: onnx.NodeProto) -> list[str]:
    changes = []
    if a.op_type != b.op_type:
        changes.append("op_type")
    if a.domain != b.domain:
        changes.append("domain")
    if list(a.input) != list(b.input):
        changes.append("inputs")
    if list(a.output) != list(b.output):
        changes.append("outputs")
    attrs_a = {x.name: x for x in a.attribute}
    attrs_b = {x.name: x for x in b.attribute}
    differ = sorted(k for k in attrs_a.keys() | attrs_b.keys()
                    if k not in attrs_a or k not in attrs_b or not _same_attribute(attrs_a[k], attrs_b[k]))
    if differ:
        changes.append("attributes: " + ", ".join(differ))
    params = []
    for t in dict.fromkeys(list(ga.parameters(a)) + list(gb.parameters(b))):
        x, y = ga.array(t), gb.array(t)
        if x is None or y is None or not _same_array(x, y):
            params.append(t)
    if params:
        changes.append("parameters: " + ", ".join(params))
    return changes


_SERIALISED = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS, onnx.AttributeProto.SPARSE_TENSOR,
               onnx.AttributeProto.SPARSE_TENSORS, onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)


def _same_array(x: np.ndarray, y: np.ndarray) -> bool:
    """Same dtype, shape and values; NaN equals NaN."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    nan_aware = np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating)
    return bool(np.array_equal(x, y, equal_nan=nan_aware))


def _same_value(x, y) -> bool:
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and _same_array(x, y)
    if isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
        return (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and len(x) == len(y)
                and all(_same_value(u, v) for u, v in zip(x, y)))
    if isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y):
        return True
    return x == y


def _same_attribute(x: onnx.AttributeProto, y: onnx.AttributeProto) -> bool:
    """Whether two attributes of one name mean the same: type and value, tensors as arrays
    (not serialised bytes: an explicit empty tensor name or raw_data against typed fields
    leaves the value as it is)."""
    if x.type != y.type or x.ref_attr_name != y.ref_attr_name:
        return False
    if x.ref_attr_name:
        return True  # both refer to the same function attribute
    if x.type in _SERIALISED:
        return x.SerializeToString(deterministic=True) == y.SerializeToString(deterministic=True)
    if x.type == onnx.AttributeProto.TENSOR:
        return _same_array(external_data.tensor_array(x.t), external_data.tensor_array(y.t))
    if x.type == onnx.AttributeProto.TENSORS:
        return len(x.tensors) == len(y.tensors) and all(
            _same_array(external_data.tensor_array(u), external_data.tensor_array(v))
            for u, v in zip(x.tensors, y.tensors))
    return _same_value(onnx.helper.get_attribute_value(x), onnx.helper.get_attribute_value(y))


def _graph_changes(a: onnx.ModelProto, b: onnx.ModelProto) -> list[str]:
    out = []
    for kind, xs, ys in (("input", a.graph.input, b.graph.input), ("output", a.graph.output, b.graph.output)):
        tx = {v.name: v.type.SerializeToString(deterministic=True) for v in xs}
        ty = {v.name: v.type.SerializeToString(deterministic=True) for v in ys}
        init_a = {t.name for t in a.graph.initializer}
        init_b = {t.name for t in b.graph.initializer}
        for name in tx.keys() - ty.keys():
            if name not in init_a:
                out.append(f"graph {kind} '{name}' removed")
        for name in ty.keys() - tx.keys():
            if name not in init_b:
                out.append(f"graph {kind} '{name}' added")
        for name in sorted(tx.keys() & ty.keys()):
            if tx[name] != ty[name]:
                out.append(f"graph {kind} '{name}' changed type or shape")
    oa = {o.domain: o.version for o in a.opset_import}
    ob = {o.domain: o.version for o in b.opset_import}
    for d in sorted(oa.keys() | ob.keys()):
        label = d or "ai.onnx"
        if d not in ob:
            out.append(f"opset {label} v{oa[d]} removed")
        elif d not in oa:
            out.append(f"opset {label} v{ob[d]} added")
        elif oa[d] != ob[d]:
            out.append(f"opset {label} v{oa[d]} -> v{ob[d]}")
    return out


def _result_tensor(ga: _Graph, gb: _Graph, node: onnx.NodeProto) -> str | None:
    """The first tensor A also has that a B node's output reaches, along sole consumers B added
    (a lookup for a product with the constant on the left is followed by a new Transpose)."""
    if not node.output or not node.output[0]:
        return None
    tensor = node.output[0]
    for _ in range(len(gb.nodes) + 1):
        if tensor in ga.produced:
            return tensor
        users = gb.consumers.get(tensor, [])
        if len(users) != 1 or users[0].name in ga.by_name or not users[0].output:
            return None
        tensor = users[0].output[0]
    return None


def _absorbed(ga: _Graph, gb: _Graph, lookup: onnx.NodeProto) -> list[str]:
    """The A nodes a B lookup node (LutMatMul or LutConv) took the place of, beyond its
    namesake ([] if none or unclear)."""
    start = ga.by_name.get(lookup.name)
    target = _result_tensor(ga, gb, lookup)
    if start is None or not start.output or target is None:
        return []
    cur, chain = start, []
    for _ in range(len(ga.nodes)):
        if cur.output[0] == target:
            return chain
        users = ga.consumers.get(cur.output[0], [])
        if len(users) != 1 or users[0].name in gb.by_name or not users[0].output:
            return []
        cur = users[0]
        chain.append(cur.name)
    return []


def diff_models(model_a: onnx.ModelProto | str | os.PathLike, model_b: onnx.ModelProto | str | os.PathLike,
                calibration_data=None, batch_size: int = 512) -> ModelDiff:
    """Pair the nodes of A and B by name and describe what changed (see the module doc).

    calibration_data: None, or anything compile_model accepts (an .npz path, a dict of arrays,
    a CalibrationDataReader-shaped object); adds each paired node's relative output error and,
    with labels, both models' accuracy.
    """
    from ..compile.frontend import load_model
    path_a = path_b = None
    if not isinstance(model_a, onnx.ModelProto):
        path_a = os.fspath(model_a)
        model_a = load_model(path_a)
    if not isinstance(model_b, onnx.ModelProto):
        path_b = os.fspath(model_b)
        model_b = load_model(path_b)
    ga, gb = _Graph(model_a), _Graph(model_b)
    absorbed_into: dict[str, str] = {}
    absorbs: dict[str, list[str]] = {}
    for n in gb.nodes:
        if (is_lookup(n) or is_spn(n)) and n.name in ga.by_name:
            absorbs[n.name] = _absorbed(ga, gb, n)
            for name in absorbs[n.name]:
                absorbed_into[name] = n.name
    nodes = []
    for a in ga.nodes:
        b = gb.by_name.get(a.name)
        if b is None:
            status = "absorbed" if a.name in absorbed_into else "removed"
            nodes.append(NodeDiff(a.name, status, ga.side(a), None, absorbed_into=absorbed_into.get(a.name)))
            continue
        changes = _changes(ga, gb, a, b)
        if "op_type" in changes or "domain" in changes:
            status = "replaced"
        else:
            status = "changed" if changes else "unchanged"
        nodes.append(NodeDiff(a.name, status, ga.side(a), gb.side(b), changes, absorbs=absorbs.get(b.name, []),
                              output=_result_tensor(ga, gb, b)))
    for b in gb.nodes:
        if b.name not in ga.by_name:
            nodes.append(NodeDiff(b.name, "added", None, gb.side(b)))
    result = ModelDiff(path_a, path_b, nodes, len(ga.nodes), len(gb.nodes), ga.total_param_bytes(),
                       gb.total_param_bytes(), _graph_changes(ga.model, gb.model))
    if calibration_data is not None:
        _compare_outputs(result, ga, gb, calibration_data, batch_size)
    return result


def _compare_outputs(result: ModelDiff, ga: _Graph, gb: _Graph, source, batch_size: int) -> None:
    from ..compile.calibrate import load_calibration
    from ..onnx_io.sessions import iter_batches, make_session
    data = load_calibration(source, ga.model)
    load_calibration(data, gb.model)  # B must take the same inputs
    paired = [n for n in result.nodes if n.output is not None]
    wanted = list(dict.fromkeys(n.output for n in paired))
    runs = []
    for g in (ga, gb):
        probe = onnx.ModelProto()
        probe.CopyFrom(g.model)
        existing = {o.name for o in probe.graph.output}
        for t in wanted:
            if t not in existing:
                probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        names = [g.model.graph.output[0].name] + wanted
        runs.append(iter_batches(make_session(probe), data.inputs, names, batch_size))
    log.info("comparing %d tensor(s) of the two models on %d rows", len(wanted), data.rows)
    sq_diff = dict.fromkeys(wanted, 0.0)
    sq_ref = dict.fromkeys(wanted, 0.0)
    comparable = dict.fromkeys(wanted, True)
    correct = [0, 0]
    for (rows, outs_a), (rows_b, outs_b) in zip(*runs):
        assert rows == rows_b
        for i, outs in enumerate((outs_a, outs_b)):
            if data.labels is not None:
                logits = np.asarray(outs[0]).reshape(rows.stop - rows.start, -1)
                correct[i] += int(np.sum(np.argmax(logits, axis=1) == data.labels[rows]))
        for t, x, y in zip(wanted, outs_a[1:], outs_b[1:]):
            x, y = np.asarray(x), np.asarray(y)
            x, y = _shared_columns(x, ga.columns.get(t), y, gb.columns.get(t))
            if x.shape != y.shape or not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
                comparable[t] = False
                continue
            x, y = x.astype(np.float64), y.astype(np.float64)
            sq_diff[t] += float(np.sum((y - x) ** 2))
            sq_ref[t] += float(np.sum(x ** 2))
    rows_used = data.rows
    for n in paired:
        t = n.output
        if t is None or not comparable[t]:
            continue
        if sq_ref[t] > 0 and np.isfinite(sq_ref[t]) and np.isfinite(sq_diff[t]):
            n.relative_error = float(np.sqrt(sq_diff[t] / sq_ref[t]))
        elif sq_diff[t] == 0:
            n.relative_error = 0.0  # both all zero; otherwise undefined (null)
    labelled = data.labels is not None
    result.calibration = {
        "data": os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<in memory>",
        "rows": rows_used, "labels": labelled,
        "accuracy_a": correct[0] / rows_used if labelled else None,
        "accuracy_b": correct[1] / rows_used if labelled else None,
    }


def _shared_columns(x: np.ndarray, narrowed_x, y: np.ndarray, narrowed_y) -> tuple[np.ndarray, np.ndarray]:
    """x and y on the original features both hold: a tensor the column-pruning pass narrowed
    (compile/prune.py: a prune.Narrowed) holds only some, along its axis; one it did not, all
    of them in order. Shapes that still disagree are left to the caller's shape check."""
    if narrowed_x is None and narrowed_y is None:
        return x, y
    axis = (narrowed_x or narrowed_y).axis
    if x.ndim < abs(axis) or y.ndim < abs(axis):
        return x, y
    index_x = np.arange(x.shape[axis]) if narrowed_x is None else narrowed_x.indices(x.shape[axis])
    index_y = np.arange(y.shape[axis]) if narrowed_y is None else narrowed_y.indices(y.shape[axis])
    if len(index_x) != x.shape[axis] or len(index_y) != y.shape[axis]:
        return x, y
    common = np.intersect1d(index_x, index_y)
    return (np.take(x, np.searchsorted(index_x, common), axis=axis),
            np.take(y, np.searchsorted(index_y, common), axis=axis))


def _op(side: Side | None) -> str:
    if side is None:
        return "-"
    return side.op_type if side.domain in ("", "ai.onnx") else f"{side.domain}:{side.op_type}"


def _both(a, b) -> str:
    a = "-" if a is None else str(a)
    b = "-" if b is None else str(b)
    return a if a == b else f"{a} -> {b}"


def _shape(side: Side | None) -> str | None:
    return None if side is None or side.D is None else f"{side.D} x {side.M}"


def _lut(side: Side | None, key: str):
    return None if side is None or side.lut is None else side.lut.get(key)


def _lut_both(n: NodeDiff, key: str) -> str:
    """A lookup setting; "a -> b" only when both sides are lookups that differ."""
    a, b = _lut(n.a, key), _lut(n.b, key)
    if n.a is not None and n.a.lut is not None and n.b is not None and n.b.lut is not None:
        return _both(a, b)
    value = b if n.b is not None and n.b.lut is not None else a
    return "-" if value is None else str(value)


def format_diff(result: ModelDiff) -> str:
    """The terminal table and summary of `lutcompile diff`."""
    errors = result.calibration is not None
    head = ["node", "status", "op (a -> b)", "D x M", "C", "partition", "tables", "mults/row (a -> b)",
            "bytes (a -> b)"]
    rows = [tuple(head + (["rel.err"] if errors else []))]
    for n in result.nodes:
        if n.status == "absorbed":
            op = f"{_op(n.a)} -> (into {n.absorbed_into})"
        elif n.status == "removed":
            op = f"{_op(n.a)} -> (removed)"
        elif n.status == "added":
            op = f"(new) -> {_op(n.b)}"
        else:
            op = _both(_op(n.a), _op(n.b))
        shape = _both(_shape(n.a), _shape(n.b)) if (n.a and n.a.D) or (n.b and n.b.D) else "-"
        if n.a is not None and n.b is not None and n.a.D is not None and n.b.D is None:
            shape = _shape(n.a)
        row = [n.name, n.status, op, shape] + [_lut_both(n, key) for key in ("C", "partition", "table_loss")]
        row.append(_both(*(None if side is None or side.multiplications is None else f"{side.multiplications:,}"
                           for side in (n.a, n.b))))
        row.append(f"{_bytes(n.a)} -> {_bytes(n.b)}")
        if errors:
            row.append("-" if n.relative_error is None else f"{n.relative_error:.4f}")
        rows.append(tuple(row))
    lines = format_table(rows)
    for n in result.nodes:
        if n.status == "changed":
            lines.append(f"changed {n.name}: {'; '.join(n.changes)}")
    for change in result.graph_changes:
        lines.append(f"graph: {change}")
    lines.append(summary_line(result))
    if errors:
        cal = result.calibration
        lines.append(f"rel.err: ||B - A|| / ||A|| of each paired node's output tensor over {cal['rows']} rows "
                     f"of {cal['data']} (on the columns both compute, where a node computes only those its "
                     f"consumer reads); errors accumulate along the graph")
        if cal["labels"]:
            lines.append(f"accuracy on {cal['rows']} rows: A {cal['accuracy_a']:.2%}, B {cal['accuracy_b']:.2%}")
    return "\n".join(lines)


def _bytes(side: Side | None) -> str:
    return "-" if side is None else f"{side.param_bytes:,}"


def summary_line(result: ModelDiff) -> str:
    if result.identical:
        return f"identical: {result.nodes_a} node(s) unchanged, {result.param_bytes_a:,} parameter bytes"
    counts = ", ".join(f"{result.count(s)} {s}" for s in STATUSES)
    ratio = ""
    if result.param_bytes_b and result.param_bytes_a != result.param_bytes_b:
        r = result.param_bytes_a / result.param_bytes_b
        ratio = f" ({r:.1f}x smaller)" if r >= 1 else f" ({1 / r:.1f}x larger)"
    return (f"{counts}; {result.nodes_a} -> {result.nodes_b} nodes; parameters "
            f"{result.param_bytes_a:,} -> {result.param_bytes_b:,} bytes{ratio}")
