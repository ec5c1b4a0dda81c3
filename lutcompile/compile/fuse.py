"""After pruning: a LutConv absorbs the MaxPool that reads its output.

onnxruntime runs its own convolutions and pools in a blocked layout (NCHWc) and inserts layout
reorders around every node it cannot run that way, our LutConv among them: on the shipped CNN
the reorders and the pools after the two lookup convolutions took about a quarter of the
compiled model's time. A LutConv with a fused MaxPool (attribute `max_pool`, docs/lutmatmul.md)
computes a band of its output rows into a buffer that stays in cache and writes only the
pooled rows, so the pool node, its full-size input and the reorders between two LutConvs go.

The maximum of finite floats does not depend on the order of the comparisons, and every value
a lookup writes is finite, so the model's outputs are the same bit for bit; tests/test_fuse.py
holds the pass to that on every kernel path. Only pools the fused kernel computes exactly as
ONNX's MaxPool does are taken: 2-D, no padding, dilation 1, floor rounding, no Indices output.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..ops.node_format import attributes, set_attributes
from ..ops.spec import CONV_OP_TYPE, DOMAIN, MAX_POOL_LIMIT


@dataclass(frozen=True)
class FusedPool:
    """One MaxPool a LutConv absorbed."""

    conv: str  # the LutConv node
    pool: str  # the MaxPool node, gone from the graph
    window: tuple[int, int, int, int]  # window h, w, stride h, w


def fuse_max_pools(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[FusedPool]]:
    """A copy of `model` in which each LutConv whose sole reader is a fusable MaxPool computes
    the pooled output itself."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    fused: list[FusedPool] = []
    gone: list[onnx.NodeProto] = []
    for conv in graph.node:
        if conv.domain != DOMAIN or conv.op_type != CONV_OP_TYPE or "max_pool" in attributes(conv):
            continue
        tensor = conv.output[0]
        after = readers.get(tensor, [])
        if tensor in outputs or len(after) != 1:
            continue
        window = pool_window(after[0])
        if window is None:
            continue
        pool = after[0]
        set_attributes(conv, {"max_pool": list(window)})
        conv.output[0] = pool.output[0]
        gone.append(pool)
        fused.append(FusedPool(conv.name, pool.name, window))
        _drop_value_info(graph, tensor)
    for pool in gone:
        graph.node.remove(pool)
    return out, fused


def pool_window(node: onnx.NodeProto) -> tuple[int, int, int, int] | None:
    """(window h, w, stride h, w) of a MaxPool the fused kernel computes exactly as ONNX does,
    else None."""
    if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len(node.input) != 1:
        return None
    if len(node.output) > 1 and any(node.output[1:]):  # the Indices output
        return None
    a = attributes(node)
    kernel = list(a.get("kernel_shape", ()))
    strides = list(a.get("strides", [1, 1]))
    if len(kernel) != 2 or len(strides) != 2 or not all(1 <= v <= MAX_POOL_LIMIT for v in kernel + strides):
        return None
    if any(a.get("pads", [0] * 4)) or any(d != 1 for d in a.get("dilations", [1, 1])):
        return None
    if a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    return kernel[0], kernel[1], strides[0], strides[1]


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    """Forget the recorded type of a tensor no node produces any more."""
    keep = [v for v in graph.value_info if v.name != name]
    del graph.value_info[:]
    graph.value_info.extend(keep)
