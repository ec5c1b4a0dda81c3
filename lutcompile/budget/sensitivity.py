"""The budget's sensitivities: each node alone replaced by each option, scored on held-out rows.

Each node alone is fitted at each option, lookups at C or a sum-product layer at width r
(one-shot, no fine-tuning or training, the fit the pipeline uses) and
the model with only that node replaced is scored on the held-out rows: its top-1 accuracy
drop, or the relative error ||Y - Y0|| / ||Y0|| of its first output Y against the original's
Y0. A plan's predicted score is the sum of its nodes' scores (an approximation: it ignores how
errors of different nodes interact). A replaced node is charged at least one held-out row
(1/n of accuracy), since a drop of zero on a finite sample is no proof that a lookup costs nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx

from ..compile import frontend
from ..compile.calibrate import CalibrationData, target_rows
from ..compile.fit import relative_error
from ..compile.methods import get_method
from ..compile.pipeline import CompileOptions, first_output
from ..compile.rewrite import rewrite
from ..onnx_io.sessions import accuracy
from .cost import Option, describe, method_of, size_of
from ..errors import OptionsError

log = logging.getLogger("lutcompile")

METRICS = ("accuracy", "output_error")


@dataclass
class Sensitivity:
    """Held-out score of the model with one node replaced by an option: scores[node][option]."""

    metric: str
    scores: dict[str, dict[Option, float]]
    floor: float  # the least a replaced node is charged

    def charge(self, node: str, option: Option) -> float:
        return 0.0 if option is None else max(self.scores[node][option], self.floor)

    def predict(self, plan: dict[str, Option]) -> float:
        return sum(self.charge(node, option) for node, option in plan.items())


class Scorer:
    """Scores models on the held-out rows against the original model's first output."""

    def __init__(self, original: onnx.ModelProto, held_out: CalibrationData, metric: str):
        if metric not in METRICS:
            raise OptionsError(f"unknown metric '{metric}', choose from {', '.join(METRICS)}")
        self.held_out, self.metric = held_out, metric
        self.reference = first_output(original, held_out)
        self.baseline = None if held_out.labels is None else accuracy(self.reference, held_out.labels)

    def accuracy(self, model: onnx.ModelProto) -> float:
        return accuracy(first_output(model, self.held_out), self.held_out.labels)

    def __call__(self, model: onnx.ModelProto) -> float:
        if self.metric == "accuracy":
            return self.baseline - self.accuracy(model)
        return relative_error(first_output(model, self.held_out), self.reference)


def measure_sensitivity(analysis: frontend.ModelAnalysis, targets: list[frontend.TargetNode],
                        choices: dict[str, list[Option]], fit_data: CalibrationData, scorer: Scorer,
                        options: CompileOptions, progress=None) -> Sensitivity:
    """Each node alone fitted at each option (one-shot, on fit_data) and scored on the held-out rows."""
    rows = target_rows(analysis.model, fit_data, targets, options.calibrate)
    scores: dict[str, dict[Option, float]] = {t.name: {} for t in targets}
    for target, option in (progress or list)([(t, o) for t in targets for o in choices[t.name]]):
        fitted = get_method(method_of(option)).fit(
            target, rows[target.name], size_of(option), options.fit,
            target.output_name in analysis.output_names and target.activation is None)
        scores[target.name][option] = scorer(rewrite(analysis.model, [fitted.replacement]))
        log.info("sensitivity of %s at %s: %.4f", target.name, describe(option), scores[target.name][option])
    floor = 1.0 / scorer.held_out.rows if scorer.metric == "accuracy" else 0.0
    return Sensitivity(scorer.metric, scores, floor)
