"""The budget's cost model: each node, exact, as lookups at each C and as a sum-product layer at
each width r, timed alone in onnxruntime; and each option's multiplications per inference.

Each node is built as a one-node ONNX model with its real weights, shapes and activation and
timed on this machine (one thread, a reference batch of rows, medians of interleaved
repetitions). A plan's cost is the sum of its nodes' times: the rest of the graph is the same
for every plan. The lookup nodes' tables are random, as the kernel's time does not depend on
them; a sum-product node is the layer's ternarised SVD (ops.spn.ternary_init), whose zeros, which
its time depends on, are those of the fitted node before training.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..compile import frontend
from ..compile.calibrate import CalibrationData, collect_activations
from ..compile.methods import LookupMethod, SumProductMethod, lookup_replacement, spn_replacement
from ..compile.rewrite import rewrite
from ..onnx_io.timing import model_latencies
from ..ops import counting, spn
from ..ops.spec import DEPTH, K, NODES, LutParams
from ..errors import OptionsError

log = logging.getLogger("lutcompile")


@dataclass(frozen=True, order=True)
class SumProduct:
    """A budget option: the node as a sum-product layer (SpnMatMul, SpnConv) of hidden width r."""

    width: int


# what the search may make of a node: lookups at C codebooks (an int), a sum-product layer of
# width r, or None: the node stays exact
Option = int | SumProduct | None


def method_of(option: Option) -> str:
    """The replacement method (compile/methods.py) of a replacing option."""
    return SumProductMethod.name if isinstance(option, SumProduct) else LookupMethod.name


def size_of(option: Option) -> int:
    """What the pipeline's plan holds for a replacing option: C, or the width r."""
    return option.width if isinstance(option, SumProduct) else option


def describe(option: Option) -> str:
    """exact, C=16 or r=200, for the terminal and the log."""
    return "exact" if option is None else f"r={option.width}" if isinstance(option, SumProduct) else f"C={option}"


def option_json(option: Option) -> int | str | None:
    """An option in report.json: None (exact), C, or "spn:r"."""
    return f"spn:{option.width}" if isinstance(option, SumProduct) else option


@dataclass
class CostModel:
    """Seconds per call of each node's options (None: exact), each timed alone in onnxruntime,
    one thread, `batch` rows per call."""

    batch: int
    seconds: dict[str, dict[Option, float]]

    def total(self, plan: dict[str, Option]) -> float:
        """The target nodes' summed time under `plan` (nodes it does not name: exact)."""
        return sum(times[plan.get(node)] for node, times in self.seconds.items())


@dataclass
class MultiplicationCount:
    """Multiplications per inference (ops/counting.py) of each target node's options, and of the
    model's other products, which every plan keeps (`fixed`); `positions`, each Conv's output
    positions (ops.counting.conv_positions), count a compiled model the same way."""

    per_option: dict[str, dict[Option, int]]
    fixed: int
    positions: dict[str, int]

    def total(self, plan: dict[str, Option]) -> int:
        """The whole model's count under `plan` (nodes it does not name: exact)."""
        return self.fixed + sum(counts[plan.get(node)] for node, counts in self.per_option.items())

    @property
    def least(self) -> int:
        """The fewest any plan reaches: every node at its cheapest option."""
        return self.fixed + sum(min(counts.values()) for counts in self.per_option.values())


def count_multiplications(model: onnx.ModelProto, targets: list[frontend.TargetNode],
                          choices: dict[str, list[Option]], uint8_activations: bool = False) -> MultiplicationCount:
    """Each target's options counted as ops/counting.py counts the written nodes: D x M per row
    exact, M as lookups (the table scale), r as a sum-product layer (more with uint8 activations:
    ops.spn.multiplications); a Conv's rows are its output positions. The other products are the
    model's whole count less the targets' exact ones."""
    positions = counting.conv_positions(model)
    per_option: dict[str, dict[Option, int]] = {}
    for t in targets:
        rows = positions.get(t.name, 1)
        per_option[t.name] = {None: t.D * t.M * rows, **{
            o: rows * (spn.multiplications(t.D, t.M, o.width, uint8_activations) if isinstance(o, SumProduct)
                       else t.M) for o in choices[t.name]}}
    fixed = counting.multiplications(model, positions) - sum(c[None] for c in per_option.values())
    return MultiplicationCount(per_option, fixed, positions)


def node_model(target: frontend.TargetNode) -> onnx.ModelProto:
    """The target's exact computation alone, X -> Y: Gemm (on its rows [n, D]) or Conv, with
    the real weight and bias, then its fused activation as a separate node."""
    inits = [numpy_helper.from_array(target.weight if target.conv is None else
                                     np.ascontiguousarray(target.weight.T.reshape(
                                         target.M, target.conv.in_channels, *target.conv.kernel)), "W")]
    inputs = ["X", "W"]
    if target.bias is not None:
        inits.append(numpy_helper.from_array(target.bias, "B"))
        inputs.append("B")
    product = "P" if target.activation else "Y"
    if target.conv is None:
        node = helper.make_node("Gemm", inputs, [product], name=target.name)
        x_shape = ["n", target.D]
    else:
        g = target.conv
        node = helper.make_node("Conv", inputs, [product], name=target.name, kernel_shape=list(g.kernel),
                                strides=list(g.strides), pads=list(g.pads), dilations=list(g.dilations))
        x_shape = ["n", g.in_channels, "h", "w"]
    nodes = [node] + ([helper.make_node(target.activation, [product], ["Y"], name=f"{target.name}/activation")]
                      if target.activation else [])
    graph = helper.make_graph(nodes, "node", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def random_params(target: frontend.TargetNode, codebooks: int, rng: np.random.Generator) -> LutParams:
    """Valid lookup parameters of the target's shape at C codebooks (random values: the
    kernel's time does not depend on them)."""
    return LutParams(D=target.D, split_dims=rng.integers(0, target.D, (codebooks, DEPTH)),
                     thresholds=rng.uniform(0, 1, (codebooks, NODES)).astype(np.float32),
                     tables=rng.integers(0, 256, (target.M, codebooks, K), dtype=np.uint8), scale=0.01,
                     offsets=np.zeros(codebooks, np.float32), bias=np.zeros(target.M, np.float32),
                     relu=target.activation == "Relu")


def replacement_for_timing(target: frontend.TargetNode, option: Option, rng: np.random.Generator,
                           uint8_activations: bool = False):
    """A node of the option's kind and shape in the target's place, for timing alone."""
    if isinstance(option, SumProduct):
        return spn_replacement(target, spn.ternary_init(target.weight, target.bias, option.width, uint8_activations))
    return lookup_replacement(target, random_params(target, option, rng))


def measure_costs(model: onnx.ModelProto, targets: list[frontend.TargetNode], choices: dict[str, list[Option]],
                  data: CalibrationData, batch: int = 256, repetitions: int = 15, progress=None,
                  uint8_activations: bool = False) -> CostModel:
    """Time each target node, exact and at each option of choices[node], as one-node models in
    onnxruntime: one thread, on the node's real input for `batch` calibration rows (repeated
    if there are fewer), options interleaved, medians of `repetitions`."""
    if batch < 1:
        raise OptionsError(f"the cost batch must be at least 1, got {batch}")
    sample = data.subset(np.arange(batch) % data.rows)
    inputs = collect_activations(model, sample, {t.name: (t.input_name, np.asarray) for t in targets}, batch)
    rng = np.random.default_rng(0)
    seconds: dict[str, dict[Option, float]] = {}
    for target in (progress or list)(targets):
        exact = frontend.analyse(node_model(target))
        alone = exact.targets[0]
        models = {"exact": exact.model}
        for option in choices[target.name]:
            models[option] = rewrite(exact.model, [replacement_for_timing(alone, option, rng, uint8_activations)])
        X = inputs[target.name] if target.conv is not None else target.rows(inputs[target.name])
        times = model_latencies(models, {"X": np.ascontiguousarray(X)}, threads=1, repetitions=repetitions)
        seconds[target.name] = {(None if k == "exact" else k): v for k, v in times.items()}
        log.info("cost of %s at batch %d: %s", target.name, batch,
                 ", ".join(f"{describe(k)} {1e6 * v:.1f} us"
                           for k, v in seconds[target.name].items()))
    return CostModel(batch, seconds)
