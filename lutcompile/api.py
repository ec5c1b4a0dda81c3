"""The compiler's Python API: model in, model out, in the shape of onnxruntime's quantize_static.

    compile_model("model.onnx", "fast.onnx", "calib.npz", codebooks=16)

reads the model (frontend), chooses the plan (one codebook count per node, or the budget
search's), runs the pipeline (lutcompile/compile/pipeline.py: calibrate -> fit -> rewrite ->
fine-tune) and writes the model and the report (export).
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .compile import calibrate, frontend, pipeline
from .compile.distributed import world
from .compile.augment import Augment, parse_augment
from .compile.finetune import FinetuneOptions, TrainOptions
from .compile.fit import FitOptions
from .compile.methods import NodeReport, get_method
from .ops.spn import lower_to_standard_ops
from .compile.pipeline import CompileOptions, CompileResult, evaluate_accuracy
from .onnx_io import external_data
from .onnx_io.export import check_output_path, save_model
from .onnx_io.sessions import thread_limit
from .progress import timed
from .errors import OptionsError

if TYPE_CHECKING:
    from .budget.search import BudgetOptions

__all__ = ["compile_model", "CompileOptions", "CompileResult", "NodeReport", "evaluate_accuracy"]

log = logging.getLogger("lutcompile")


def compile_model(model_input: str | os.PathLike | onnx.ModelProto,
                  model_output: str | os.PathLike | None,
                  calibration_data,
                  *,
                  train=None,
                  epochs: int | None = None,
                  augment: Augment | str | None = None,
                  codebooks: int | dict[str, int] | None = None,
                  subvector: int | None = None,
                  partition: str | None = None,
                  table_loss: str | None = None,
                  split_bins: int | None = None,
                  split_lines: int | None = None,
                  finetune: bool | None = None,
                  finetune_tables: bool | None = None,
                  finetune_trees: bool | None = None,
                  nodes_to_include: list[str] | None = None,
                  nodes_to_exclude: list[str] | None = None,
                  op_types: tuple[str, ...] | None = None,
                  fuse_activation: bool | None = None,
                  seed: int | None = None,
                  batch_size: int | None = None,
                  fit_options: FitOptions | None = None,
                  finetune_options: FinetuneOptions | None = None,
                  options: CompileOptions | None = None,
                  threads: int | None = None,
                  prune_columns: bool | None = None,
                  fuse_pooling: bool | None = None,
                  report_dir: str | os.PathLike | None = None,
                  progress: bool | None = None,
                  max_accuracy_drop: float | None = None,
                  max_output_error: float | None = None,
                  max_multiplications: int | None = None,
                  budget_options: BudgetOptions | None = None,
                  mask_input: str | bool | None = None,
                  method: str | dict[str, str] | None = None,
                  spn_width: int | dict[str, int] | None = None,
                  spn_activations: str | None = None,
                  portable: bool = False) -> CompileResult:
    """Replace the model's constant-weight matrix products by lookup nodes.

    calibration_data: an .npz path, a dict of arrays (one per model input keyed by name; a
    single-input model accepts any single key; optional integer `labels`) or an onnxruntime
    CalibrationDataReader.
    train: training rows in the same forms and checks as calibration_data (any number of
    rows, labels optional): the compiled network is then trained end to end on them, its
    lookups' tables and trees included (pipeline.run); epochs: of that training (default
    TrainOptions.epoch_count: 20, or 40 with augment). augment: random augmentation of the
    training rows of an image model, an Augment or its CLI spelling
    ("rotate=15,scale=0.15,shift=2,shape=1x28x28"; see compile/augment.py).
    codebooks: one count for every node, or {node name: count}: then only those nodes are
    replaced (as if they were `nodes_to_include`), each at its own count. subvector: instead,
    inputs per codebook, so a node of input width D gets ceil(D / subvector) codebooks.
    Neither given: DEFAULT_CODEBOOKS, or with `train` TRAINED_CODEBOOKS (see there).
    options: every stage's options (CompileOptions, which holds the defaults); the keyword
    arguments below, when given, override the fields they name:
    partition, table_loss, seed (fit; seed also calibrate and finetune): "ridge" (MADDNESS),
    "mse" (tables optimised for the error after each node's activation) or "kl" (as mse, but
    KL between softmaxes for the node producing the logits); split_bins (fit): 0 searches the
    trees' thresholds at every distinct value, N >= 2 between N quantile bins per dimension
    (faster on many rows, FitOptions.split_bins); split_lines (fit): L >= 1 confines the trees of
    a MatMul/Gemm reading an input no replaced node produces to the L 64-byte lines of the row
    that carry most of its product, so its encoder streams L lines of each row (FitOptions.split_lines);
    fit_options, finetune_options:
    the whole stage's options; op_types, fuse_activation, nodes_to_include, nodes_to_exclude
    (frontend); batch_size (calibrate);
    finetune: ITLUMM's incremental replacement, fine-tuning the later exact layers after each
    replacement (None: on when the calibration data has labels); finetune_tables: afterwards,
    train the tables, lookup biases and remaining exact layers end to end; finetune_trees: in
    that stage, train the trees' thresholds too, with straight-through gradients into every
    lookup's input (implies finetune_tables).
    threads: the compiler's own onnxruntime sessions and torch use this many threads (None:
    their defaults, every core).
    prune_columns: False keeps every output column of every lookup node; by default
    (CompileOptions.prune_columns) a lookup feeding another computes only the columns that
    one's trees read, with the same model outputs bit for bit (compile/prune.py).
    fuse_pooling: False leaves each MaxPool after a LutConv a node of its own; by default
    (CompileOptions.fuse_pooling) the LutConv writes the pooled output itself, with the same
    model outputs bit for bit (compile/fuse.py).
    report_dir: write report.json and report.html there.
    max_accuracy_drop: instead of `codebooks`, search per node for the fastest choice (exact,
    or lookups at a count from budget_options.candidates) whose top-1 accuracy drop on a
    held-out part of the calibration data stays within this fraction (0.01 = one point);
    needs labels. max_output_error: the same with the relative error of the first output
    against the original model's (no labels needed). The search tries lookups and
    sum-product layers (budget_options.spn_widths) per node. max_multiplications: StrassenNets'
    budget, the whole model's multiplications per inference (ops/counting.py) at most this:
    alone, the plan within it of least predicted loss; with one of the two targets above, the
    plan within both with the fewest multiplications. See lutcompile/budget/search.py.
    mask_input: the input whose zeros mark padding positions ([batch, tokens], a sequence
    model's attention mask): rows at those positions are neither fitted on nor counted in the
    training loss. None: CalibrateOptions.mask_input ("auto": an input named attention_mask);
    False: every position counts.
    method: "lut" (lookups, the default) or "spn" (StrassenNets' ternary sum-product layers,
    SpnMatMul) for every replaced node, or {node name: method} with "lut" for the others.
    spn_width: the spn nodes' hidden width r, their multiplications per row, one for every node
    or {node name: r} (None, or a node not named: r = M). spn_activations: "float32" (default) or
    "uint8": each spn product's input rows quantised to 8 bits on the fly, so the kernel sums
    integers (int8 dot products; docs/lutmatmul.md), at the cost of the quantisation's
    multiplications and error (FitOptions.spn_activations).
    portable: write the spn nodes as standard ONNX ops (ops.spn.lower_to_standard_ops), so the
    model runs in any onnxruntime without lutcompile's library; every replaced node must then
    be spn.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    options = _resolve_options(options or CompileOptions(), partition=partition, table_loss=table_loss,
                               split_bins=split_bins, split_lines=split_lines, spn_activations=spn_activations,
                               finetune=finetune, finetune_tables=finetune_tables, finetune_trees=finetune_trees,
                               nodes_to_include=nodes_to_include if nodes_to_include is not None
                               else list(codebooks) if isinstance(codebooks, dict) else None,
                               nodes_to_exclude=nodes_to_exclude, op_types=op_types,
                               fuse_activation=fuse_activation, seed=seed, batch_size=batch_size,
                               fit_options=fit_options, finetune_options=finetune_options, epochs=epochs,
                               augment=augment)
    if mask_input is not None:
        options = replace(options, calibrate=replace(options.calibrate, mask_input=mask_input or None))
    if prune_columns is not None:
        options = replace(options, prune_columns=prune_columns)
    if fuse_pooling is not None:
        options = replace(options, fuse_pooling=fuse_pooling)
    options.fit.check()
    if train is None and augment is not None:
        raise OptionsError("augment applies to the training rows; give train (--train) too")
    if isinstance(method, str):
        options = replace(options, method=method)
    elif method is not None:
        options = replace(options, node_methods=dict(method))
    if spn_width is not None:
        options = replace(options, spn_width=dict(spn_width) if isinstance(spn_width, dict) else spn_width)
    options.check_methods()
    for name in sorted(options.methods()):
        if train is not None and not get_method(name).trainable:
            raise OptionsError(f"method '{name}' cannot train; leave out train (--train)")
    # under torchrun (compile/distributed.py) rank 0 alone shows progress and writes files
    group = world()
    progress = progress and group.writes
    seconds: dict[str, float] = {}
    # the models that outlive the call: the caller's own, and the result
    survivors = [model_input] if isinstance(model_input, onnx.ModelProto) else []
    with thread_limit(threads), external_data.released_after(lambda: survivors):
        with timed(seconds, "frontend"):
            if model_output is not None:
                check_output_path(model_output, None if isinstance(model_input, onnx.ModelProto) else model_input)
            model = model_input if isinstance(model_input, onnx.ModelProto) else frontend.load_model(model_input)
            fo = options.frontend
            analysis = frontend.analyse(model, fo.op_types, fo.fuse_activation)
            targets = frontend.select_targets(analysis, fo)
            plan = options.node_sizes(_plan(_widths(codebooks, subvector, train is not None), targets), targets)
            unknown = sorted(set(options.node_methods) - {t.name for t in analysis.targets})
            if unknown:
                raise OptionsError(f"method for node '{unknown[0]}': it is not a MatMul, Gemm or Conv node of the model")
            budgeted = max_accuracy_drop is not None or max_output_error is not None or max_multiplications is not None
            if budgeted and method is not None:
                raise OptionsError("the budget search chooses each node's method from its candidates "
                                   "(--candidates, --candidate-spn-widths): leave out method (--method)")
            if portable and options.fit.spn_activations != "float32":
                raise OptionsError("portable writes float sum-product layers: uint8 activations (quantised per row, "
                                   "per patch in a convolution) have no standard-op form here")
            if portable and (budgeted or any(options.method_of(t.name) != "spn" for t in targets if t.name in plan)):
                raise OptionsError("portable writes spn nodes as standard ops, and lookup nodes have no such form: "
                                   "use method 'spn' for every replaced node (and no budget search)")
            data = calibrate.load_calibration(calibration_data, analysis.model)
            train_data = None if train is None else calibrate.load_calibration(train, analysis.model, what="training")
            if train_data is not None and options.finetune.train.augment is not None:
                options.finetune.train.augment.check_rows(train_data.inputs)
        if budgeted:
            from .budget.search import BudgetOptions, Goal, search
            goal = Goal.from_arguments(max_accuracy_drop, max_output_error, data.labels is not None,
                                       max_multiplications)
            result = search(analysis, targets, data, goal, budget_options or BudgetOptions(), options,
                            progress, seconds, train_data)
        else:
            result = pipeline.run(analysis, targets, data, plan, options, progress, seconds, train_data)
            result.options["codebooks"] = codebooks  # as asked; "plan" holds the count per node
            result.options["subvector"] = subvector
        result.options["threads"] = threads
        result.options["portable"] = portable
        if portable:
            result.model = lower_to_standard_ops(result.model)
        survivors.append(result.model)
        if model_output is not None and group.writes:
            with timed(result.seconds, "export"):
                save_model(result.model, model_output)
        if report_dir is not None and group.writes:
            from .tools.report import write_report
            write_report(result, report_dir)
    return result


DEFAULT_CODEBOOKS = 16
# With --train and no width: the widest count that keeps the shipped MLP faster than
# onnxruntime's int8 static model at batch 256 and at batch 1 on one thread (scripts/train_table.py
# measures it: 2.22x and 1.40x), where training brings it within about a point of exact
# (97.70 %). Narrower nodes get C = D.
TRAINED_CODEBOOKS = 64


def _widths(codebooks, subvector, trained: bool):
    """codebooks as _plan takes them: the count(s) given, or from `subvector`, or the default."""
    if codebooks is not None and subvector is not None:
        raise OptionsError("give codebooks or subvector, not both")
    if subvector is None:
        return codebooks if codebooks is not None else TRAINED_CODEBOOKS if trained else DEFAULT_CODEBOOKS
    if isinstance(subvector, bool) or not isinstance(subvector, (int, np.integer)) or subvector < 1:
        raise OptionsError(f"subvector must be a whole number >= 1, got {subvector!r}")
    return lambda target: -(-target.D // int(subvector))


def _plan(codebooks, targets: list[frontend.TargetNode]) -> dict[str, int]:
    """{node: codebook count} for every chosen target, from one count, a mapping, or a
    function of the target."""
    counts = codebooks if isinstance(codebooks, dict) else \
        {t.name: codebooks(t) if callable(codebooks) else codebooks for t in targets}
    missing = [t.name for t in targets if t.name not in counts]
    if missing:
        raise OptionsError(f"no codebook count for node(s) {', '.join(missing)}")
    for name, C in counts.items():
        if isinstance(C, bool) or not isinstance(C, (int, np.integer)) or C < 1:
            raise OptionsError(f"codebook counts must be whole numbers >= 1, got {C!r} for {name}")
    return {t.name: int(counts[t.name]) for t in targets}


def _resolve_options(options: CompileOptions, *, partition, table_loss, split_bins, split_lines, spn_activations,
                     finetune, finetune_tables, finetune_trees,
                     nodes_to_include, nodes_to_exclude, op_types, fuse_activation, seed, batch_size,
                     fit_options, finetune_options, epochs, augment=None) -> CompileOptions:
    """`options` with the fields the keyword arguments name overridden (None: not given)."""
    def given(**fields):
        return {k: v for k, v in fields.items() if v is not None}
    fit = replace(fit_options or options.fit, **given(partition=partition, table_loss=table_loss, seed=seed,
                                                       split_bins=split_bins, split_lines=split_lines,
                                                       spn_activations=spn_activations))
    tune = replace(finetune_options or options.finetune, **given(enabled=finetune, tables=finetune_tables,
                                                                  trees=finetune_trees, seed=seed))
    if tune.trees:  # the trees train in the end-to-end stage
        tune = replace(tune, tables=True)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise OptionsError(f"epochs must be a whole number >= 1, got {epochs!r}")
        tune = replace(tune, train=replace(tune.train, epochs=int(epochs)))
    if augment is not None:
        if isinstance(augment, str):
            augment = parse_augment(augment)
        elif not isinstance(augment, Augment):
            raise OptionsError(f"augment must be an Augment or its text form, got {type(augment).__name__}")
        augment.check()
        tune = replace(tune, train=replace(tune.train, augment=augment))
    front = replace(options.frontend, **given(
        op_types=None if op_types is None else tuple(op_types), fuse_activation=fuse_activation,
        nodes_to_exclude=None if nodes_to_exclude is None else tuple(nodes_to_exclude)))
    if nodes_to_include is not None:
        front = replace(front, nodes_to_include=tuple(nodes_to_include))
    calib = replace(options.calibrate, **given(batch_size=batch_size, seed=seed))
    return replace(options, frontend=front, calibrate=calib, fit=fit, finetune=tune)
