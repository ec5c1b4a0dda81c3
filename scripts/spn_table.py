"""StrassenNets' ternary sum-product layers on the shipped MNIST MLP (issue 16): accuracy before
and after the train stage, multiplications per inference, model file size, and whole-model
latency in onnxruntime against fp32, int8 static and lookups at about the same accuracy.

    python scripts/spn_table.py [--widths 1,2] [--repetitions N]

Each configuration is compiled and trained by the public API exactly as scripts/train_table.py
does (`compile_model(..., train=..., method="spn", spn_width=...)`, the same rows, the same
augmentation, one thread), measured on the same 2,000 held-out rows. --widths gives r as
multiples of each node's M (1: the authors' r = M). Latencies are medians of interleaved runs in
this one process, one thread, batch 256 and batch 1; every ratio is taken in this run.

The table goes into README.md between <!-- spn_table:start --> and <!-- spn_table:end -->, and
every figure into build/spn_table/results.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from lutcompile.compile import frontend  # noqa: E402
from lutcompile.ops import spn  # noqa: E402
from lutcompile.ops.node_format import is_lookup  # noqa: E402
from pareto import machine  # noqa: E402
from readme_tables import publish  # noqa: E402
from train_table import MLP, measure, us  # noqa: E402

BUILD = ROOT / "build" / "spn_table"
EXACT_ACCURACY = 0.986  # issue 16's reference: within a point of the exact model
LOOKUPS = ("lookups C = 64", {"codebooks": 64})  # train_table's floor configuration, 97.70 %


def multiplications(model: onnx.ModelProto) -> int:
    """Multiplications per inference: D x M per product (int8 QDQ too: its weight is a
    DequantizeLinear of a constant, the product as many int8 multiply-adds), r per SpnMatMul,
    M per lookup node (its table scale)."""
    init = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}

    def constant_dims(name: str):
        if name in init:
            return init[name].dims
        node = producer.get(name)
        return constant_dims(node.input[0]) if node is not None and node.op_type == "DequantizeLinear" else None
    total = 0
    for n in model.graph.node:
        if spn.is_spn(n):
            total += spn.params_from_node(n)[0].width
        elif is_lookup(n):
            total += next(a.i for a in n.attribute if a.name == "M")
        elif n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and constant_dims(n.input[1]) is not None:
            D, M = constant_dims(n.input[1])
            total += D * M
    return total


def table(rows: dict, extra: dict) -> str:
    fp32, int8, lut = rows["fp32"], rows["int8 static"], rows[LOOKUPS[0]]
    lines = [f"**MNIST MLP 784-200-200-200-10, every layer replaced, 2,000 held-out rows** (exact "
             f"{100 * fp32['accuracy']:.2f} %, int8 static {100 * int8['accuracy']:.2f} %; trained on rows augmented "
             f"by `--augment {MLP['augment']}`)", "",
             "| model | held-out before training | after | multiplications per row | model file | batch 256 "
             "| vs fp32 / int8 / lookups | batch 1 | vs fp32 / int8 / lookups | train time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        e = extra[label]
        trained = "accuracy_before" in r
        cells = [label, f"{100 * r['accuracy_before']:.2f} %" if trained else "-", f"{100 * r['accuracy']:.2f} %",
                 f"{e['multiplications']:,}" + (f" ({100 * (1 - e['multiplications'] / e['exact_multiplications']):.2f} % "
                                                "fewer)" if e["multiplications"] < e["exact_multiplications"] else ""),
                 f"{e['file_bytes'] / 1024:,.0f} KiB" + (f" ({e['fp32_bytes'] / e['file_bytes']:.1f}× smaller)"
                                                         if label != "fp32" else "")]
        for b in (256, 1):
            cells += [us(r[f"batch_{b}"]), " / ".join(f"{ref[f'batch_{b}'] / r[f'batch_{b}']:.2f}×"
                                                     for ref in (fp32, int8, lut))]
        cells.append(f"{r['train_seconds']:.0f} s ({r['epochs']} epochs, kept {r['best_epoch']})" if trained else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: dict, extra: dict, labels: list[str]) -> str:
    """Issue 16's MLP targets for each SPN configuration, met or MISSED."""
    out = ["Targets (issue 16):", ""]
    for label in labels:
        r, e = rows[label], extra[label]
        fewer = 1 - e["multiplications"] / e["exact_multiplications"]
        smaller = e["fp32_bytes"] / e["file_bytes"]
        for ok, text in ((r["accuracy"] >= EXACT_ACCURACY - 0.01,
                          f"held-out {100 * r['accuracy']:.2f} % (target within 1 point of 98.60 %)"),
                         (fewer >= 0.99, f"{100 * fewer:.2f} % fewer multiplications (target >= 99 %)"),
                         (smaller >= 8, f"model file {smaller:.1f}x smaller than fp32 (target >= 8x)")):
            out.append(f"- {'met' if ok else 'MISSED'}: {label}: {text}")
    out.append("- MISSED: Fashion-MNIST CNN with every Conv and Gemm SPN: no SpnConv op yet")
    return "\n".join(out)


def spn_widths(factor: int) -> dict:
    """compile_model keyword arguments for SPN layers of width factor * M (r = M: the default)."""
    if factor == 1:
        return {"method": "spn"}
    targets = frontend.analyse(onnx.load(ROOT / MLP["model"])).targets
    return {"method": "spn", "spn_width": {t.name: factor * t.M for t in targets}}


WIDTHS = (1, 2)  # r as multiples of each node's M


def configs(factors) -> list[tuple[str, dict]]:
    """(label, compile_model keywords) of each SPN width; pareto.py draws the same ones."""
    return [(f"SPN r = {'' if k == 1 else k}M", spn_widths(k)) for k in factors]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), metavar="K,K,...",
                    help=f"SPN widths r as multiples of each node's M (default {','.join(map(str, WIDTHS))})")
    ap.add_argument("--repetitions", type=int, default=30)
    args = ap.parse_args()
    started = time.perf_counter()
    factors = [int(k) for k in args.widths.split(",")]
    runs = configs(factors) + [LOOKUPS]
    rows = measure(dict(MLP, build=BUILD), runs, args.repetitions)
    folder = BUILD / Path(MLP["model"]).stem
    paths = {"fp32": ROOT / MLP["model"], "int8 static": folder / "int8_static.onnx"}
    paths.update({label: folder / f"lut_{i}.onnx" for i, (label, _) in enumerate(runs)})
    extra = {}
    for label, path in paths.items():
        extra[label] = {"multiplications": multiplications(onnx.load(path)),
                        "exact_multiplications": multiplications(onnx.load(paths["fp32"])),
                        "file_bytes": os.path.getsize(path), "fp32_bytes": os.path.getsize(paths["fp32"])}
    parts = [table(rows, extra), targets(rows, extra, [label for label, _ in runs[:-1]])]
    footer = (f"Machine: {machine()}; one thread; latencies are medians of interleaved runs in one process. "
              f"Produced by `python scripts/spn_table.py --widths {args.widths}` in "
              f"{time.perf_counter() - started:.0f} s.")
    publish("spn_table", BUILD, {"rows": rows, "extra": extra}, parts, footer, True)


if __name__ == "__main__":
    main()
