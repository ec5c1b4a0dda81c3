"""The trees' split search, exact against histogram (FitOptions.split_bins): fit time and accuracy.

    python scripts/split_search.py [--bins 256]

Compiles each model twice with the default options but without any fine-tuning or training, so
that only the fitter differs: once with the exact search (split_bins = 0, a sort per tree node
and candidate dimension), once with `--bins` equal-count quantile bins per dimension. Reports
the fit stage's seconds, the nodes' relative errors, and the model's held-out quality:

* the MNIST MLP at C = 32 and 64, fitted on models/mnist_train.npz (8,000 rows), accuracy on
  models/mnist_test.npz;
* the Fashion-MNIST CNN at C = 16, fitted on models/fashion_calib.npz (20,000 sampled patch rows
  per conv), accuracy on the official 10,000 test images;
* all-MiniLM-L6-v2 (scripts/minilm.py) at C = 16, contiguous partition, fitted on 128 sentences
  (3,703 real-token rows), mean embedding cosine to fp32 on 256 held-out sentences. For its node
  with the largest difference, the relative error is also given with the tables unquantised,
  which separates the trees' share from the 8-bit tables'.

Writes build/split_search/results.json and the README section `split_search`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import lutcompile  # noqa: E402
from lutcompile.compile import fit  # noqa: E402
from lutcompile.compile.calibrate import load_calibration  # noqa: E402
from lutcompile.compile.fit import FitOptions  # noqa: E402
from lutcompile.compile.frontend import load_model  # noqa: E402
from lutcompile.ops.spec import encode_reference  # noqa: E402
from bench_transformer import BUILD as MINILM, embeddings, prepare  # noqa: E402
from pareto import machine  # noqa: E402
from readme_tables import publish  # noqa: E402

CASES = [  # (label, model, calibration, held-out, codebooks, partition)
    ("MNIST MLP, C = 32", "models/mnist_mlp.onnx", "models/mnist_train.npz", "models/mnist_test.npz", 32, None),
    ("MNIST MLP, C = 64", "models/mnist_mlp.onnx", "models/mnist_train.npz", "models/mnist_test.npz", 64, None),
    ("Fashion CNN, C = 16", "models/fashion_cnn.onnx", "models/fashion_calib.npz", "models/fashion_test.npz",
     16, None),
    ("MiniLM, C = 16", str(MINILM / "minilm.onnx"), str(MINILM / "calib.npz"), str(MINILM / "eval.npz"), 16,
     "contiguous"),
]


def quality(model, held_out: str, source: str) -> float:
    """Held-out accuracy for a classifier; for MiniLM, the mean embedding cosine to the original."""
    if "minilm" not in held_out:
        return lutcompile.evaluate_accuracy(model, load_calibration(ROOT / held_out, load_model(ROOT / source)))
    feeds = dict(np.load(held_out))
    return float((embeddings(model, feeds) * embeddings(source, feeds)).sum(axis=1).mean())


def unquantised_error(source: str, calib: str, node: int, codebooks: int, options: FitOptions) -> float:
    """Relative error of one node's fit with its float tables (before the 8-bit quantisation),
    on the rows the compile fitted it on (`options` carrying the table loss it used)."""
    from lutcompile.compile import calibrate, frontend
    model = frontend.load_model(source)
    target = frontend.analyse(model).targets[node]
    rows = calibrate.target_rows(model, calibrate.load_calibration(calib, model), [target],
                                 calibrate.CalibrateOptions())[target.name]
    caught = {}
    keep = fit.quantise_tables
    fit.quantise_tables = lambda T: (caught.setdefault("T", T), keep(T))[1]
    try:
        params = fit.fit_node(rows, target.weight, target.bias, target.activation, codebooks, options).params
    finally:
        fit.quantise_tables = keep
    codes = encode_reference(rows, params.split_dims, params.thresholds)
    T = caught["T"]
    approx = sum(T[c][codes[:, c]] for c in range(T.shape[0])) + params.bias
    exact = rows.astype(np.float64) @ target.weight + (0 if target.bias is None else target.bias)
    return fit.relative_error(fit.activate(approx, target.activation), fit.activate(exact, target.activation))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bins", type=int, default=256)
    args = ap.parse_args()
    started = time.perf_counter()
    prepare(MINILM)
    results, lines = {}, [f"| model | rows per node | fit, exact | fit, {args.bins} bins | node error, exact "
                          f"(mean / max) | node error, {args.bins} bins | held-out, exact | held-out, {args.bins} bins |",
                          "|---|---|---|---|---|---|---|---|"]
    for label, source, calib, held_out, codebooks, partition in CASES:
        runs = {}
        for bins in (0, args.bins):
            options = FitOptions(split_bins=bins, **({"partition": partition} if partition else {}))
            result = lutcompile.compile_model(str(ROOT / source), None, str(ROOT / calib), codebooks=codebooks,
                                              fit_options=options, finetune=False, progress=False)
            runs[bins] = {"fit_seconds": result.seconds["fit"], "quality": quality(result.model, held_out, source),
                          "errors": [n.relative_error for n in result.nodes],
                          "rows": [n.fitted_rows for n in result.nodes], "losses": [n.table_loss for n in result.nodes]}
            print(label, bins, f"{runs[bins]['fit_seconds']:.0f} s", f"{runs[bins]['quality']:.4f}", flush=True)
        exact, binned = np.array(runs[0]["errors"]), np.array(runs[args.bins]["errors"])
        worst = int(np.argmax(binned - exact))
        runs["largest_difference"] = {
            "node": worst, "exact": float(exact[worst]), "binned": float(binned[worst]),
            "unquantised": {str(b): unquantised_error(str(ROOT / source), str(ROOT / calib), worst, codebooks,
                                                      FitOptions(split_bins=b, table_loss=runs[0]["losses"][worst],
                                                                 **({"partition": partition} if partition else {})))
                            for b in (0, args.bins)}}
        results[label] = runs
        metric = "cosine" if "MiniLM" in label else "accuracy"
        fmt = (lambda v: f"{v:.3f}") if metric == "cosine" else (lambda v: f"{v:.2%}")
        rows = sorted(set(runs[0]["rows"]))
        cells = [label, f"{rows[0]:,}" + (f"-{rows[-1]:,}" if len(rows) > 1 else ""), f"{runs[0]['fit_seconds']:.0f} s", f"{runs[args.bins]['fit_seconds']:.0f} s",
                 f"{exact.mean():.3f} / {exact.max():.3f}", f"{binned.mean():.3f} / {binned.max():.3f}",
                 f"{fmt(runs[0]['quality'])} ({metric})", fmt(runs[args.bins]["quality"])]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for label, runs in results.items():
        d = runs["largest_difference"]
        u = d["unquantised"]
        notes.append(f"- {label}: the node that differs most is node {d['node']}, {d['exact']:.3f} exact against "
                     f"{d['binned']:.3f} with {args.bins} bins; with its tables left in float, "
                     f"{u['0']:.3f} against {u[str(args.bins)]:.3f}.")
    footer = (f"No fine-tuning or training, so the fitter alone differs. Machine: {machine()}. "
              f"Produced by `python scripts/split_search.py` in {time.perf_counter() - started:.0f} s.")
    publish("split_search", ROOT / "build" / "split_search", results,
            ["\n".join(lines), "\n".join(notes)], footer, readme=args.bins == 256)


if __name__ == "__main__":
    main()
