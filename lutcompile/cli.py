"""Command line: a thin layer over `lutcompile.api.compile_model`.

    lutcompile MODEL --calib NPZ -o OUT [--codebooks C] [--eval NPZ]

Exit status: 0 success; 1 unexpected internal error; 2 bad command line; 3 bad input model;
4 bad calibration or evaluation data; 5 bad output path.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import api, calibrate, frontend
from .export import OutputError
from .fit import TABLE_LOSSES
from .partition import PARTITIONS

EXIT_INTERNAL, EXIT_USAGE, EXIT_MODEL, EXIT_DATA, EXIT_OUTPUT = 1, 2, 3, 4, 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lutcompile",
        description="Replace an ONNX model's matrix products with table lookups (LutMatMul).")
    p.add_argument("model", help="input ONNX model")
    p.add_argument("--calib", required=True,
                   help=".npz with one array per model input (by name) and optional integer 'labels'")
    p.add_argument("-o", "--output", required=True, help="output ONNX model")
    p.add_argument("--codebooks", "-C", type=int, default=16,
                   help="codebooks per node, each a 4-bit code (default 16; capped at the node's input width)")
    p.add_argument("--partition", default="opq", choices=PARTITIONS,
                   help="how input dimensions are split among codebooks (r2: ITLUMM's correlation "
                        "clustering; opq: OPQ rotation projected to a permutation)")
    p.add_argument("--table-loss", default="kl", choices=TABLE_LOSSES,
                   help="ridge tables (MADDNESS), or optimised for the MSE after each node's activation, "
                        "with KL between softmaxes on the logits node (kl)")
    p.add_argument("--no-finetune", dest="finetune", action="store_false", default=None,
                   help="skip ITLUMM's incremental replacement with fine-tuning (on when labels exist)")
    p.add_argument("--finetune", dest="finetune", action="store_true",
                   help="fine-tune even without labels (distillation from the original model)")
    p.add_argument("--finetune-tables", action="store_true",
                   help="finally train the tables and remaining layers end to end")
    p.add_argument("--eval", metavar="NPZ",
                   help="labelled held-out data: also report accuracy of both models on it")
    p.add_argument("--exclude", action="append", default=None, metavar="NODE",
                   help="keep this node exact (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("--verbose", "-v", action="store_true", help="log each stage")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _print_summary(result: api.CompileResult, eval_accuracy: tuple[float, float] | None) -> None:
    rows = [("node", "op", "D x M", "C", "partition", "tables", "act", "rel.err")]
    for n in result.nodes:
        rows.append((n.name, n.op_type, f"{n.D} x {n.M}", str(n.codebooks), n.partition, n.table_loss,
                     n.activation or "-", f"{n.relative_error:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for s in result.skipped:
        print(f"kept exact: {s.name} ({s.op_type}): {s.reason}")
    print(f"relative error on {result.calibration_rows} calibration rows, after each node's activation")
    for stage, acc in result.stages:
        print(f"calibration accuracy {stage}: {acc:.2%}")
    if result.accuracy_before is not None:
        print(f"calibration accuracy: original {result.accuracy_before:.2%}, "
              f"compiled {result.accuracy_after:.2%}")
    if eval_accuracy is not None:
        print(f"held-out accuracy:    original {eval_accuracy[0]:.2%}, compiled {eval_accuracy[1]:.2%}")
    total = sum(result.seconds.values())
    print(f"compiled {len(result.nodes)} node(s) in {total:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = api.compile_model(args.model, args.output, args.calib, codebooks=args.codebooks,
                                   partition=args.partition, table_loss=args.table_loss,
                                   finetune=args.finetune, finetune_tables=args.finetune_tables,
                                   nodes_to_exclude=args.exclude,
                                   seed=args.seed, progress=False if args.quiet else None)
        eval_accuracy = None
        if args.eval:
            held_out = calibrate.load_calibration(args.eval, result.model)
            if held_out.labels is None:
                raise calibrate.CalibrationError(f"{args.eval} has no 'labels' array")
            eval_accuracy = (api.evaluate_accuracy(args.model, held_out),
                             api.evaluate_accuracy(result.model, held_out))
        _print_summary(result, eval_accuracy)
        print(f"wrote {args.output}")
        return 0
    except Exception as exc:
        if args.debug:
            raise
        code = EXIT_INTERNAL
        if isinstance(exc, frontend.FrontendError):
            code = EXIT_MODEL
        elif isinstance(exc, calibrate.CalibrationError):
            code = EXIT_DATA
        elif isinstance(exc, OutputError):
            code = EXIT_OUTPUT
        elif isinstance(exc, ValueError):
            code = EXIT_USAGE
        print(f"lutcompile: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
