"""The replacement-method seam: how one target node becomes a cheaper node.

A method turns a target (frontend.TargetNode) and its calibration rows into a `FittedNode`:
the rewrite's `Replacement` (op type, domain and attributes of the new node) and the node's
report. The pipeline knows methods only through this interface, so a second method (ternary
sum-product layers, say) plugs in beside MADDNESS-style lookups without a second pipeline.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import onnx

from ..ops import node_format, spn
from ..ops.spn import LayerCount
from ..ops.spec import CONV_OP_TYPE, DOMAIN, OP_TYPE, LutParams
from .calibrate import require_rows
from .fit import FitOptions, TreeSource, activate, fit_node, relative_error
from .frontend import TargetNode
from .rewrite import Replacement
from ..errors import OptionsError

log = logging.getLogger("lutcompile")


@dataclass
class NodeReport:
    name: str
    op_type: str
    D: int
    M: int
    codebooks: int
    partition: str
    table_loss: str
    activation: str | None
    relative_error: float  # on the calibration rows, after the fused activation
    bytes_before: int  # weight and bias, as stored (float32)
    bytes_after: int  # the new node's parameters (node_format.parameter_bytes)
    fitted_rows: int = 0  # how many rows [n, D] it was fitted on (Conv patches, tokens: not calibration samples)
    # the output columns the written node computes: fewer than M when the lookup it feeds reads
    # only these (compile/prune.py), else M
    columns_computed: int | None = None
    # a LutConv: the MaxPool node it absorbed, whose pooled output it writes (compile/fuse.py)
    fused_pool: str | None = None
    method: str = "lut"  # which Method replaced it
    # an SpnMatMul: its width r, its operation count per row against the exact layer's, and the
    # sparsity of its ternary matrices (ops.spn.LayerCount)
    spn: LayerCount | None = None


@dataclass
class FittedNode:
    replacement: Replacement
    report: NodeReport
    trees: TreeSource | None = None  # what the train stage needs to learn its trees afresh


class Method(Protocol):
    """One way to replace a matrix product."""

    name: str
    trainable: bool  # whether the train stage (--train) can train its replacements through torch

    def fit(self, target: TargetNode, rows: np.ndarray, codebooks: int, options: FitOptions,
            produces_logits: bool) -> FittedNode:
        """The node's replacement, fitted on its input rows [n, D]."""
        ...


def exact_bytes(target: TargetNode) -> int:
    """The replaced product's weight and bias as stored, float32 (NodeReport.bytes_before)."""
    return 4 * (target.weight.size + (0 if target.bias is None else target.bias.size))


class LookupMethod:
    """MADDNESS-style lookups: hash trees encode each row, summed 8-bit tables decode it
    (LutMatMul, or LutConv for a Conv)."""

    name = "lut"
    trainable = True  # torch_program.LutModule: hard forward, soft-tree straight-through backward

    def fit(self, target: TargetNode, rows: np.ndarray, codebooks: int, options: FitOptions,
            produces_logits: bool) -> FittedNode:
        C = min(codebooks, target.D)
        require_rows(target.name, len(rows), C)  # the pipeline checked this before any fit
        # "kl" compares softmaxes, which only means something on the logits
        loss = "mse" if options.table_loss == "kl" and not produces_logits else options.table_loss
        fit = fit_node(rows, target.weight, target.bias, target.activation, C, replace(options, table_loss=loss))
        replacement = lookup_replacement(target, fit.params, {"partition": options.partition, "table_loss": loss,
                                                              "source_op": target.op_type})
        report = NodeReport(target.name, target.op_type, target.D, target.M, C, options.partition, loss,
                            target.activation, fit.relative_error, exact_bytes(target),
                            node_format.parameter_bytes(replacement.attributes), len(rows))
        log.info("fitted %s: %dx%d C=%d %s rel.err %.4f", target.name, target.D, target.M, C, loss,
                 fit.relative_error)
        return FittedNode(replacement, report, TreeSource(fit.groups, target.weight, options))


class SumProductMethod:
    """StrassenNets' ternary sum-product layers (ops/spn.py): y = Wc (a * (Wb x)) + b with ternary
    Wb [r, D], Wc [M, r] (SpnMatMul; on a Conv's patches SpnConv, as the paper's SP-ResNet). The
    node's size is its hidden width r, the multiplications per row (per output position)."""

    name = "spn"
    trainable = True  # torch_program.SpnModule: TWN-ternarised latents, straight-through gradients

    def fit(self, target: TargetNode, rows: np.ndarray, width: int, options: FitOptions,
            produces_logits: bool) -> FittedNode:
        if target.activation not in (None, "Relu"):
            raise OptionsError(f"node {target.name}: SpnMatMul fuses only a Relu, not {target.activation}")
        bias = np.zeros(target.M) if target.bias is None else target.bias
        product = np.asarray(rows, np.float64) @ target.weight + bias  # fitted to, and the error's reference
        params = spn.fit_layer(rows, target.weight, target.bias, width, product,
                               options.spn_activations == "uint8")
        relu = target.activation == "Relu"
        exact = activate(product, target.activation)
        error = relative_error(spn.kernel_reference(rows, params, relu), exact)
        replacement = spn_replacement(target, params)
        report = NodeReport(target.name, target.op_type, target.D, target.M, 0, "-", "-", target.activation, error,
                            exact_bytes(target), node_format.parameter_bytes(replacement.attributes), len(rows),
                            method=self.name, spn=spn.LayerCount.of(params))
        log.info("fitted %s: %dx%d SPN r=%d rel.err %.4f", target.name, target.D, target.M, width, error)
        return FittedNode(replacement, report)


def with_final_counts(reports: list[NodeReport], model: onnx.ModelProto) -> list[NodeReport]:
    """`reports` with each spn node's count and bytes those of its node in `model`, the written
    one: training moves weights across the ternary thresholds, so the fitted counts go stale."""
    nodes = {n.name: n for n in model.graph.node if spn.is_spn(n)}
    return [replace(r, spn=LayerCount.of(spn.params_from_node(nodes[r.name])[0]),
                    bytes_after=node_format.parameter_bytes(node_format.attributes(nodes[r.name])))
            if r.method == SumProductMethod.name and r.name in nodes else r for r in reports]


def lookup_replacement(target: TargetNode, params: LutParams, info: dict | None = None) -> Replacement:
    """The LutMatMul (or, for a Conv, LutConv) node carrying `params` in the target's place."""
    attributes = node_format.lut_attributes(params, info)
    if target.conv is not None:
        attributes.update(node_format.conv_attributes(target.conv))
    return Replacement(target, CONV_OP_TYPE if target.conv is not None else OP_TYPE, DOMAIN, attributes)


def spn_replacement(target: TargetNode, params: spn.SpnParams) -> Replacement:
    """The SpnMatMul (or, for a Conv, SpnConv) node carrying `params` in the target's place,
    fusing the target's Relu if it has one."""
    attributes = {**spn.node_attributes(params, target.activation == "Relu"), "source_op": target.op_type}
    if target.conv is not None:  # SpnConv: W_b a ternary convolution of the layer's geometry, W_c a 1x1 one
        attributes.update(node_format.conv_attributes(target.conv))
    return Replacement(target, spn.SPN_OP_TYPE if target.conv is None else spn.SPN_CONV_OP_TYPE, DOMAIN, attributes)


METHODS: dict[str, Method] = {m.name: m for m in (LookupMethod(), SumProductMethod())}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise OptionsError(f"unknown method '{name}', choose from {', '.join(METHODS)}")
    return METHODS[name]
