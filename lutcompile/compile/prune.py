"""After the train stage: lookup producers compute only the features their consumer's trees read.

A lookup node reads only the 4·C split dimensions of its input: the other inputs change no
code, so no output. When that input is made by another lookup node and nothing else reads it,
the producer can drop the features no tree reads:
- LutMatMul -> LutMatMul, directly or through element-wise activations: the producer's output
  columns; the consumer's split dimensions are renumbered into a dense row of the kept ones;
- LutConv -> LutConv, through element-wise ops and pooling: the producer's output channels,
  the consumer's patch taps of each kept channel (in_channels shrinks);
- LutConv -> (pooling) -> Flatten -> LutMatMul: the channels whose h·w block of the flattened
  row some split dimension falls in.
The producer's tables and bias shrink to the kept features, so its scan does kept / M of the
work. Each output feature of a lookup is computed on its own (its tables, its bias), and every
op on the way treats features apart, so the model's outputs are unchanged bit for bit;
tests/test_prune.py holds the pass to that on every kernel path. Graph inputs and outputs are
never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..ops.node_format import attributes, geometry_from_node, is_lookup, params_from_node, parameter_bytes, \
    set_attributes, set_lut_attributes
from ..ops.spec import CONV_OP_TYPE, LutParams
from .methods import NodeReport

# applied to each element on its own, so a column's value never depends on another column's
ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Identity", "Elu", "Selu", "Softplus",
                         "HardSigmoid", "Abs", "Neg"})
# on a LutConv's [N, C, H, W] output: each channel pooled on its own
CHANNEL_WISE = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})


# the descriptive attribute a narrowed producer carries: which of the original product's
# output columns (a LutConv: channels) it computes, in order (the kernel does not read it; `diff` does)
OUTPUT_COLUMNS = "output_columns"


@dataclass(frozen=True)
class PrunedColumns:
    """One producer-consumer pair the pass narrowed."""

    producer: str  # the lookup node whose output columns (a LutConv's channels) were dropped
    consumer: str  # the lookup node whose trees read only the features kept
    columns_before: int  # the producer's M before
    columns_after: int  # after: the features some split dimension of the consumer reads

    @property
    def scan_saved(self) -> float:
        """The fraction of the producer's scan (table reads) no longer done."""
        return 1.0 - self.columns_after / self.columns_before


def prune_unread_columns(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[PrunedColumns]]:
    """A copy of `model` whose lookup producers compute only what their consumers read."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producer_of = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    protected = {o.name for o in graph.output} | {i.name for i in graph.input}
    pruned: list[PrunedColumns] = []
    for consumer in graph.node:
        if not is_lookup(consumer):
            continue
        chain = _private_chain(consumer.input[0], producer_of, readers, protected)
        if chain is None:
            continue
        producer, tensors, flattened = chain
        before, reader = params_from_node(producer), params_from_node(consumer)
        # each of the producer's features (a column; a LutConv's channel) is a block of the
        # consumer's input dimensions: one column, a conv kernel's kh*kw taps, or after a
        # Flatten the feature map's h*w positions
        block = _block(consumer, producer, flattened, reader.D, before.M)
        if block is None:
            continue
        kept = np.unique(reader.split_dims // block)
        if len(kept) == before.M:
            continue
        set_lut_attributes(producer, LutParams(before.D, before.split_dims, before.thresholds, before.tables[kept],
                                               before.scale, before.offsets, before.bias[kept], before.relu))
        set_attributes(producer, {OUTPUT_COLUMNS: [int(u) for u in kept]})
        renumbered = np.searchsorted(kept, reader.split_dims // block) * block + reader.split_dims % block
        set_lut_attributes(consumer, LutParams(len(kept) * block, renumbered, reader.thresholds, reader.tables,
                                               reader.scale, reader.offsets, reader.bias, reader.relu))
        if consumer.op_type == CONV_OP_TYPE:
            set_attributes(consumer, {"in_channels": len(kept)})
        _narrow_shapes(graph, tensors, 1 if producer.op_type == CONV_OP_TYPE else -1, len(kept), block)
        pruned.append(PrunedColumns(producer.name, consumer.name, before.M, len(kept)))
    return out, pruned


def _block(consumer: onnx.NodeProto, producer: onnx.NodeProto, flattened: bool, D: int, M: int) -> int | None:
    """How many of the consumer's input dimensions one producer feature spans (None: the pair
    does not fit the pass)."""
    if consumer.op_type == CONV_OP_TYPE:  # patches are [in_channels][kh][kw]
        g = geometry_from_node(consumer)
        fits = producer.op_type == CONV_OP_TYPE and not flattened and g.in_channels == M
        return g.kernel[0] * g.kernel[1] if fits else None
    if producer.op_type == CONV_OP_TYPE:  # [N, M, h, w] flattened to [N, M*h*w]
        return D // M if flattened and D % M == 0 else None
    return 1 if D == M and not flattened else None


def narrowed_reports(reports: list[NodeReport], narrowed: list[PrunedColumns],
                     model: onnx.ModelProto) -> list[NodeReport]:
    """The node reports with each node's computed columns and its bytes as written in `model`."""
    kept = {p.producer: p.columns_after for p in narrowed}
    nodes = {n.name: n for n in model.graph.node}
    return [replace(r, columns_computed=kept.get(r.name, r.M),
                    bytes_after=parameter_bytes(attributes(nodes[r.name])) if r.name in kept else r.bytes_after)
            for r in reports]


@dataclass(frozen=True)
class Narrowed:
    """What a narrowed tensor holds of the one it replaced: features `kept` (original indices)
    along `axis`; after a Flatten, each feature is a block of equal length along the last axis."""

    axis: int
    kept: np.ndarray
    flattened: bool = False

    def indices(self, width: int) -> np.ndarray:
        """The original positions along the axis of the tensor's `width` entries there."""
        if not self.flattened:
            return self.kept
        block = width // len(self.kept)
        return (self.kept[:, None] * block + np.arange(block)).reshape(-1)


def narrowed_columns(model: onnx.ModelProto) -> dict[str, Narrowed]:
    """{tensor: what it holds} for every tensor the pass narrowed: a narrowed producer's
    output and the results between it and its consumer."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    found = {}
    for node in model.graph.node:
        kept = attributes(node).get(OUTPUT_COLUMNS) if is_lookup(node) else None
        if kept is None:
            continue
        conv = node.op_type == CONV_OP_TYPE
        tensor, flattened = node.output[0], False
        while True:
            found[tensor] = Narrowed(-1 if flattened or not conv else 1, np.asarray(kept, dtype=np.int64), flattened)
            after = readers.get(tensor, [])
            if len(after) != 1 or not _passes_features(after[0], conv, flattened):
                break
            flattened = flattened or after[0].op_type == "Flatten"
            tensor = after[0].output[0]
    return found


def _passes_features(node: onnx.NodeProto, conv: bool, flattened: bool) -> bool:
    """Whether `node` keeps each feature of its one input apart: element-wise ops always; for a
    LutConv's [N, C, H, W] output, pooling, and one Flatten at axis 1."""
    if node.domain not in ("", "ai.onnx") or len(node.input) != 1 or len(node.output) != 1:
        return False
    if node.op_type in ELEMENTWISE:
        return True
    if not conv or flattened:
        return False
    if node.op_type == "Flatten":
        return attributes(node).get("axis", 1) == 1
    return node.op_type in CHANNEL_WISE


def _private_chain(tensor: str, producer_of: dict, readers: dict, protected: set):
    """(the lookup producing `tensor`, the tensors from it to `tensor` each with whether a
    Flatten came before it, whether a Flatten is on the way), when every op on the way keeps
    the producer's features apart (_passes_features) and every tensor has one reader and is no
    graph input or output; else None."""
    path = []
    while True:
        if tensor in protected or readers.get(tensor, 0) != 1 or tensor not in producer_of:
            return None
        node = producer_of[tensor]
        path.append((tensor, node))
        if is_lookup(node):
            break
        if len(node.input) != 1:
            return None
        tensor = node.input[0]
    producer = path[-1][1]
    conv, flattened = producer.op_type == CONV_OP_TYPE, False
    tensors = [(path[-1][0], False)]
    for tensor, node in reversed(path[:-1]):  # from the producer forwards
        if not _passes_features(node, conv, flattened):
            return None
        flattened = flattened or node.op_type == "Flatten"
        tensors.append((tensor, flattened))
    return producer, tensors, flattened


def _narrow_shapes(graph: onnx.GraphProto, tensors: list[tuple[str, bool]], axis: int, kept: int,
                   block: int) -> None:
    """The recorded shapes of the narrowed tensors: `kept` features along `axis`, or after a
    Flatten `kept` blocks of `block` along the last axis; a shape with that dimension unknown
    is left as it is."""
    narrowed = dict(tensors)
    for info in graph.value_info:
        if info.name not in narrowed or not info.type.tensor_type.HasField("shape"):
            continue
        dims = info.type.tensor_type.shape.dim
        flattened = narrowed[info.name]
        at = len(dims) - 1 if flattened or axis == -1 else axis
        if 0 <= at < len(dims) and dims[at].HasField("dim_value"):
            dims[at].dim_value = kept * block if flattened else kept
