"""The shipped Fashion-MNIST CNN, exact against compiled: accuracy and onnxruntime latency.

    python scripts/cnn_table.py [--codebooks 16]

Compiles models/fashion_cnn.onnx with the default options on models/fashion_calib.npz
(2,000 training rows with labels), measures held-out accuracy on the official 10,000-image
test set (models/fashion_test.npz), and times both models in onnxruntime, one thread, batch 1
and 256 (interleaved medians); then profiles both at batch 256 node by node (onnxruntime's
profiler, nodes it inserts included). Writes docs/results/cnn_table.md and the README section.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lutcompile
from lutcompile.compile.calibrate import load_calibration
from lutcompile.compile.frontend import load_model
from lutcompile.onnx_io.timing import model_latencies, node_times

from readme_tables import update_readme

ROOT = Path(__file__).resolve().parent.parent


def profile_table(models: dict, feeds: dict) -> str:
    """Per-node medians (µs) of each model, in the execution order of the last model, then the
    nodes only the others run; onnxruntime fuses an activation into its Conv or Gemm and may
    insert layout reorders (ReorderInput / ReorderOutput) around nodes, so the rows are its
    nodes, not ours."""
    times = {}  # model -> {row: (seconds, what ran)}
    for name, m in models.items():  # the reorders' names differ between sessions: one row for all
        measured = node_times(m, feeds)
        reorders = [t for t in measured if t.op_type.startswith("Reorder")]
        times[name] = {t.name: (t.seconds, t.op_type) for t in measured if t not in reorders}
        times[name]["layout reorders inserted by onnxruntime"] = (
            sum(t.seconds for t in reorders), f"{len(reorders)} node" + "s" * (len(reorders) != 1))
    order = list(dict.fromkeys(n for per in reversed(times.values()) for n in per))
    rows = ["| node (as onnxruntime runs it) | " + " | ".join(f"{n}: µs (op)" for n in models) + " |",
            "|---|" + "---:|" * len(models)]
    for node in order:
        cells = [f"{1e6 * per[node][0]:,.0f} ({per[node][1]})" if node in per else "-" for per in times.values()]
        rows.append(f"| {node} | " + " | ".join(cells) + " |")
    totals = [f"**{1e6 * sum(seconds for seconds, _ in per.values()):,.0f}**" for per in times.values()]
    rows.append("| **sum of nodes** | " + " | ".join(totals) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codebooks", type=int, default=16)
    args = p.parse_args()
    model = load_model(ROOT / "models/fashion_cnn.onnx")
    test = load_calibration(ROOT / "models/fashion_test.npz", model)
    start = time.perf_counter()
    result = lutcompile.compile_model(model, None, ROOT / "models/fashion_calib.npz", codebooks=args.codebooks,
                                      progress=False)
    seconds = time.perf_counter() - start
    exact, compiled = (100 * lutcompile.evaluate_accuracy(m, test) for m in (model, result.model))
    rows = ["| model | held-out accuracy | latency b=1 | latency b=256 |", "|---|---|---|---|"]
    lat = {b: model_latencies({"exact": model, "lut": result.model}, {"input": test.inputs["input"][:b]})
           for b in (1, 256)}
    for name, acc, key in (("exact (fp32, onnxruntime)", exact, "exact"),
                           (f"lutcompile, C={args.codebooks}", compiled, "lut")):
        rows.append(f"| {name} | {acc:.2f} % | {1e6 * lat[1][key]:.0f} µs | {1e6 * lat[256][key]:.0f} µs |")
    replaced = ", ".join(f"{n.name} ({n.op_type} {n.D}x{n.M})" for n in result.nodes)
    kept = "; ".join(f"{s.name}: {s.reason}" for s in result.skipped) or "none"
    text = "\n".join(rows) + (
        f"\n\nSpeed-up at batch 256: {lat[256]['exact'] / lat[256]['lut']:.2f}×, at batch 1: "
        f"{lat[1]['exact'] / lat[1]['lut']:.2f}× (one thread, interleaved medians). Replaced: {replaced}. "
        f"Kept exact: {kept}. Compile time {seconds:.0f} s (default options, fine-tune pass on). "
        f"Command: `python scripts/cnn_table.py`.\n")
    profile = profile_table({"exact": model, f"C={args.codebooks}": result.model},
                            {"input": test.inputs["input"][:256]})
    text += (f"\nWhere the time goes at batch 256, one thread (onnxruntime's profiler, median of 20 runs per "
             f"node; the sum leaves out the session's own overhead; onnxruntime names a Conv fused with its "
             f"Relu after the Relu's output, so /4/Relu_output_0_nchwc is /3/Conv and /7/Relu_output_0_nchwc "
             f"is /6/Conv):\n\n{profile}\n")
    (ROOT / "docs/results/cnn_table.md").write_text("# Fashion-MNIST CNN, exact against compiled\n\n" + text)
    update_readme("cnn_table", text)
    print(text)


if __name__ == "__main__":
    main()
