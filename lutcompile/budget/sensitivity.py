"""The budget's sensitivities: each node alone replaced at each C, scored on held-out rows.

Each node alone is fitted at each C (one-shot, no fine-tuning, the fit the pipeline uses) and
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
from .cost import Option
from ..errors import OptionsError

log = logging.getLogger("lutcompile")

METRICS = ("accuracy", "output_error")


@dataclass
class Sensitivity:
    """Held-out score of the model with one node replaced at C: scores[node][C]."""

    metric: str
    scores: dict[str, dict[int, float]]
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
                        choices: dict[str, list[int]], fit_data: CalibrationData, scorer: Scorer,
                        options: CompileOptions, progress=None) -> Sensitivity:
    """Each node alone fitted at each C (one-shot, on fit_data) and scored on the held-out rows."""
    method = get_method(options.method)
    rows = target_rows(analysis.model, fit_data, targets, options.calibrate)
    scores: dict[str, dict[int, float]] = {t.name: {} for t in targets}
    for target, C in (progress or list)([(t, C) for t in targets for C in choices[t.name]]):
        fitted = method.fit(target, rows[target.name], C, options.fit,
                            target.output_name in analysis.output_names and target.activation is None)
        scores[target.name][C] = scorer(rewrite(analysis.model, [fitted.replacement]))
        log.info("sensitivity of %s at C=%d: %.4f", target.name, C, scores[target.name][C])
    floor = 1.0 / scorer.held_out.rows if scorer.metric == "accuracy" else 0.0
    return Sensitivity(scorer.metric, scores, floor)
