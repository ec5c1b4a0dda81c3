"""After the train stage: lookup producers compute only the columns their consumer's trees read.

A LutMatMul reads only the 4·C split dimensions of its input: the other columns change no
code, so no output. When that input is made by another LutMatMul, directly or through
element-wise activations, and nothing else reads it, the producer can drop the columns no
tree reads. Its tables shrink from [M, C, 16] to [U, C, 16] (U the distinct split dimensions),
so its scan does U / M of the work, and the consumer's encoder reads a dense row of U values
instead of picking 4·C of M. Each output column of a lookup is computed on its own (its
tables, its bias), so the outputs are unchanged bit for bit; tests/test_prune.py holds the
pass to that on every kernel path. Graph inputs and outputs are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..ops.node_format import attributes, params_from_node, parameter_bytes, set_lut_attributes
from ..ops.spec import DOMAIN, OP_TYPE, LutParams
from .methods import NodeReport

# applied to each element on its own, so a column's value never depends on another column's
ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Identity", "Elu", "Selu", "Softplus",
                         "HardSigmoid", "Abs", "Neg"})


# the descriptive attribute a narrowed producer carries: which of the original product's
# output columns it computes, in order (the kernel does not read it; `diff` does)
OUTPUT_COLUMNS = "output_columns"


@dataclass(frozen=True)
class PrunedColumns:
    """One producer-consumer pair the pass narrowed."""

    producer: str  # the LutMatMul whose output columns were dropped
    consumer: str  # the LutMatMul whose trees read only the columns kept
    columns_before: int  # the producer's M, the consumer's D, before
    columns_after: int  # after: the distinct split dimensions of the consumer

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
        if not _is_lut_matmul(consumer):
            continue
        chain = _private_chain(consumer.input[0], producer_of, readers, protected)
        if chain is None:
            continue
        producer, tensors = chain
        before = params_from_node(producer)
        reader = params_from_node(consumer)
        used = np.unique(reader.split_dims)
        if len(used) == before.M or reader.D != before.M:
            continue
        set_lut_attributes(producer, LutParams(before.D, before.split_dims, before.thresholds, before.tables[used],
                                               before.scale, before.offsets, before.bias[used], before.relu))
        producer.attribute.append(onnx.helper.make_attribute(OUTPUT_COLUMNS, [int(u) for u in used]))
        set_lut_attributes(consumer, LutParams(len(used), np.searchsorted(used, reader.split_dims),
                                               reader.thresholds, reader.tables, reader.scale, reader.offsets,
                                               reader.bias, reader.relu))
        _forget_shapes(graph, tensors)
        pruned.append(PrunedColumns(producer.name, consumer.name, before.M, len(used)))
    return out, pruned


def narrowed_reports(reports: list[NodeReport], narrowed: list[PrunedColumns],
                     model: onnx.ModelProto) -> list[NodeReport]:
    """The node reports with each node's computed columns and its bytes as written in `model`."""
    kept = {p.producer: p.columns_after for p in narrowed}
    nodes = {n.name: n for n in model.graph.node}
    return [replace(r, columns_computed=kept.get(r.name, r.M),
                    bytes_after=parameter_bytes(attributes(nodes[r.name])) if r.name in kept else r.bytes_after)
            for r in reports]


def narrowed_columns(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{tensor: the original columns it holds} for every tensor the pass narrowed: a narrowed
    producer's output and the element-wise results between it and its consumer."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    found = {}
    for node in model.graph.node:
        columns = attributes(node).get(OUTPUT_COLUMNS) if _is_lut_matmul(node) else None
        if columns is None:
            continue
        tensor = node.output[0]
        while True:
            found[tensor] = np.asarray(columns, dtype=np.int64)
            after = readers.get(tensor, [])
            if len(after) != 1 or after[0].op_type not in ELEMENTWISE or after[0].domain not in ("", "ai.onnx"):
                break
            tensor = after[0].output[0]
    return found


def _is_lut_matmul(node: onnx.NodeProto) -> bool:
    return node.domain == DOMAIN and node.op_type == OP_TYPE


def _private_chain(tensor: str, producer_of: dict, readers: dict, protected: set):
    """(the LutMatMul producing `tensor`, the tensors from it to `tensor`), when `tensor` is
    made from that producer's output by element-wise ops alone and every tensor on the way
    has one reader and is no graph input or output; else None."""
    tensors = []
    while True:
        if tensor in protected or readers.get(tensor, 0) != 1 or tensor not in producer_of:
            return None
        tensors.append(tensor)
        node = producer_of[tensor]
        if _is_lut_matmul(node):
            return node, tensors
        if node.domain not in ("", "ai.onnx") or node.op_type not in ELEMENTWISE or len(node.input) != 1:
            return None
        tensor = node.input[0]


def _forget_shapes(graph: onnx.GraphProto, tensors: list[str]) -> None:
    """Drop the recorded shapes of tensors whose last axis the pass narrowed."""
    kept = [v for v in graph.value_info if v.name not in set(tensors)]
    del graph.value_info[:]
    graph.value_info.extend(kept)
