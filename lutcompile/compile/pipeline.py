"""The compile pipeline, one call for every caller: calibrate -> fit -> rewrite -> fine-tune.

`run` takes an analysed model (frontend), the chosen targets, the calibration data and the
plan, {node name: codebook count}, and returns the compiled model in memory. compile_model
(lutcompile/api.py) calls it once with the user's plan; the budget search
(lutcompile/budget/search.py) calls it for each plan it verifies. Writing the model and the
report is the caller's.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from ..onnx_io.sessions import accuracy, make_session, run_batched
from ..progress import bar, timed
from . import calibrate, frontend
from .calibrate import CalibrateOptions, CalibrationData
from .distributed import World, world
from .finetune import FinetuneOptions, TrainingCurve, held_out_rows, train
from .fit import FitOptions, TreeSource
from .fuse import fuse_max_pools
from ..errors import OptionsError
from .methods import NodeReport, get_method, with_final_counts
from .prune import CHANNEL_WISE, ELEMENTWISE, narrowed_reports, prune_unread_columns
from .rewrite import rewrite
from ..ops.spn import is_spn

log = logging.getLogger("lutcompile")


@dataclass(frozen=True)
class CompileOptions:
    """Every stage's options, one dataclass each, holding the one set of defaults."""

    frontend: frontend.FrontendOptions = field(default_factory=frontend.FrontendOptions)
    calibrate: CalibrateOptions = field(default_factory=CalibrateOptions)
    fit: FitOptions = field(default_factory=FitOptions)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    method: str = "lut"  # the replacement method (compile/methods.py) of every node ...
    node_methods: dict[str, str] = field(default_factory=dict)  # ... but these, {node name: method}
    # the spn method's hidden width r, one for every node or {node name: r} (None, or a node the
    # dict does not name: r = M, the authors' choice)
    spn_width: int | dict[str, int] | None = None
    # lookup producers compute only the columns the lookup they feed reads (compile/prune.py);
    # the outputs are the same bit for bit
    prune_columns: bool = True
    # a LutConv writes the output of the MaxPool after it (compile/fuse.py); bit for bit too
    fuse_pooling: bool = True

    def method_of(self, node: str) -> str:
        return self.node_methods.get(node, self.method)

    def methods(self) -> set[str]:
        """Every method some node may take."""
        return {self.method, *self.node_methods.values()}

    def check_methods(self) -> None:
        """A one-line OptionsError for an unknown method or a bad spn width."""
        for name in sorted(self.methods()):
            get_method(name)
        widths = self.spn_width.values() if isinstance(self.spn_width, dict) else \
            [] if self.spn_width is None else [self.spn_width]
        for r in widths:
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
                raise OptionsError(f"spn_width must be a whole number >= 1, got {r!r}")

    def node_sizes(self, plan: dict[str, int], targets: list[frontend.TargetNode]) -> dict[str, int]:
        """`plan` (codebooks per node) with each spn node's entry its hidden width r instead."""
        def width(t: frontend.TargetNode) -> int:
            return self.spn_width.get(t.name, t.M) if isinstance(self.spn_width, dict) else self.spn_width or t.M
        by_name = {t.name: t for t in targets}
        return {n: width(by_name[n]) if self.method_of(n) == "spn" else size for n, size in plan.items()}

    def record(self, plan: dict[str, int], incremental: bool) -> dict:
        """What CompileResult.options (and report.json) say the model was compiled with."""
        fo = self.frontend
        return dict(codebooks=dict(plan), plan=dict(plan), method=self.method, node_methods=dict(self.node_methods),
                    spn_width=dict(self.spn_width) if isinstance(self.spn_width, dict) else self.spn_width,
                    partition=self.fit.partition,
                    table_loss=self.fit.table_loss, finetune=incremental, finetune_tables=self.finetune.tables,
                    seed=self.fit.seed, op_types=list(fo.op_types),
                    nodes_to_include=None if fo.nodes_to_include is None else list(fo.nodes_to_include),
                    nodes_to_exclude=list(fo.nodes_to_exclude) or None,
                    calibrate_options=asdict(self.calibrate), fit_options=asdict(self.fit),
                    finetune_options=asdict(self.finetune),
                    # the train stage's epochs and mixup as run (TrainOptions leaves them None
                    # for the recipe's default, which depends on augmentation)
                    train_epochs=self.finetune.train.epoch_count, train_mixup=self.finetune.train.mixup_alpha)


@dataclass
class CompileResult:
    model: onnx.ModelProto
    nodes: list[NodeReport]
    skipped: list[frontend.SkippedNode]
    calibration_rows: int  # calibration samples (model input rows) the nodes were fitted on
    accuracy_before: float | None = None  # on the calibration data, when it has labels
    accuracy_after: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    stages: list[tuple[str, float]] = field(default_factory=list)  # calibration accuracy per stage
    options: dict = field(default_factory=dict)  # the options the model was compiled with
    budget: object | None = None  # budget.search.BudgetResult, when the budget search chose the plan
    training: list[TrainingCurve] = field(default_factory=list)  # every training run's curve, in order
    before_training: onnx.ModelProto | None = None  # with train data: the compiled model before the train stage


# ops a replaced producer's output may pass through on its way to a lookup whose input
# compile/prune.py lays out (each treats features apart, or only reshapes them)
_LAID_OUT_THROUGH = ELEMENTWISE | CHANNEL_WISE | {"Flatten", "Reshape"}


def node_fit_options(model: onnx.ModelProto, target: frontend.TargetNode, targets: list[frontend.TargetNode],
                     fit: FitOptions) -> FitOptions:
    """`fit` for one node: split_lines applies only to a MatMul/Gemm whose input no other
    replaced node produces; the pruning pass lays out the split columns of the others, and a
    Conv's patches are gathered by the op itself."""
    if not fit.split_lines:
        return fit
    produced = {t.output_name for t in targets}
    producer = {o: n for n in model.graph.node for o in n.output}
    name = target.input_name
    while name not in produced and name in producer and producer[name].op_type in _LAID_OUT_THROUGH:
        name = producer[name].input[0]
    return replace(fit, split_lines=0) if target.conv is not None or name in produced else fit


def run(analysis: frontend.ModelAnalysis, targets: list[frontend.TargetNode], data: CalibrationData,
        plan: dict[str, int], options: CompileOptions, progress: bool = False,
        seconds: dict[str, float] | None = None, train_data: CalibrationData | None = None) -> CompileResult:
    """Replace the targets named in `plan`, each at its codebook count (capped at its input
    width D); targets the plan does not name stay exact. No file is written.

    With `train_data`, a last stage trains the whole network end to end on it: every lookup's
    tables and thresholds (through the hard lookups, finetune.FinetuneOptions) and every exact
    layer, against the original model's logits (and the labels, when given); a held-out slice
    of the training rows picks the epoch."""
    seconds = {} if seconds is None else seconds
    options.fit.check()
    options.check_methods()
    chosen = [t for t in targets if t.name in plan]
    fo, co, tune = options.frontend, options.calibrate, options.finetune
    # ITLUMM's pass by default when there are labels, but not before the train stage, which
    # trains every layer end to end and supersedes it
    incremental = data.labels is not None and train_data is None if tune.enabled is None else tune.enabled
    held_out = None
    if train_data is not None:  # the training's held-out rows are fitted on by no stage
        held_out = held_out_rows(train_data.rows, tune)
        data = calibrate.without_rows(data, train_data.subset(held_out))
    with timed(seconds, "calibrate"):  # too few rows for the codebooks fail here, before any fitting
        calibrate.check_enough_rows(analysis.model, data, chosen, lambda t: min(plan[t.name], t.D)
                                    if options.method_of(t.name) == "lut" else 1, co)  # spn: a's least squares
    teacher = first_output(analysis.model, data) if (incremental or tune.tables) and data.labels is None else None
    current = analysis.model
    reports: list[NodeReport] = []
    trees: dict[str, TreeSource] = {}  # each fitted lookup's partition and weight (the train stage's re-split)
    stages: list[tuple[str, float]] = []
    curves: list[TrainingCurve] = []
    # one-shot: every node fitted on the original model's activations; incremental: node by
    # node, on the activations of the model whose earlier nodes are already replaced
    names = [t.name for t in chosen]
    recipe = tune.train
    group = world() if train_data is not None else World()
    layerwise = train_data is not None and recipe.layerwise and len(names) > 1
    rounds = [[n] for n in names] if incremental or layerwise else [names] if names else []

    def train_stage(model: onnx.ModelProto, epochs: int, stage: str) -> onnx.ModelProto:
        """The train stage on `model`: its lookups' tables and trees and its exact layers."""
        with timed(seconds, "train"):
            # the teacher runs in torch on every batch as trained, mixed rows included
            stage_options = replace(tune, tree_temperature=recipe.tree_temperature,
                                    distill_weight=recipe.distill_weight, batch_size=recipe.batch_size)
            done = train(model, train_data, analysis.model, _exact_parameters(model, fo), stage_options,
                         train_tables=True, train_trees=True, epochs=epochs, lr=recipe.lr,
                         progress=bar(progress, stage), mixup=recipe.mixup_alpha, schedule=recipe.schedule,
                         ema=recipe.ema, stage=stage, held_out=held_out, group=group, augment=recipe.augment,
                         mask=calibrate.mask_input(analysis.model, co.mask_input), resplit=trees,
                         resplit_every=recipe.resplit_every)
            curves.append(done.curve)
            if stage != "train" or not recipe.scale_epochs or not any(is_spn(n) for n in done.model.graph.node):
                return done.model
            # the authors' last phase: the ternary pattern frozen, each hidden unit's scale trains
            done = train(done.model, train_data, analysis.model, set(), stage_options, epochs=recipe.scale_epochs,
                         lr=recipe.lr, progress=bar(progress, "train a"), schedule=recipe.schedule, ema=recipe.ema,
                         stage="train a", held_out=held_out, group=group, augment=recipe.augment,
                         mask=calibrate.mask_input(analysis.model, co.mask_input), train_spn_scales=True)
        curves.append(done.curve)
        return done.model

    before_training = None
    for round_number, step in enumerate(bar(progress and len(rounds) > 1, "replace")(rounds)):
        by_name = {t.name: t for t in frontend.analyse(current, fo.op_types, fo.fuse_activation).targets}
        now = [by_name[n] for n in step]
        with timed(seconds, "calibrate"):
            rows = calibrate.target_rows(current, data, now, co, bar(progress, "calibrate"))
        with timed(seconds, "fit"):
            fitted = [get_method(options.method_of(t.name)).fit(t, rows[t.name], plan[t.name], node_fit_options(analysis.model, t, chosen, options.fit),
                                 t.output_name in analysis.output_names and t.activation is None)
                      for t in bar(progress, "fit")(now)]
            current = rewrite(current, [f.replacement for f in fitted])
        reports += [f.report for f in fitted]
        trees.update({f.report.name: f.trees for f in fitted if f.trees is not None})
        # ITLUMM fine-tunes every exact product after the one just replaced: those still to be
        # replaced, and those that stay exact (excluded, or kept exact by a budget)
        order = list(by_name)
        later = [p for n in order[order.index(step[-1]) + 1:] for p in by_name[n].parameter_names] \
            if incremental else []
        if later:
            with timed(seconds, "finetune"):
                done = train(current, data, teacher, set(later), tune, train_tables=tune.tables_in_pass,
                             epochs=tune.epochs, lr=tune.lr, progress=bar(progress, f"fine-tune after {step[0]}"),
                             stage=f"fine-tune after {step[0]}")
                current = done.model
                curves.append(done.curve)
        if layerwise:  # halutmatmul's schedule: train everything after each replacement
            if before_training is None:
                before_training = current
            current = train_stage(current, _round_epochs(recipe.epoch_count, len(rounds), round_number),
                                  "train" if round_number == len(rounds) - 1 else f"train after {step[0]}")
        if data.labels is not None and incremental:
            stages.append((f"after {step[0]}", evaluate_accuracy(current, data)))
    if tune.tables:
        with timed(seconds, "finetune"):
            label = "fine-tune tables" + (" and trees" if tune.trees else "")
            done = train(current, data, teacher, _exact_parameters(current, fo), tune, train_tables=True,
                         train_trees=tune.trees, progress=bar(progress, label), stage=label)
            current = done.model
            curves.append(done.curve)
        if data.labels is not None:
            stages.append(("tables fine-tuned", evaluate_accuracy(current, data)))
    if train_data is not None:
        if not layerwise:
            before_training = current
            current = train_stage(current, recipe.epoch_count, "train")
        if data.labels is not None:
            stages.append(("trained end to end", evaluate_accuracy(current, data)))
    if options.prune_columns:
        with timed(seconds, "prune"):
            current, narrowed = prune_unread_columns(current)
            reports = narrowed_reports(reports, narrowed, current)
    if options.fuse_pooling:
        with timed(seconds, "fuse"):
            current, pools = fuse_max_pools(current)
            absorbed = {f.conv: f.pool for f in pools}
            reports = [replace(r, fused_pool=absorbed.get(r.name)) for r in reports]
    reports = with_final_counts(reports, current)
    result = CompileResult(current, reports, list(analysis.skipped), data.rows, seconds=seconds,
                           stages=stages, training=curves, before_training=before_training,
                           options={**options.record(plan, incremental),
                                    "train_rows": None if train_data is None else train_data.rows})
    if data.labels is not None:
        with timed(seconds, "evaluate"):
            result.accuracy_before = evaluate_accuracy(analysis.model, data)
            result.accuracy_after = evaluate_accuracy(current, data)
    return result


def _round_epochs(epochs: int, rounds: int, round_number: int) -> int:
    """The layer-by-layer schedule's share of `epochs` for one round (at least one each)."""
    return max(1, epochs // rounds + (round_number < epochs % rounds))


def _exact_parameters(model: onnx.ModelProto, fo: frontend.FrontendOptions) -> set[str]:
    """The weights and biases of the products still exact in `model` (the end-to-end stages train them)."""
    return {p for t in frontend.analyse(model, fo.op_types, fo.fuse_activation).targets for p in t.parameter_names}


def first_output(model: onnx.ModelProto, data: CalibrationData) -> np.ndarray:
    """The model's first output over the rows of `data`, run in onnxruntime."""
    session = make_session(model)
    return np.asarray(run_batched(session, data.inputs, [session.get_outputs()[0].name])[0])


def evaluate_accuracy(model: onnx.ModelProto | str, data: CalibrationData,
                      threads: int | None = None) -> float:
    """Top-1 accuracy of the model's first output on labelled data, run in onnxruntime."""
    if data.labels is None:
        raise ValueError("accuracy needs labels")
    session = make_session(model, threads)
    logits = run_batched(session, data.inputs, [session.get_outputs()[0].name])[0]
    return accuracy(np.asarray(logits), data.labels)
