"""Command line: a thin layer over `lutcompile.api.compile_model`, `lutcompile.diff` and
`lutcompile.inspection`.

    lutcompile MODEL --calib NPZ -o OUT [--codebooks C] [--eval NPZ] [--report DIR]
    lutcompile MODEL --calib NPZ -o OUT --max-accuracy-drop 0.01   (or --max-output-error REL)
    lutcompile MODEL --calib NPZ -o OUT --max-multiplications N    (alone or with a target)
    lutcompile diff MODEL_A MODEL_B [--calib NPZ] [--json] [--exit-code]
    lutcompile inspect MODEL [--json]

The first word selects `diff` or `inspect` unless a file of that name exists (then it is the
model to compile, as before).

Exit status: 0 success; 1 internal error (a bug: the message says "internal error" and --debug
shows the traceback); 2 bad command line or option; 3 bad input model;
4 bad calibration or evaluation data; 5 bad output path (including --report DIR);
6 `inspect` found inconsistent lookup tables; 130 interrupted (Ctrl-C, SIGINT: the output file is
written atomically, so none is left behind). `diff` exits 0 whether or not the models differ,
unless given --exit-code: then 1 when the graphs differ, 0 when they are identical (the
convention of `git diff --exit-code`; an internal error also exits 1 but prints
`lutcompile: error: ...` on stderr).

Progress bars (tqdm, on stderr) show only when stderr is a terminal and --quiet is not given;
messages go through the `logging` module ("lutcompile" logger): warnings by default, each
stage with -v, debugging detail with -vv.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .. import api
from ..budget.search import BudgetOptions, format_budget
from ..compile import calibrate, frontend
from ..compile.distributed import world
from ..compile.finetune import FinetuneOptions, TrainOptions
from ..compile.fit import TABLE_LOSSES, FitOptions
from ..compile.partition import PARTITIONS
from ..onnx_io.export import OutputError
from ..errors import OptionsError

EXIT_INTERNAL, EXIT_USAGE, EXIT_MODEL, EXIT_DATA, EXIT_OUTPUT = 1, 2, 3, 4, 5
EXIT_DIFFERENT = 1  # `diff --exit-code`: the graphs differ
EXIT_INCONSISTENT = 6  # `inspect`: a lookup node's tables do not hold together
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + the signal number, as shells report it
SUBCOMMANDS = ("diff", "inspect")

log = logging.getLogger("lutcompile")

_EPILOG = """other commands (each with --help):
  lutcompile diff MODEL_A MODEL_B [--calib NPZ] [--json]   what changed, node by node
  lutcompile inspect MODEL [--json]                         list and check the lookup nodes

exit status: 0 ok, 1 internal error, 2 bad command line, 3 bad model, 4 bad data,
5 bad output path, 6 inconsistent tables (inspect), 130 interrupted (Ctrl-C)"""


def _add_logging_flags(p: argparse.ArgumentParser, progress: bool = False) -> None:
    if progress:
        p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="count", default=0,
                   help="log each stage (-vv: debugging detail)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lutcompile",
        description="Replace an ONNX model's matrix products with table lookups (LutMatMul).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="input ONNX model")
    p.add_argument("--calib", required=True,
                   help=".npz with one array per model input (by name) and optional integer 'labels'")
    p.add_argument("-o", "--output", required=True, help="output ONNX model")
    width = p.add_mutually_exclusive_group()
    width.add_argument("--codebooks", "-C", type=int, default=None,
                       help=f"codebooks per node, each a 4-bit code (default {api.DEFAULT_CODEBOOKS}, with --train "
                            f"{api.TRAINED_CODEBOOKS}; capped at the node's input width)")
    width.add_argument("--subvector", "-S", type=int, default=None, metavar="S",
                       help="instead, inputs per codebook: a node of input width D gets ceil(D / S) codebooks")
    p.add_argument("--partition", default=None, choices=PARTITIONS,
                   help="how input dimensions are split among codebooks (r2: ITLUMM's correlation "
                        f"clustering; opq: OPQ rotation projected to a permutation; default {FitOptions.partition})")
    p.add_argument("--table-loss", default=None, choices=TABLE_LOSSES,
                   help="ridge tables (MADDNESS), or optimised for the MSE after each node's activation, "
                        f"with KL between softmaxes on the logits node (kl; default {FitOptions.table_loss})")
    p.add_argument("--split-bins", type=int, default=None, metavar="N",
                   help="search the trees' thresholds between N quantile bins per input dimension, "
                        "a few sparse products per level instead of a sort per node: faster on many "
                        f"rows (0: every distinct value; default {FitOptions.split_bins})")
    p.add_argument("--method", action="append", default=None, metavar="METHOD|NODE=METHOD",
                   help="how nodes are replaced: lut (lookups, the default) or spn (StrassenNets' ternary "
                        "sum-product layers, SpnMatMul); NODE=METHOD sets one node's (repeatable)")
    p.add_argument("--spn-width", type=int, default=None, metavar="R",
                   help="the spn nodes' hidden width r, their multiplications per row (default: r = M)")
    p.add_argument("--spn-activations", choices=("float32", "uint8"), default=None,
                   help="uint8: each spn product's input rows quantised to 8 bits on the fly, the ternary "
                        "products int8 dot products (faster; adds the quantisation's multiplications and "
                        "error); default float32")
    p.add_argument("--portable", action="store_true",
                   help="write the spn nodes as standard ONNX ops (MatMul by ternary constants, Mul, Add), "
                        "so that any onnxruntime runs the model without lutcompile; every node must be spn")
    p.add_argument("--split-lines", type=int, default=None, metavar="L",
                   help="on a MatMul/Gemm reading an input no replaced node produces, split only on the "
                        "columns of the L 64-byte lines of the row carrying most of the product, so the "
                        f"encoder streams L lines of each row (0: anywhere; default {FitOptions.split_lines})")
    p.add_argument("--no-prune-columns", dest="prune_columns", action="store_false", default=None,
                   help="keep every output column of every lookup node; by default a lookup node feeding "
                        "another computes only the columns that one's trees read (same outputs, bit for bit)")
    p.add_argument("--no-fuse-pooling", dest="fuse_pooling", action="store_false", default=None,
                   help="leave each MaxPool after a LutConv a node of its own; by default the LutConv "
                        "writes the pooled output itself (same outputs, bit for bit)")
    p.add_argument("--no-finetune", dest="finetune", action="store_false", default=None,
                   help="skip ITLUMM's incremental replacement with fine-tuning (on when labels exist)")
    p.add_argument("--finetune", dest="finetune", action="store_true",
                   help="fine-tune even without labels (distillation from the original model)")
    p.add_argument("--finetune-tables", action="store_true", default=None,
                   help="finally train the tables and remaining layers end to end")
    p.add_argument("--finetune-trees", action="store_true", default=None,
                   help="in that end-to-end stage, train the trees' thresholds too (hard forward, soft-tree "
                        "straight-through gradients into every lookup's input; implies --finetune-tables)")
    p.add_argument("--train", metavar="NPZ",
                   help="training rows (the --calib format, any number, labels optional): train the compiled "
                        "network end to end on them, lookups' tables and trees included (distillation from the "
                        "original model, plus cross-entropy with labels)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help=f"epochs of that training (default {TrainOptions.DEFAULT_EPOCHS}, "
                        f"{TrainOptions.AUGMENTED_EPOCHS} with --augment)")
    p.add_argument("--augment", metavar="SPEC", default=None,
                   help="augment the --train rows of an image model, drawn anew every batch: a comma list of "
                        "rotate=DEG, scale=F (zoom 1 +- F), shift=PX, hflip, and shape=CxHxW for a flat input "
                        "(MNIST: rotate=15,scale=0.15,shift=2,shape=1x28x28)")
    p.add_argument("--eval", metavar="NPZ",
                   help="labelled held-out data: also report accuracy of both models on it")
    p.add_argument("--exclude", action="append", default=None, metavar="NODE",
                   help="keep this node exact (repeatable)")
    p.add_argument("--include", action="append", default=None, metavar="NODE",
                   help="replace only the named nodes (repeatable)")
    p.add_argument("--report", metavar="DIR",
                   help="write report.json and report.html (per-node error, accuracy per stage, "
                        "bytes, timings, with plots) into DIR")
    p.add_argument("--mask-input", metavar="NAME", default=None,
                   help="the model input whose zeros mark padding positions (a sequence model's [batch, tokens] "
                        "attention mask): those rows are not fitted on nor trained on. Default: an input named "
                        "attention_mask, if any; 'none': every position counts")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (default 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads of the compiler's own onnxruntime sessions and torch (default: every core)")
    budget = p.add_argument_group(
        "automatic budget",
        "instead of one --codebooks for every node, search per node (exact, lookups at a count\n"
        "from --candidates, or a sum-product layer at a width from --candidate-spn-widths) for the\n"
        "fastest model within a target measured on a held-out 20 % of the calibration rows; speed\n"
        "comes from timing each node in onnxruntime on this machine. --max-multiplications makes\n"
        "multiplications the budget instead of time, alone or with a target")
    target = budget.add_mutually_exclusive_group()
    target.add_argument("--max-accuracy-drop", type=float, metavar="FRACTION",
                        help="top-1 accuracy lost at most (0.01 = one point); needs labels in --calib")
    target.add_argument("--max-output-error", type=float, metavar="REL",
                        help="relative error ||Y - Y0|| / ||Y0|| of the first output against the original "
                             "model's at most REL; no labels needed")
    budget.add_argument("--max-multiplications", type=int, metavar="N",
                        help="the whole model's multiplications per inference at most N (StrassenNets' budget): "
                             "alone, the plan within it of least held-out loss; with a target, the plan within "
                             "both with the fewest multiplications")
    budget.add_argument("--candidates", type=_counts_or_none, default=(4, 8, 16, 32, 64), metavar="C,C,...",
                        help="codebook counts to try per node, those not above its input width "
                             "(default 4,8,16,32,64; 'none': no lookups)")
    budget.add_argument("--candidate-spn-widths", type=_multiples, default=(1.0,), metavar="F,F,...",
                        help="sum-product widths to try per node, as multiples of its output count M "
                             "(r = round(F M); default 1, the authors' r = M; 'none': no sum-product layers)")
    budget.add_argument("--candidate-subvectors", type=_counts, default=(), metavar="S,S,...",
                        help="inputs per codebook to try as well: a node of input width D also tries "
                             "ceil(D / S) codebooks (default none)")
    budget.add_argument("--cost-batch", type=int, default=256, metavar="N",
                        help="rows per call the nodes are timed at (default 256)")
    _add_logging_flags(p, progress=True)
    return p


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got '{text}'") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"the counts must be positive, got '{text}'")
    return counts


def _counts_or_none(text: str) -> tuple[int, ...]:
    return () if text.strip().lower() == "none" else _counts(text)


def _multiples(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not all(0 < f < float("inf") for f in values):
        raise argparse.ArgumentTypeError(f"the multiples must be positive, got '{text}'")
    return values


def build_diff_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lutcompile diff",
        description="Pair the nodes of two ONNX models by name and show what changed: op type and "
                    "domain, D x M, codebooks, partition, table loss, parameter bytes; with --calib, "
                    "each node's relative output error and both models' accuracy.",
        epilog="exit status: 0 compared (1 with --exit-code when the graphs differ), 2 bad command "
               "line, 3 bad model, 4 bad calibration data")
    p.add_argument("model_a", metavar="MODEL_A", help="the reference model (say, the original)")
    p.add_argument("model_b", metavar="MODEL_B", help="the model to compare (say, the compiled one)")
    p.add_argument("--calib", metavar="NPZ",
                   help="run both models on these rows: per-node relative error, accuracy with labels")
    p.add_argument("--json", action="store_true", help="print JSON (schema: lutcompile.diff/1)")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the graphs differ")
    p.add_argument("--batch-size", type=int, default=512, help="rows per onnxruntime run (default 512)")
    _add_logging_flags(p)
    return p


def build_inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lutcompile inspect",
        description="List a compiled model's lookup nodes (LutMatMul, LutConv) with their configuration and check "
                    "that their tables are consistent.",
        epilog="exit status: 0 consistent, 3 bad model, 6 inconsistent tables")
    p.add_argument("model", metavar="MODEL", help="a model compiled by lutcompile")
    p.add_argument("--json", action="store_true", help="print JSON (schema: lutcompile.inspect/1)")
    _add_logging_flags(p)
    return p


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if not verbose else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("lutcompile").setLevel(level)


# the errors a user's input causes, by exit status; anything else is an internal error
_INPUT_ERRORS = ((OptionsError, EXIT_USAGE), (frontend.FrontendError, EXIT_MODEL),
                 (calibrate.CalibrationError, EXIT_DATA), (OutputError, EXIT_OUTPUT))


def _fail(exc: Exception, debug: bool) -> int:
    if debug:
        raise exc
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for kind, code in _INPUT_ERRORS:
        if isinstance(exc, kind):
            print(f"lutcompile: error: {message or type(exc).__name__}", file=sys.stderr)
            return code
    print(f"lutcompile: internal error: {type(exc).__name__}{': ' + message if message else ''} "
          f"(run again with --debug for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


def _print_summary(result: api.CompileResult, eval_accuracy: tuple[float, float] | None) -> None:
    spn = any(n.spn is not None for n in result.nodes)  # then each node's size is C or r, and mults/row shown
    rows = [("node", "op", "D x M", "C/r" if spn else "C", "partition", "tables", "act", "rel.err", "columns")
            + (("mults/row",) if spn else ())]
    for n in result.nodes:
        # the output columns the written node computes (compile/prune.py): all, or kept/M
        computes = "all" if n.columns_computed in (None, n.M) else f"{n.columns_computed}/{n.M}"
        activation = (n.activation or "-") + (" + MaxPool" if n.fused_pool else "")
        size = str(n.codebooks) if n.spn is None else f"r={n.spn.width}"
        mults = "-" if n.spn is None else f"{n.spn.exact_multiplications:,} -> {n.spn.multiplications:,}"
        rows.append((n.name, n.op_type, f"{n.D} x {n.M}", size, n.partition, n.table_loss,
                     activation, f"{n.relative_error:.4f}", computes) + ((mults,) if spn else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for line in kept_exact_lines(result.skipped):
        print(line)
    if result.nodes:
        fitted = sorted({n.fitted_rows for n in result.nodes})
        per_node = f"{fitted[0]:,}" if len(fitted) == 1 else f"{fitted[0]:,} to {fitted[-1]:,}"
        print(f"relative error on the {per_node} rows each node was fitted on (from {result.calibration_rows:,} "
              f"calibration samples), after each node's activation")
    for stage, acc in result.stages:
        print(f"calibration accuracy {stage}: {acc:.2%}")
    if result.accuracy_before is not None:
        print(f"calibration accuracy: original {result.accuracy_before:.2%}, "
              f"compiled {result.accuracy_after:.2%}")
    if eval_accuracy is not None:
        print(f"held-out accuracy:    original {eval_accuracy[0]:.2%}, compiled {eval_accuracy[1]:.2%}")
    if result.budget is not None:
        print(format_budget(result.budget))
    total = sum(result.seconds.values())
    print(f"compiled {len(result.nodes)} node(s) in {total:.1f} s")


def kept_exact_lines(skipped: list[frontend.SkippedNode], most: int = 3) -> list[str]:
    """One line per node kept exact; nodes sharing a reason are summarised past `most` of them."""
    by_reason: dict[str, list[frontend.SkippedNode]] = {}
    for s in skipped:
        by_reason.setdefault(s.reason, []).append(s)
    lines = []
    for reason, nodes in by_reason.items():
        if len(nodes) <= most:
            lines += [f"kept exact: {s.name} ({s.op_type}): {s.reason}" for s in nodes]
        else:
            names = ", ".join(s.name for s in nodes[:most])
            lines.append(f"kept exact: {len(nodes)} nodes: {reason} ({names}, ...; all in report.json or with -v)")
            for s in nodes:
                log.info("kept exact: %s (%s): %s", s.name, s.op_type, s.reason)
    return lines


def parse_methods(values: list[str] | None) -> str | dict[str, str] | None:
    """--method's occurrences: one bare METHOD (every node), or NODE=METHOD pairs (those nodes;
    the others lut), as compile_model's `method` takes them."""
    if not values:
        return None
    bare = [v for v in values if "=" not in v]
    pairs = dict(v.rsplit("=", 1) for v in values if "=" in v)
    if len(bare) > 1 or (bare and pairs):
        raise OptionsError("give --method METHOD once for every node, or --method NODE=METHOD for each node, not both")
    return bare[0] if bare else pairs


def main_compile(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.report and os.path.exists(args.report) and not os.path.isdir(args.report):
            raise OutputError(f"--report {args.report} exists and is not a directory")
        for flag, value in (("--epochs", args.epochs), ("--augment", args.augment)):
            if value is not None and not args.train:
                raise OptionsError(f"{flag} sets the training of --train; give --train TRAIN.npz")
        result = api.compile_model(args.model, args.output, args.calib, train=args.train, epochs=args.epochs,
                                   augment=args.augment,
                                   codebooks=args.codebooks, subvector=args.subvector,
                                   partition=args.partition, table_loss=args.table_loss,
                                   split_bins=args.split_bins, split_lines=args.split_lines,
                                   spn_activations=args.spn_activations,
                                   method=parse_methods(args.method), spn_width=args.spn_width,
                                   portable=args.portable,
                                   finetune=args.finetune, finetune_tables=args.finetune_tables,
                                   finetune_trees=args.finetune_trees,
                                   nodes_to_include=args.include, nodes_to_exclude=args.exclude,
                                   seed=args.seed, threads=args.threads, report_dir=args.report,
                                   mask_input=None if args.mask_input is None else
                                   False if args.mask_input.lower() == "none" else args.mask_input,
                                   prune_columns=args.prune_columns, fuse_pooling=args.fuse_pooling,
                                   progress=False if args.quiet else None,
                                   max_accuracy_drop=args.max_accuracy_drop,
                                   max_output_error=args.max_output_error,
                                   max_multiplications=args.max_multiplications,
                                   budget_options=BudgetOptions(candidates=args.candidates,
                                                                spn_widths=args.candidate_spn_widths,
                                                                subvectors=args.candidate_subvectors,
                                                                cost_batch=args.cost_batch))
        if not world().writes:  # under torchrun, rank 0 alone reports
            return 0
        for stage, seconds in result.seconds.items():
            log.info("stage %s: %.2f s", stage, seconds)
        eval_accuracy = None
        if args.eval:
            held_out = calibrate.load_calibration(args.eval, result.model)
            if held_out.labels is None:
                raise calibrate.CalibrationError(f"{args.eval} has no 'labels' array")
            eval_accuracy = (api.evaluate_accuracy(args.model, held_out),
                             api.evaluate_accuracy(result.model, held_out))
        _print_summary(result, eval_accuracy)
        print(f"wrote {args.output}")
        if args.report:
            print(f"wrote {os.path.join(args.report, 'report.html')} and report.json")
        return 0
    except Exception as exc:
        return _fail(exc, args.debug)


def main_diff(argv: list[str]) -> int:
    from .diff import diff_models, format_diff
    args = build_diff_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.batch_size < 1:
            raise OptionsError("--batch-size must be at least 1")
        result = diff_models(args.model_a, args.model_b, args.calib, batch_size=args.batch_size)
        if args.json:
            print(json.dumps(result.to_json(), indent=2, allow_nan=False))
        else:
            print(format_diff(result))
        return EXIT_DIFFERENT if args.exit_code and not result.identical else 0
    except Exception as exc:
        return _fail(exc, args.debug)


def main_inspect(argv: list[str]) -> int:
    from .inspection import format_inspection, inspect_model
    args = build_inspect_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        result = inspect_model(args.model)
        if args.json:
            print(json.dumps(result.to_json(), indent=2, allow_nan=False))
        else:
            print(format_inspection(result))
        if not result.consistent:
            for problem in result.problems:
                print(f"lutcompile: error: {args.model}: {problem}", file=sys.stderr)
            return EXIT_INCONSISTENT
        return 0
    except Exception as exc:
        return _fail(exc, args.debug)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS and not os.path.exists(argv[0]):
            return {"diff": main_diff, "inspect": main_inspect}[argv[0]](argv[1:])
        return main_compile(argv)
    except KeyboardInterrupt:
        if "--debug" in argv:
            raise
        print("lutcompile: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
