"""Automatic budget: the fastest compiled model whose accuracy drop (or output error) stays
within a target; or, as StrassenNets' budget, a model within a number of multiplications.

    compile_model("model.onnx", "fast.onnx", "calib.npz", max_accuracy_drop=0.01)
    compile_model("model.onnx", "small.onnx", "calib.npz", max_multiplications=20_000)

Per target node the search chooses among keeping it exact, lookups at a codebook count C from
a candidate set (those not above the node's input width D) and sum-product layers (SpnMatMul,
SpnConv) at hidden widths r from a set of multiples of the node's output count M:

1. split: a seeded fraction of the calibration rows (20 %, stratified by label) is held out.
   Fitting and fine-tuning use the rest; every score the search compares is measured on the
   held-out rows.
2. cost (budget/cost.py): each node, exact and at each C, is built as a one-node ONNX model with the node's
   real weights, shapes and activations and timed in onnxruntime on this machine (one
   thread, a reference batch of 256 rows by default, medians of interleaved repetitions).
   A plan's cost is the sum of its nodes' times: the rest of the graph is the same for every
   plan. The lookup nodes' tables are random, as the kernel's time does not depend on them.
3. sensitivity (budget/sensitivity.py): each node alone is fitted at each C (one-shot, no fine-tuning, the fit
   the pipeline uses) and the model with only that node replaced is scored on the held-out
   rows: its top-1 accuracy drop, or the relative error ||Y - Y0|| / ||Y0|| of its first
   output Y against the original's Y0. The predicted score of a plan is the sum of its
   nodes' scores (an approximation: it ignores how errors of different nodes interact). A
   replaced node is charged at least one held-out row (1/n of accuracy), since a drop of
   zero on a finite sample is no proof that a lookup costs nothing.
4. greedy path: from all exact, repeatedly take the move (one node to a cheaper option,
   exact -> C, C -> a cheaper C, to a width r or between them) with the most seconds saved per
   unit of predicted score added, until no move saves time. Where that path first leaves the target, the moves that
   still fit it (best ratio first: often the same node at more codebooks) are inserted. The
   plan is the furthest point whose predicted score stays within the target.
5. verify and back off: the plan is compiled end to end as compile_model does (fine-tune
   pass on when there are labels), scored on the held-out rows and, whole, timed against the
   original (a plan that is not faster fails like one over the target). Over the target, the
   search reverts the last move and verifies again. Within it, the predictions along the
   path are rescaled by measured / predicted (the fine-tune pass often recovers more than
   the one-shot sensitivities assume), and the search steps forward to the furthest point
   the rescaled predictions allow, never to or past a point that failed. At most
   `max_verifications` compiles; the furthest verified point that met the target wins, all
   exact if none did. When no point is predicted within a non-zero target, the first move is
   verified anyway, as the predictions ignore what fine-tuning recovers.

The multiplication budget (max_multiplications, per inference, the whole model counted as
ops/counting.py counts it) changes what the path saves: its moves are ranked by multiplications
saved per predicted score added, and only points within the budget are verified (the time of
the whole model is not required to fall: on a CPU an addition costs about what a multiply-add
does). Alone, it verifies the first point of the path within the budget, the least predicted
loss that meets it; with an accuracy or output-error target too, the furthest point within both,
backing off no nearer than that first point. A budget below every plan's count is a one-line
OptionsError before any timing or fitting; a budget no verified point meets with the target too
is one after the verifications.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..compile import frontend, pipeline
from ..compile.calibrate import CalibrationData, CalibrationError, check_enough_rows, without_rows
from ..compile.pipeline import CompileOptions, CompileResult, evaluate_accuracy
from ..compile.split import stratified_split
from ..onnx_io.timing import model_latencies
from ..ops import counting
from ..ops.spec import K
from ..progress import bar, timed
from .cost import (CostModel, MultiplicationCount, Option, SumProduct, count_multiplications, describe,
                   measure_costs, method_of, option_json, size_of)
from .sensitivity import Scorer, Sensitivity, measure_sensitivity
from ..errors import OptionsError

log = logging.getLogger("lutcompile")

# Accuracy drops are sums of multiples of 1/n: compared with this slack, float rounding cannot
# turn a drop of exactly the target into a miss.
SLACK = 1e-9


@dataclass(frozen=True)
class Goal:
    """What must hold on the held-out rows: the top-1 accuracy drop against the original model
    (metric "accuracy", a fraction: 0.01 is one point), or the relative error of the first
    output against the original model's ("output_error"), at most `limit`; and the whole
    model's multiplications per inference at most `max_multiplications`. With a multiplication
    budget alone, `limit` is None and the metric is only measured."""

    metric: str
    limit: float | None
    max_multiplications: int | None = None

    @classmethod
    def from_arguments(cls, max_accuracy_drop: float | None, max_output_error: float | None,
                       has_labels: bool, max_multiplications: int | None = None) -> Goal:
        if max_multiplications is not None:
            if isinstance(max_multiplications, bool) or not isinstance(max_multiplications, (int, np.integer)) \
                    or max_multiplications < 0:
                raise OptionsError(f"max_multiplications must be a whole number >= 0, got {max_multiplications!r}")
            if max_accuracy_drop is None and max_output_error is None:
                return cls("accuracy" if has_labels else "output_error", None, int(max_multiplications))
            goal = cls.from_arguments(max_accuracy_drop, max_output_error, has_labels)
            return replace(goal, max_multiplications=int(max_multiplications))
        if max_accuracy_drop is not None and max_output_error is not None:
            raise OptionsError("give max_accuracy_drop or max_output_error, not both")
        if max_accuracy_drop is not None:
            if not has_labels:
                raise CalibrationError("--max-accuracy-drop needs labels: the calibration data has no 'labels' "
                                       "array (--max-output-error works without labels)")
            if not 0 <= max_accuracy_drop <= 1:
                raise OptionsError(f"max_accuracy_drop is a fraction in [0, 1] (0.01 = one point), "
                                 f"got {max_accuracy_drop}")
            return cls("accuracy", float(max_accuracy_drop))
        if max_output_error is None or not 0 <= max_output_error < float("inf"):
            raise OptionsError(f"max_output_error must be a finite number >= 0, got {max_output_error}")
        return cls("output_error", float(max_output_error))

    def describe(self, value: float | None = None) -> str:
        value = self.limit if value is None else value
        if value is None:
            return "no limit"
        return f"{100 * value:.2f} points" if self.metric == "accuracy" else f"{value:.4f}"


@dataclass
class BudgetOptions:
    candidates: tuple[int, ...] = (4, 8, 16, 32, 64)  # codebook counts tried (those <= D per node)
    # sum-product widths tried, as multiples of each node's output count M (r = round(f M), at
    # least 1): by default r = M, the authors' choice (--candidate-spn-widths)
    spn_widths: tuple[float, ...] = (1.0,)
    # inputs per codebook tried as well: a node of input width D also tries C = ceil(D / S)
    # (--candidate-subvectors; short sub-vectors, S = 4-9, are what training makes accurate)
    subvectors: tuple[int, ...] = ()
    held_out_fraction: float = 0.2  # of the calibration rows, for the scores
    cost_batch: int = 256  # rows per call the nodes are timed at
    repetitions: int = 15  # interleaved timing repetitions per node
    max_verifications: int = 4  # end-to-end compiles at most
    # time each verified plan, whole, against the original, and fail it unless faster
    time_whole_model: bool = True
    # to reuse what an earlier search measured (say, with another target): its timings on this
    # machine, and its sensitivities (valid for the same model, calibration data and options)
    cost_model: CostModel | None = None
    sensitivity: Sensitivity | None = None


@dataclass
class Move:
    """One step of the greedy path, and the plan's predictions after it."""

    node: str
    before: Option
    after: Option
    seconds_saved: float
    score_added: float
    seconds: float  # the target nodes' summed time after the move
    predicted: float  # the plan's predicted score after the move
    multiplications: int | None = None  # with a multiplication budget: the model's count after the move


@dataclass
class Verification:
    moves: int  # the point of the path: its first `moves` moves applied
    plan: dict[str, Option]
    predicted: float
    measured: float  # on the held-out rows, after the end-to-end compile
    met: bool  # within the goal, and the whole compiled model faster than the original
    # the whole compiled model, timed against the original (with a multiplication budget: its
    # counted multiplications within the budget, which takes the place of time)
    faster: bool = True
    multiplications: int | None = None  # with a multiplication budget: the compiled model's, counted


@dataclass
class BudgetResult:
    goal: Goal
    plan: dict[str, Option]  # every target node: its codebook count, SumProduct(r), or None (kept exact)
    predicted: float
    measured: float  # on the held-out rows (0 for the all-exact plan: it is the original)
    seconds_exact: float  # the target nodes' summed time, all exact (cost model)
    seconds: float  # the same under the plan
    path: list[Move]
    verifications: list[Verification]
    cost: CostModel
    sensitivity: Sensitivity
    fit_rows: np.ndarray  # indices into the calibration data: fitting and fine-tuning
    held_out_rows: np.ndarray  # indices into the calibration data: every score
    accuracy_before: float | None = None  # held-out top-1 accuracy of the original (labels)
    accuracy_after: float | None = None  # and of the chosen model
    options: dict = field(default_factory=dict)
    multiplications: MultiplicationCount | None = None  # with a multiplication budget

    @property
    def replaced(self) -> dict[str, Option]:
        return {node: C for node, C in self.plan.items() if C is not None}

    def to_json(self) -> dict:
        def keyed(values: dict) -> dict:
            return {"exact" if k is None else str(option_json(k)): v for k, v in values.items()}

        def options_json(record, *names: str) -> dict:
            """A Move or Verification as a dict, its options (in `names`) as option_json writes them."""
            shallow = {f.name: getattr(record, f.name) for f in fields(record)}  # asdict would expand SumProduct
            return {**shallow, **{n: ({k: option_json(v) for k, v in shallow[n].items()}
                                      if isinstance(shallow[n], dict) else option_json(shallow[n])) for n in names}}
        count = self.multiplications
        return {
            "metric": self.goal.metric, "limit": self.goal.limit,
            "max_multiplications": self.goal.max_multiplications,
            "plan": {k: option_json(v) for k, v in self.plan.items()},
            "predicted": self.predicted, "measured": self.measured,
            "seconds_exact": self.seconds_exact, "seconds": self.seconds,
            "multiplications": None if count is None else {
                "exact": count.total({}), "chosen": count.total(self.plan), "fixed": count.fixed,
                "per_option": {n: keyed(c) for n, c in count.per_option.items()}},
            "fit_rows": len(self.fit_rows), "held_out_rows": len(self.held_out_rows),
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "cost_model": {"batch": self.cost.batch,
                           "seconds": {n: keyed(t) for n, t in self.cost.seconds.items()}},
            "sensitivity": {"metric": self.sensitivity.metric, "floor": self.sensitivity.floor,
                            "scores": {n: keyed(s) for n, s in self.sensitivity.scores.items()}},
            "path": [options_json(m, "before", "after") for m in self.path],
            "verifications": [options_json(v, "plan") for v in self.verifications],
            "options": self.options,
        }


# ------------------------------------------------------------------------- the held-out rows

def held_out_split(data: CalibrationData, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) row indices: a seeded fraction held out, stratified by label if any."""
    n_hold = int(round(fraction * data.rows))
    if not 0 < fraction < 1 or n_hold < 1 or data.rows - n_hold < 2 * K:
        raise CalibrationError(f"{data.rows} calibration rows are too few to hold out {fraction:.0%} "
                               f"and fit on at least {2 * K}")
    if data.labels is not None:
        return stratified_split(data.labels, n_hold, seed)
    hold = np.sort(np.random.default_rng(seed).permutation(data.rows)[:n_hold])
    return np.setdiff1d(np.arange(data.rows), hold), hold


def greedy_path(cost: CostModel, sensitivity: Sensitivity, choices: dict[str, list[Option]],
                start: list[Move] = (), limit: float | None = None,
                count: MultiplicationCount | None = None) -> list[Move]:
    """From all exact (or after the moves `start`), the moves with the most seconds saved per
    predicted score added, one at a time, until no move saves time (each move saves time, so
    the walk ends). With a limit, only moves that keep the predicted score within it. With a
    multiplication count, multiplications take the place of seconds (what is saved, and when
    the walk ends); each move still records the seconds the cost model gives."""
    saving = cost.seconds if count is None else count.per_option
    plan = plan_at(list(start), len(start), choices)
    path: list[Move] = []
    while True:
        best, best_key = None, None
        for node, options in choices.items():
            now = plan[node]
            for option in options:
                saved = saving[node][now] - saving[node][option]
                if saved <= 0 or (limit is not None
                                  and sensitivity.predict({**plan, node: option}) > limit + SLACK):
                    continue
                added = sensitivity.charge(node, option) - sensitivity.charge(node, now)
                key = (saved / max(added, 1e-12), saved)
                if best_key is None or key > best_key:
                    best, best_key = (node, option, added), key
        if best is None:
            return path
        node, option, added = best
        before, plan[node] = plan[node], option
        path.append(Move(node, before, option, cost.seconds[node][before] - cost.seconds[node][option], added,
                         cost.total(plan), sensitivity.predict(plan), None if count is None else count.total(plan)))


def budget_path(cost: CostModel, sensitivity: Sensitivity, choices: dict[str, list[Option]],
                limit: float | None, count: MultiplicationCount | None = None) -> list[Move]:
    """The greedy path, with the moves that still fit the limit inserted where it first leaves it.

    The plain path's best-ratio move can overshoot the limit while a smaller move (the same
    node at more codebooks, say) would fit; so its prefix within the limit is extended by the
    best-ratio moves that keep the prediction within it, then continued unconstrained (the
    points past the limit that verification may step forward to). No limit: the plain path."""
    path = greedy_path(cost, sensitivity, choices, count=count)
    if limit is None:
        return path
    prefix = path[:furthest_within([0.0] + [m.predicted for m in path], limit)]
    within = prefix + greedy_path(cost, sensitivity, choices, prefix, limit, count)
    return within + greedy_path(cost, sensitivity, choices, within, count=count)


def first_within_count(path: list[Move], count: MultiplicationCount, budget: int) -> int:
    """The first point k of the path whose plan's multiplications are within the budget (0: all
    exact). The path ends with every node at its cheapest option, so a budget of at least
    count.least is reached."""
    totals = [count.total({})] + [m.multiplications for m in path]
    return next((k for k, total in enumerate(totals) if total <= budget), len(path))


def plan_at(path: list[Move], moves: int, nodes) -> dict[str, Option]:
    """The plan after the first `moves` moves of the path."""
    plan: dict[str, Option] = {node: None for node in nodes}
    for move in path[:moves]:
        plan[move.node] = move.after
    return plan


def furthest_within(predicted: list[float], limit: float) -> int:
    """The last point k of the path with predicted[j] <= limit for every j <= k (0: all exact)."""
    k = 0
    while k + 1 < len(predicted) and predicted[k + 1] <= limit + SLACK:
        k += 1
    return k


def verify_path(path: list[Move], nodes, goal: Goal, floor: float, measure,
                max_verifications: int = 4, lowest: int = 0) -> tuple[int | None, list[Verification]]:
    """(the furthest point of the path verified within the goal; the verifications).

    measure(plan, moves) compiles the plan at that point end to end and returns its score and
    whether the whole compiled model runs faster than the original (with a multiplication
    budget: whether its counted multiplications are within it): the cost model times nodes
    alone, and a lookup node can cost the graph around it more (onnxruntime reorders the
    blocked layout of the convolutions it sits between), so a point that is not faster fails.
    Starts at the furthest point the predictions allow, or, when they allow none and the goal
    is not 0, probes the first move anyway: the predictions come from one-shot fits, and the
    fine-tune pass of the real compile often recovers most of a node's loss. Over the goal,
    reverts the last move; within it, rescales the predictions by measured / predicted and
    steps forward if they allow, never to or past a point that failed.

    Points before `lowest` are outside the multiplication budget: verification starts no
    nearer and backs off no further. All exact (point 0) meets a goal when lowest is 0, and is
    then returned if nothing further met it; else None when nothing met. With no score limit
    (goal.limit None), only `lowest` is verified: the least predicted loss within the budget.
    """
    predicted = [0.0] + [m.predicted for m in path]
    verifications: list[Verification] = []
    # the furthest point that met the goal; the nearest that failed
    best, ceiling = (0 if lowest == 0 else None), len(predicted)
    if goal.limit is None:
        k = lowest
    else:
        k = max(furthest_within(predicted, goal.limit), lowest)
        if k == 0 and path and goal.limit > 0:
            k = 1
    while (best is None or best < k) and lowest <= k < ceiling and len(verifications) < max_verifications:
        plan = plan_at(path, k, nodes)
        measured, faster = measure(plan, k)
        met = faster and (goal.limit is None or measured <= goal.limit + SLACK)
        verifications.append(Verification(k, plan, predicted[k], measured, met, faster))
        log.info("verified %d moves: predicted %s, measured %s: %s", k, goal.describe(predicted[k]),
                 goal.describe(measured), "met" if met else "over the target" if faster else
                 "not faster" if goal.max_multiplications is None else "over the multiplication budget")
        if not met:  # back off: revert the last move
            ceiling, k = k, k - 1
            continue
        best = k
        if goal.limit is None:
            break
        scale = max(measured, floor, 1e-12) / max(predicted[k], floor, 1e-12)
        k = min(furthest_within([p * scale for p in predicted], goal.limit), ceiling - 1)
    return best, verifications


def candidate_choices(targets: list[frontend.TargetNode], options: BudgetOptions) -> dict[str, list[Option]]:
    """{node: the options the search tries for it}: lookups at the candidates up to its input
    width D and at ceil(D / S) for each S of options.subvectors, then sum-product layers of width
    round(f M), at least 1, for each f of options.spn_widths."""
    if any(int(C) != C or C < 1 for C in options.candidates):
        raise OptionsError(f"candidates must be positive codebook counts, got {options.candidates}")
    if any(int(S) != S or S < 1 for S in options.subvectors):
        raise OptionsError(f"candidate sub-vectors must be positive input counts, got {options.subvectors}")
    if any(not 0 < f < float("inf") for f in options.spn_widths):
        raise OptionsError(f"candidate spn widths must be positive multiples of M, got {options.spn_widths}")
    if not options.candidates and not options.spn_widths:
        raise OptionsError("the budget search needs candidates: codebook counts or spn widths")
    return {t.name: sorted({int(C) for C in options.candidates if C <= t.D}
                           | {-(-t.D // int(S)) for S in options.subvectors})
            + sorted({SumProduct(max(1, round(f * t.M))) for f in options.spn_widths}) for t in targets}


def search(analysis: frontend.ModelAnalysis, targets: list[frontend.TargetNode], data: CalibrationData,
           goal: Goal, options: BudgetOptions, compile_options: CompileOptions, progress: bool = False,
           seconds: dict | None = None, train_data: CalibrationData | None = None) -> CompileResult:
    """The fastest plan within the goal (with a multiplication budget: the plan within it of
    least loss, or the cheapest within both), compiled by the pipeline with `compile_options`
    (see the module docstring). With `train_data`, each verified plan is trained end to end on
    it before it is scored (the sensitivities stay one-shot fits); training rows equal to one
    of the search's held-out rows are left out, so the scores stay on unseen rows."""
    seconds = {} if seconds is None else seconds
    fit_idx, held_idx = held_out_split(data, options.held_out_fraction, compile_options.fit.seed)
    fit_data, held_out = data.subset(fit_idx), data.subset(held_idx)
    if train_data is not None:  # the rows that score the plans are trained on by none
        train_data = without_rows(train_data, held_out)
    choices = candidate_choices(targets, options)
    uint8 = compile_options.fit.spn_activations == "uint8"  # of the sum-product options
    count = None
    if goal.max_multiplications is not None:  # a budget no plan reaches fails before any timing or fitting
        count = count_multiplications(analysis.model, targets, choices, uint8)
        if count.least > goal.max_multiplications:
            raise OptionsError(f"no plan meets {goal.max_multiplications:,} multiplications per inference: the "
                               f"candidates reach {count.least:,} at the fewest ({count.fixed:,} of them in products "
                               f"the search does not replace)")
    # too few rows for the largest candidate fail here, before any timing or fitting
    check_enough_rows(analysis.model, fit_data, targets,
                      lambda t: max((C for C in choices[t.name] if isinstance(C, int)), default=1),
                      compile_options.calibrate)
    with timed(seconds, "cost model"):
        cost = options.cost_model or measure_costs(analysis.model, targets, choices, fit_data, options.cost_batch,
                                                   options.repetitions, bar(progress, "cost model"), uint8)
        missing = [(n, C) for n, cs in choices.items() for C in [None, *cs] if C not in cost.seconds.get(n, {})]
        if missing:
            raise OptionsError(f"the cost model has no time for {missing[0][0]} at {describe(missing[0][1])}")
    with timed(seconds, "sensitivity"):
        scorer = Scorer(analysis.model, held_out, goal.metric)
        sensitivity = options.sensitivity or measure_sensitivity(
            analysis, targets, choices, fit_data, scorer, compile_options, bar(progress, "sensitivity"))
        if sensitivity.metric != goal.metric or any(C not in sensitivity.scores.get(n, {})
                                                    for n, cs in choices.items() for C in cs):
            raise OptionsError(f"the given sensitivities do not cover every node and candidate for {goal.metric}")
    path = budget_path(cost, sensitivity, choices, goal.limit, count)
    for i, m in enumerate(path, 1):
        log.info("path %d: %s %s -> %s saves %.1f us, adds %s (predicted %s)%s", i, m.node, describe(m.before),
                 describe(m.after), 1e6 * m.seconds_saved, goal.describe(m.score_added), goal.describe(m.predicted),
                 "" if m.multiplications is None else f", {m.multiplications:,} multiplications")
    lowest = 0 if count is None else first_within_count(path, count, goal.max_multiplications)
    compiled: dict[int, CompileResult] = {}
    counted: dict[int, int] = {}  # with a multiplication budget: each verified model's count

    timing_rows = {k: v[:options.cost_batch] for k, v in fit_data.inputs.items()}

    def measure(plan: dict[str, Option], moves: int) -> tuple[float, bool]:
        chosen = {n: o for n, o in plan.items() if o is not None}
        methods = replace(compile_options, method="lut", node_methods={n: method_of(o) for n, o in chosen.items()})
        compiled[moves] = pipeline.run(analysis, targets, fit_data, {n: size_of(o) for n, o in chosen.items()},
                                       methods, progress, train_data=train_data)
        score = scorer(compiled[moves].model)
        if count is not None:  # multiplications are the budget, not time
            counted[moves] = counting.multiplications(compiled[moves].model, count.positions)
            return score, counted[moves] <= goal.max_multiplications
        if not options.time_whole_model:
            return score, True
        times = model_latencies({"original": analysis.model, "compiled": compiled[moves].model}, timing_rows,
                                threads=1, repetitions=options.repetitions)
        return score, times["compiled"] < times["original"]

    with timed(seconds, "verify"):
        best, verifications = verify_path(path, choices, goal, sensitivity.floor, measure, options.max_verifications,
                                          lowest)
    for v in verifications:
        v.multiplications = counted.get(v.moves)
    if best is None:
        tried = ", ".join(f"{v.moves} moves {goal.describe(v.measured)}" for v in verifications)
        raise OptionsError(f"no plan within {goal.describe()} meets {goal.max_multiplications:,} multiplications per "
                           f"inference (verified: {tried or 'none, out of verifications'})")
    plan = plan_at(path, best, choices)
    result = compiled[best] if best else _exact_result(analysis, fit_data, compile_options)
    result.skipped = list(analysis.skipped) + [
        frontend.SkippedNode(t.name, t.op_type, _kept_reason(t.name, cost, goal))
        for t in targets if plan[t.name] is None]
    result.seconds = seconds
    used = dict(metric=goal.metric, limit=goal.limit, max_multiplications=goal.max_multiplications,
                **{f.name: getattr(options, f.name) for f in fields(options)
                   if f.name not in ("cost_model", "sensitivity")})
    result.options = {**result.options, "budget": used}
    result.budget = BudgetResult(
        goal, plan, path[best - 1].predicted if best else 0.0,
        next((v.measured for v in verifications if v.moves == best), 0.0),
        cost.total({}), cost.total(plan), path, verifications, cost, sensitivity, fit_idx, held_idx,
        scorer.baseline, None if scorer.baseline is None else scorer.accuracy(result.model), used, count)
    return result


def _exact_result(analysis: frontend.ModelAnalysis, fit_data: CalibrationData,
                  compile_options: CompileOptions) -> CompileResult:
    result = CompileResult(analysis.model, [], [], fit_data.rows, options=compile_options.record({}, False))
    if fit_data.labels is not None:
        result.accuracy_before = result.accuracy_after = evaluate_accuracy(analysis.model, fit_data)
    return result


def _kept_reason(node: str, cost: CostModel, goal: Goal) -> str:
    times = cost.seconds[node]
    if goal.max_multiplications is None and all(t >= times[None] for t in times.values()):
        return f"kept exact by the budget search: no candidate is faster here (batch {cost.batch})"
    what = "the multiplication budget" if goal.limit is None else f"the {goal.metric.replace('_', ' ')} target"
    return f"kept exact by the budget search: replacing it would not fit within {what}"


def format_budget(budget: BudgetResult) -> str:
    """The search, step by step, for the terminal."""
    goal, us, count = budget.goal, (lambda s: f"{1e6 * s:.1f} us"), budget.multiplications
    what = "held-out top-1 accuracy drop" if goal.metric == "accuracy" else "held-out relative output error"
    lines = [f"budget: {what} at most {goal.describe()}"
             + ("" if count is None else f", at most {goal.max_multiplications:,} multiplications per inference")
             + f", on {len(budget.held_out_rows)} held-out calibration rows (fitted on {len(budget.fit_rows)})",
             f"cost model: each node timed alone in onnxruntime, 1 thread, batch {budget.cost.batch}; "
             f"all exact {us(budget.seconds_exact)}"
             + ("" if count is None else f"; {count.total({}):,} multiplications per inference all exact"),
             f"path (greedy, most {'time' if count is None else 'multiplications'} saved per predicted loss first):"]
    for i, m in enumerate(budget.path, 1):
        lines.append(f"  {i:>2}  {m.node}  {describe(m.before)} -> {describe(m.after)}: saves {us(m.seconds_saved)}, "
                     f"+{goal.describe(m.score_added)}; nodes {us(m.seconds)}, predicted {goal.describe(m.predicted)}"
                     + ("" if m.multiplications is None else f", {m.multiplications:,} multiplications"))
    for v in budget.verifications:
        lines.append(f"verified after {v.moves} move(s): predicted {goal.describe(v.predicted)}, "
                     f"measured {goal.describe(v.measured)}"
                     + ("" if v.multiplications is None else f", {v.multiplications:,} multiplications")
                     + f": {'met' if v.met else 'over the target'}")
    chosen = ", ".join(f"{n} {describe(option)}" for n, option in budget.plan.items())
    lines.append(f"chosen: {chosen}; nodes {us(budget.seconds_exact)} -> {us(budget.seconds)} "
                 f"({budget.seconds_exact / max(budget.seconds, 1e-12):.2f}x), "
                 f"measured {goal.describe(budget.measured)}"
                 + ("" if count is None else f"; {count.total(budget.plan):,} multiplications per inference"))
    if budget.accuracy_before is not None:
        lines.append(f"held-out calibration accuracy: original {budget.accuracy_before:.2%}, "
                     f"chosen {budget.accuracy_after:.2%}")
    return "\n".join(lines)
