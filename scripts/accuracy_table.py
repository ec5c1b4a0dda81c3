"""Held-out accuracy of the shipped MNIST MLP, exact against compiled, at several codebook counts.

    python scripts/accuracy_table.py [--codebooks 4 8 16 32]

Every Gemm is replaced with the compiler's default options, fitted on models/mnist_calib.npz
(2,000 training rows with labels); accuracy is measured in onnxruntime on the 2,000 held-out
rows of models/mnist_test.npz. Writes docs/results/accuracy_table.md and the README section.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import lutcompile
from lutcompile.compile.fit import FitOptions
from lutcompile.compile.calibrate import load_calibration
from lutcompile.compile.frontend import load_model

from readme_tables import update_readme

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codebooks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--model", default=str(ROOT / "models/mnist_mlp.onnx"))
    p.add_argument("--calib", default=str(ROOT / "models/mnist_calib.npz"))
    p.add_argument("--test", default=str(ROOT / "models/mnist_test.npz"))
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()

    model = load_model(args.model)
    test = load_calibration(args.test, model)
    exact = lutcompile.evaluate_accuracy(model, test)
    rows = ["| codebooks C | exact | compiled | drop (points) | compile time |", "|---|---|---|---|---|"]
    for C in args.codebooks:
        start = time.perf_counter()
        result = lutcompile.compile_model(model, None, args.calib, codebooks=C, progress=False)
        seconds = time.perf_counter() - start
        acc = lutcompile.evaluate_accuracy(result.model, test)
        rows.append(f"| {C} | {exact:.2%} | {acc:.2%} | {100 * (exact - acc):.2f} | {seconds:.1f} s |")
        print(rows[-1], flush=True)
    defaults = FitOptions()
    text = "\n".join(rows) + (
        f"\n\nHeld-out: {len(test.labels)} rows of models/mnist_test.npz; fitted on "
        f"models/mnist_calib.npz; options: partition={defaults.partition}, "
        f"table_loss={defaults.table_loss}, fine-tune pass on (labels present). "
        f"Command: `python scripts/accuracy_table.py`.\n")
    out = ROOT / "docs/results/accuracy_table.md"
    out.write_text("# Held-out accuracy, exact against compiled\n\n" + text)
    if not args.no_readme:
        update_readme("accuracy_table", text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
