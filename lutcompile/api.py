"""The compiler's Python API: model in, model out, in the shape of onnxruntime's quantize_static.

    compile_model("model.onnx", "fast.onnx", "calib.npz", codebooks=16)

runs the stages in data-flow order: frontend -> calibrate -> fit -> rewrite -> export.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from functools import partial
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from tqdm.auto import tqdm

from . import calibrate, frontend
from .export import check_output_path, save_model
from .finetune import FinetuneOptions, train
from .fit import TABLE_LOSSES, FitOptions, fit_node
from .partition import PARTITIONS
from .rewrite import Replacement, rewrite
from .runtime import accuracy, make_session, run_batched

if TYPE_CHECKING:
    from .budget import BudgetOptions, BudgetResult

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
    bytes_after: int  # tables, thresholds, split dimensions, offsets and bias


@dataclass
class CompileResult:
    model: onnx.ModelProto
    nodes: list[NodeReport]
    skipped: list[frontend.SkippedNode]
    calibration_rows: int
    accuracy_before: float | None = None  # on the calibration data, when it has labels
    accuracy_after: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    stages: list[tuple[str, float]] = field(default_factory=list)  # calibration accuracy per stage
    options: dict = field(default_factory=dict)  # the options the model was compiled with
    budget: BudgetResult | None = None  # the automatic budget search, when one chose the nodes


@contextmanager
def _timed(seconds: dict[str, float], stage: str):
    """Add the time spent in the block to seconds[stage] (stages can run several times)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def _progress(enabled: bool, desc: str):
    def wrap(items):
        return tqdm(items, desc=desc, leave=False, disable=not enabled)
    return wrap


def compile_model(model_input: str | os.PathLike | onnx.ModelProto,
                  model_output: str | os.PathLike | None,
                  calibration_data,
                  *,
                  codebooks: int | dict[str, int] = 16,
                  partition: str = "opq",
                  table_loss: str = "kl",
                  finetune: bool | None = None,
                  finetune_tables: bool = False,
                  nodes_to_include: list[str] | None = None,
                  nodes_to_exclude: list[str] | None = None,
                  op_types: tuple[str, ...] = frontend.PRODUCT_OPS,
                  fuse_activation: bool = True,
                  seed: int = 0,
                  batch_size: int = 256,
                  fit_options: FitOptions | None = None,
                  finetune_options: FinetuneOptions | None = None,
                  report_dir: str | os.PathLike | None = None,
                  progress: bool | None = None,
                  max_accuracy_drop: float | None = None,
                  max_output_error: float | None = None,
                  budget_options: BudgetOptions | None = None) -> CompileResult:
    """Replace the model's constant-weight matrix products by LutMatMul lookups.

    calibration_data: an .npz path or a dict of arrays, one per model input keyed by name
    (a single-input model accepts any single key), plus optional integer `labels`.
    table_loss: "ridge" (MADDNESS), "mse" (tables optimised for the error after each node's
    activation) or "kl" (as mse, but KL between softmaxes for the node producing the logits).
    finetune: ITLUMM's incremental replacement, fine-tuning the later exact layers after each
    replacement; on by default when the calibration data has labels.
    finetune_tables: afterwards, train the tables, lookup biases and remaining exact layers
    end to end.
    report_dir: write report.json and report.html there.
    codebooks: one count for every node, or {node name: count}: then only those nodes are
    replaced (as if they were `nodes_to_include`), each at its own count.
    max_accuracy_drop: instead of `codebooks`, search per node for the fastest choice (exact,
    or lookups at a count from budget_options.candidates) whose top-1 accuracy drop on a
    held-out part of the calibration data stays within this fraction (0.01 = one point);
    needs labels. max_output_error: the same with the relative error of the first output
    against the original model's (no labels needed). See lutcompile/budget.py.
    fit_options, finetune_options: the finer settings of those stages (codebooks, partition,
    table_loss and seed given here take precedence).
    """
    if progress is None:
        progress = sys.stderr.isatty()
    if table_loss not in TABLE_LOSSES:
        raise ValueError(f"unknown table loss '{table_loss}', choose from {', '.join(TABLE_LOSSES)}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition '{partition}', choose from {', '.join(PARTITIONS)}")
    seconds: dict[str, float] = {}
    with _timed(seconds, "frontend"):
        if model_output is not None:
            check_output_path(model_output, model_input if not isinstance(model_input, onnx.ModelProto) else None)
        model = model_input if isinstance(model_input, onnx.ModelProto) else frontend.load_model(model_input)
        analysis = frontend.analyse(model, op_types, fuse_activation)
        if isinstance(codebooks, dict) and nodes_to_include is None:
            nodes_to_include = list(codebooks)
        targets = _select(analysis, nodes_to_include, nodes_to_exclude)
        if isinstance(codebooks, dict) and (missing := [t.name for t in targets if t.name not in codebooks]):
            raise ValueError(f"no codebook count for node(s) {', '.join(missing)}")
        data = calibrate.load_calibration(calibration_data, analysis.model)
    if finetune is None:
        finetune = data.labels is not None
    tune = finetune_options or FinetuneOptions(seed=seed)
    options = replace(fit_options or FitOptions(), codebooks=16 if isinstance(codebooks, dict) else codebooks,
                      partition=partition, seed=seed)
    if max_accuracy_drop is not None or max_output_error is not None:
        from .budget import BudgetOptions, Goal, search
        goal = Goal.from_arguments(max_accuracy_drop, max_output_error, data.labels is not None)
        compile_plan = partial(compile_model, analysis.model, None, partition=partition, table_loss=table_loss,
                               finetune=finetune, finetune_tables=finetune_tables, op_types=op_types,
                               fuse_activation=fuse_activation, seed=seed, batch_size=batch_size,
                               fit_options=fit_options, finetune_options=finetune_options, progress=progress)
        result = search(analysis, targets, data, goal, budget_options or BudgetOptions(), options, table_loss,
                        compile_plan, batch_size, progress, seconds)
        return _finish(result, model_output, report_dir)

    with _timed(seconds, "calibrate"):  # too few rows for the codebooks fail here, before any fitting
        calibrate.check_enough_rows(analysis.model, data, targets, lambda t: min(
            codebooks.get(t.name, options.codebooks) if isinstance(codebooks, dict) else options.codebooks, t.D),
            options.max_rows, batch_size)
    teacher = None
    if (finetune or finetune_tables) and data.labels is None:
        teacher = first_output(analysis.model, data)
    current = analysis.model
    reports: list[NodeReport] = []
    stages: list[tuple[str, float]] = []
    fitting = [t.name for t in targets]
    # one-shot: every node fitted on the original model's activations; incremental: node by
    # node, on the activations of the model whose earlier nodes are already lookups
    rounds = [fitting] if not finetune else [[name] for name in fitting]
    for i, names in enumerate(_progress(progress and len(rounds) > 1, "replace")(rounds)):
        by_name = {t.name: t for t in frontend.analyse(current, op_types, fuse_activation).targets}
        now = [by_name[n] for n in names]
        with _timed(seconds, "calibrate"):
            activations = target_rows(current, data, now, options, batch_size, _progress(progress, "calibrate"))
        with _timed(seconds, "fit"):
            replacements = []
            for target in _progress(progress, "fit")(now):
                node_options = replace(options, codebooks=codebooks[target.name]) \
                    if isinstance(codebooks, dict) else options
                rep, report = fit_target(target, activations[target.name], node_options, table_loss,
                                         analysis.output_names)
                replacements.append(rep)
                reports.append(report)
            current = rewrite(current, replacements)
        # ITLUMM fine-tunes every exact product after the one just replaced: those still to be
        # replaced, and those that stay exact (excluded, or kept exact by a budget)
        order = list(by_name)
        later = [p for n in order[order.index(names[-1]) + 1:]
                 for p in by_name[n].parameter_names] if finetune else []
        if later:
            with _timed(seconds, "finetune"):
                current = train(current, data, teacher, set(later), tune, train_tables=tune.tables_in_pass,
                                epochs=tune.epochs, lr=tune.lr,
                                progress=_progress(progress, f"fine-tune after {names[0]}"))
        if data.labels is not None and finetune:
            stages.append((f"after {names[0]}", evaluate_accuracy(current, data)))
    if finetune_tables:
        with _timed(seconds, "finetune"):
            exact_left = {p for t in frontend.analyse(current, op_types, fuse_activation).targets
                          for p in t.parameter_names}
            current = train(current, data, teacher, exact_left, tune, train_tables=True,
                            progress=_progress(progress, "fine-tune tables"))
        if data.labels is not None:
            stages.append(("tables fine-tuned", evaluate_accuracy(current, data)))

    used = dict(codebooks=codebooks, partition=partition, table_loss=table_loss, finetune=finetune,
                finetune_tables=finetune_tables, seed=seed, op_types=list(op_types),
                nodes_to_include=nodes_to_include, nodes_to_exclude=nodes_to_exclude,
                fit_options=asdict(options), finetune_options=asdict(tune))
    result = CompileResult(current, reports, analysis.skipped, data.rows, seconds=seconds, stages=stages,
                           options=used)
    if data.labels is not None:
        with _timed(seconds, "evaluate"):
            result.accuracy_before = evaluate_accuracy(analysis.model, data)
            result.accuracy_after = evaluate_accuracy(current, data)
    return _finish(result, model_output, report_dir)


def _finish(result: CompileResult, model_output, report_dir) -> CompileResult:
    """Write the model (atomically) and the report, if asked."""
    if model_output is not None:
        with _timed(result.seconds, "export"):
            save_model(result.model, model_output)
    if report_dir is not None:
        from .report import write_report
        write_report(result, report_dir)
    return result


def target_rows(model: onnx.ModelProto, data: calibrate.CalibrationData, targets: list[frontend.TargetNode],
                options: FitOptions, batch_size: int = 256, progress=None) -> dict[str, np.ndarray]:
    """Each target's input rows [n, D] over the calibration data (a seeded sample of a Conv's
    patches, enough for options.max_rows), from a run of `model` in onnxruntime."""
    rng = np.random.default_rng(options.seed)
    per_image = calibrate.patches_per_image(options.max_rows, data.rows)
    return calibrate.collect_activations(
        model, data, {t.name: (t.input_name, partial(t.rows, rng=rng, per_image=per_image)) for t in targets},
        batch_size, progress=progress)


def fit_target(target: frontend.TargetNode, X: np.ndarray, options: FitOptions, table_loss: str,
               graph_outputs: list[str]) -> tuple[Replacement, NodeReport]:
    """One node's lookup replacement, fitted on its input rows X at options.codebooks (capped at D)."""
    C = min(options.codebooks, target.D)
    calibrate.require_rows(target.name, len(X), C)  # compile_model checked this before any fit
    is_logits = target.output_name in graph_outputs and target.activation is None
    loss = "mse" if table_loss == "kl" and not is_logits else table_loss
    fit = fit_node(X, target.weight, target.bias, target.activation,
                   replace(options, codebooks=C, table_loss=loss))
    info = {"partition": options.partition, "table_loss": loss, "source_op": target.op_type}
    p = fit.params
    bytes_after = p.tables.nbytes + p.thresholds.nbytes + p.split_dims.nbytes + p.offsets.nbytes + p.bias.nbytes
    bytes_before = 4 * (target.weight.size + (0 if target.bias is None else target.bias.size))
    report = NodeReport(target.name, target.op_type, target.D, target.M, C, options.partition, loss,
                        target.activation, fit.relative_error, bytes_before, bytes_after)
    log.info("fitted %s: %dx%d C=%d %s rel.err %.4f", target.name, target.D, target.M, C, loss,
             fit.relative_error)
    return Replacement(target, fit.params, info), report


def first_output(model: onnx.ModelProto, data: calibrate.CalibrationData) -> np.ndarray:
    session = make_session(model)
    return np.asarray(run_batched(session, data.inputs, [session.get_outputs()[0].name])[0])


def _select(analysis: frontend.ModelAnalysis, include: list[str] | None,
            exclude: list[str] | None) -> list[frontend.TargetNode]:
    names = {t.name for t in analysis.targets} | {s.name for s in analysis.skipped}
    for name in (include or []) + (exclude or []):
        if name not in names:
            raise ValueError(f"node '{name}' is not a MatMul, Gemm or Conv node of the model")
    chosen = []
    for t in analysis.targets:
        if include is not None and t.name not in include:
            analysis.skipped.append(frontend.SkippedNode(t.name, t.op_type, "not in nodes_to_include"))
        elif exclude and t.name in exclude:
            analysis.skipped.append(frontend.SkippedNode(t.name, t.op_type, "in nodes_to_exclude"))
        else:
            chosen.append(t)
    return chosen


def evaluate_accuracy(model: onnx.ModelProto | str, data: calibrate.CalibrationData,
                      threads: int | None = None) -> float:
    """Top-1 accuracy of the model's first output on labelled data, run in onnxruntime."""
    if data.labels is None:
        raise ValueError("accuracy needs labels")
    session = make_session(model, threads)
    logits = run_batched(session, data.inputs, [session.get_outputs()[0].name])[0]
    return accuracy(np.asarray(logits), data.labels)
