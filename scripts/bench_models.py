"""Whole shipped models in onnxruntime (issue 15, item 6): fp32, int8 static and dynamic, and
lookups at several widths, with and without the column-pruning pass, at batch 1 and 256 on one
and two threads.

    python scripts/bench_models.py [--repetitions N] [--only mlp|cnn]

Speed only: the lookups are compiled from the shipped calibration rows without fine-tuning
(ridge tables), since the time of a lookup node depends on its shape (D, M, C), not on its
values; accuracy after training is scripts/train_table.py's. Each width is timed as the
compiler writes it (both graph passes), "unpruned" without either, and "unfused" (where a
LutConv is followed by a MaxPool) with compile/prune.py's pass but not compile/fuse.py's: every
pass leaves the outputs the same bit for bit, so the rows show what each saves. Every latency is a median of interleaved runs in this one
process, all variants of a model, batch and thread count timed together, so every ratio is
taken in one run. The table goes into README.md between <!-- bench_models:start --> and
<!-- bench_models:end -->, and every figure into build/bench_models/results.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import lutcompile  # noqa: E402
from lutcompile.compile.calibrate import load_calibration  # noqa: E402
from lutcompile.compile.fuse import fuse_max_pools  # noqa: E402
from lutcompile.compile.prune import prune_unread_columns  # noqa: E402
from lutcompile.onnx_io.timing import model_latencies  # noqa: E402
from datasets import write_fashion_train  # noqa: E402
from pareto import build_int8, machine  # noqa: E402
from readme_tables import publish  # noqa: E402

BUILD = ROOT / "build" / "bench_models"
SPECS = {
    "mlp": dict(title="MNIST MLP 784-200-200-200-10", model="models/mnist_mlp.onnx", calib="models/mnist_calib.npz",
                widths=[("C = 32", 32), ("C = 64", 64)]),
    # 144 codebooks need 2,304 rows: the CNN's lookups are fitted on the first 5,000 of Fashion-MNIST's
    # official training rows (scripts/datasets.py, from Debian's dataset-fashion-mnist)
    "cnn": dict(title="Fashion-MNIST CNN", model="models/fashion_cnn.onnx", calib="models/fashion_calib.npz",
                fit_rows=5000,
                widths=[("C = 16", 16), ("C = 16, 32, 144, 32", {"/3/Conv": 16, "/6/Conv": 32, "/10/Gemm": 144,
                                                                   "/12/Gemm": 32})]),
}
BATCHES = (1, 256)
THREADS = (1, 2)


def build(key: str, spec: dict) -> dict[str, str]:
    """{variant label: model path}: fp32, int8 static and dynamic, and each width unpruned and pruned."""
    folder = BUILD / key
    folder.mkdir(parents=True, exist_ok=True)
    build_int8(spec, folder)
    paths = {"fp32": str(ROOT / spec["model"]), "int8 static": str(folder / "int8_static.onnx"),
             "int8 dynamic": str(folder / "int8_dynamic.onnx")}
    fit_data = ROOT / spec["calib"]
    if spec.get("fit_rows"):
        with np.load(write_fashion_train(BUILD / "fashion_train.npz")) as train:
            fit_data = {name: train[name][:spec["fit_rows"]] for name in train.files}
    for i, (label, codebooks) in enumerate(spec["widths"]):
        print(f"\n{spec['title']}: compiling {label}", flush=True)
        result = lutcompile.compile_model(ROOT / spec["model"], None, fit_data, codebooks=codebooks,
                                          finetune=False, table_loss="ridge", prune_columns=False,
                                          fuse_pooling=False, progress=True)
        unpruned = folder / f"lut_{i}.onnx"
        onnx.save(result.model, str(unpruned))
        pruned, narrowed = prune_unread_columns(result.model)
        fused, pools = fuse_max_pools(pruned)
        paths[f"{label}, unpruned"] = str(unpruned)
        if pools:  # the pruned model without the fusion pass, to show what each pass saves
            onnx.save(pruned, str(folder / f"lut_{i}_pruned.onnx"))
            paths[f"{label}, unfused"] = str(folder / f"lut_{i}_pruned.onnx")
        onnx.save(fused, str(folder / f"lut_{i}_fused.onnx"))
        paths[f"{label}"] = str(folder / f"lut_{i}_fused.onnx")
        for p in narrowed:
            print(f"  {p.producer} computes {p.columns_after} of {p.columns_before} columns "
                  f"({p.scan_saved:.0%} of its scan saved), the ones {p.consumer} reads")
        for p in pools:
            print(f"  {p.conv} writes the output of {p.pool} (max-pool {p.window})")
    return paths


def measure(paths: dict[str, str], spec: dict, repetitions: int) -> dict[str, dict[str, float]]:
    model = onnx.load(paths["fp32"])
    inputs = load_calibration(ROOT / spec["calib"], model).inputs
    rows: dict[str, dict[str, float]] = {label: {} for label in paths}
    for threads in THREADS:
        for batch in BATCHES:
            feeds = {name: np.ascontiguousarray(v[:batch]) for name, v in inputs.items()}
            for label, seconds in model_latencies(paths, feeds, threads=threads, repetitions=repetitions).items():
                rows[label][f"b{batch}_t{threads}"] = seconds
    return rows


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds >= 1e-4 else f"{seconds * 1e6:.1f} µs"


def table(spec: dict, rows: dict) -> str:
    fp32, int8 = rows["fp32"], rows["int8 static"]
    lines = [f"**{spec['title']}**", "",
             "| model | batch 1 | vs fp32 / int8 | batch 256 | vs fp32 / int8 | batch 1, 2 threads "
             "| batch 256, 2 threads | 2 threads / 1 at 256 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        cells = [label]
        for b in BATCHES:
            key = f"b{b}_t1"
            cells += [us(r[key]), f"{fp32[key] / r[key]:.2f}× / {int8[key] / r[key]:.2f}×"]
        cells += [us(r["b1_t2"]), us(r["b256_t2"]), f"{r['b256_t1'] / r['b256_t2']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# issue 15's whole-model targets, one thread: (model, row, batch, baseline, at least this speed-up)
TARGETS = [("mlp", "C = 32", 256, "fp32", 12.0), ("mlp", "C = 32", 256, "int8 static", 4.0),
           ("mlp", "C = 32", 1, "int8 static", 1.5), ("mlp", "C = 64", 256, "int8 static", 2.0),
           ("mlp", "C = 64", 1, "int8 static", 1.0), ("cnn", "C = 16", 256, "fp32", 2.5),
           ("cnn", "C = 16", 256, "int8 static", 1.0), ("cnn", "C = 16", 1, "int8 static", 1.0)]


def target_lines(results: dict) -> list[str]:
    """Each target of this run's models, met or MISSED, with the ratio measured."""
    out = []
    for key, label, batch, baseline, wanted in TARGETS:
        rows = results.get(key)
        if rows is None:
            continue
        ratio = rows[baseline][f"b{batch}_t1"] / rows[label][f"b{batch}_t1"]
        met = ratio > 1.0 if wanted == 1.0 else ratio >= wanted
        goal = f"faster than {baseline}" if wanted == 1.0 else f">= {wanted:g}x"
        out.append(f"- {'met' if met else 'MISSED'}: {SPECS[key]['title']}, {label}, batch {batch}, one thread: "
                   f"{ratio:.2f}x {baseline} (target {goal})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=tuple(SPECS), default=None)
    ap.add_argument("--repetitions", type=int, default=30)
    args = ap.parse_args()
    started = time.perf_counter()
    results, parts = {}, []
    for key, spec in SPECS.items():
        if args.only not in (None, key):
            continue
        results[key] = measure(build(key, spec), spec, args.repetitions)
        parts.append(table(spec, results[key]))
    parts.append("Targets (issue 15):\n\n" + "\n".join(target_lines(results)))
    publish("bench_models", BUILD, results, parts,
            f"Machine: {machine()}; latencies are medians of interleaved runs in one process. "
            f"Produced by `python scripts/bench_models.py` in {time.perf_counter() - started:.0f} s.", args.only is None)


if __name__ == "__main__":
    main()
