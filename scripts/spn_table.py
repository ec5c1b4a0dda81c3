"""StrassenNets' ternary sum-product layers on the shipped MLP and CNN (issue 16): accuracy before
and after the train stage, multiplications per inference, model file size, and whole-model
latency in onnxruntime against fp32, int8 static and lookups at about the same accuracy.

    python scripts/spn_table.py [--widths 1,2] [--only mlp|cnn] [--cnn-epochs N] [--repetitions N]

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

from lutcompile.budget.search import BudgetOptions  # noqa: E402
from lutcompile.compile import frontend  # noqa: E402
from lutcompile.ops.counting import conv_positions, multiplications  # noqa: E402
from pareto import machine  # noqa: E402
from readme_tables import publish  # noqa: E402
from train_table import MLP, cnn_spec, measure, us  # noqa: E402

BUILD = ROOT / "build" / "spn_table"
# issue 16's targets: (the exact model's held-out accuracy, points the SPN model may lose)
TARGETS = {"mlp": (0.986, 1.0), "cnn": (0.9207, 1.5)}
TITLES = {"mlp": "MNIST MLP", "cnn": "Fashion-MNIST CNN"}
LOOKUPS = ("lookups C = 64", {"codebooks": 64})  # train_table's floor configuration, 97.70 %


def table(title: str, rows: dict, extra: dict) -> str:
    fp32, int8, lut = rows["fp32"], rows["int8 static"], rows.get(LOOKUPS[0])
    refs = (fp32, int8) + ((lut,) if lut else ())
    against = "fp32 / int8 / lookups" if lut else "fp32 / int8"
    lines = [f"**{title}** (exact {100 * fp32['accuracy']:.2f} %, int8 static {100 * int8['accuracy']:.2f} %)", "",
             f"| model | held-out before training | after | multiplications per row | model file | batch 256 "
             f"| vs {against} | batch 1 | vs {against} | train time |",
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
            cells += [us(r[f"batch_{b}"]), " / ".join(f"{ref[f'batch_{b}'] / r[f'batch_{b}']:.2f}×" for ref in refs)]
        # a budget's plan trains inside the search's verification, which times it with the compile
        spent = "in the search" if r.get("train_seconds") is None else f"{r['train_seconds']:.0f} s"
        cells.append(f"{spent} ({r['epochs']} epochs, kept {r['best_epoch']})" if trained else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(name: str, rows: dict, extra: dict, labels: list[str]) -> list[str]:
    """Issue 16's targets for each SPN configuration of one model, met or MISSED."""
    exact, points = TARGETS[name]
    out = []
    for label in labels:
        r, e = rows[label], extra[label]
        checks = [(r["accuracy"] >= exact - points / 100,
                   f"held-out {100 * r['accuracy']:.2f} % (target within {points:g} point(s) of {100 * exact:.2f} %)")]
        if name == "mlp":
            fewer = 1 - e["multiplications"] / e["exact_multiplications"]
            smaller = e["fp32_bytes"] / e["file_bytes"]
            checks += [(fewer >= 0.99, f"{100 * fewer:.2f} % fewer multiplications (target >= 99 %)"),
                       (smaller >= 8, f"model file {smaller:.1f}x smaller than fp32 (target >= 8x)")]
        out += [f"- {'met' if ok else 'MISSED'}: {TITLES[name]}, {label}: {text}" for ok, text in checks]
    return out


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


# uint8 activations (ops/spn.py): the same layers, each product's input rows quantised on the fly
UINT8 = ("SPN r = M, uint8 activations", {"method": "spn", "spn_activations": "uint8"})
# StrassenNets' budget through the search (budget/search.py), lookups at C = 64 and SPN at r = M/2
# or M per node: 500 multiplications per inference are under the 610 of every layer at C or r = M.
# Lookups at every C cost M multiplications a row, so the search would take the most accurate,
# C = 64, anyway; the other counts would only add fits to its sensitivities (17 s each here)
BUDGET = ("budget: at most 500 multiplications", {"max_multiplications": 500, "budget_options":
                                                  BudgetOptions(candidates=(64,), spn_widths=(0.5, 1.0))})


def model_runs(name: str, factors=WIDTHS) -> list[tuple[str, dict]]:
    """Each model's configurations, in the order their files lut_0.onnx, lut_1.onnx, ... are
    written (pareto.py takes all but the lookups from there)."""
    if name == "mlp":
        return configs(factors) + [UINT8, BUDGET, LOOKUPS]
    return [("SPN r = M", {"method": "spn"}), UINT8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)), metavar="K,K,...",
                    help=f"the MLP's SPN widths r as multiples of each node's M (default {','.join(map(str, WIDTHS))})")
    ap.add_argument("--only", choices=("mlp", "cnn"), default=None)
    ap.add_argument("--cnn-epochs", type=int, default=5, help="epochs of the CNN's training (default 5)")
    ap.add_argument("--repetitions", type=int, default=30)
    args = ap.parse_args()
    started = time.perf_counter()
    factors = [int(k) for k in args.widths.split(",")]
    plans = {"mlp": (dict(MLP, build=BUILD), model_runs("mlp", factors),
                     "MNIST MLP 784-200-200-200-10, every layer replaced, 2,000 held-out rows; trained on rows "
                     f"augmented by `--augment {MLP['augment']}`"),
             "cnn": (dict(cnn_spec(args.cnn_epochs), build=BUILD), model_runs("cnn"),
                     "Fashion-MNIST CNN, every Conv and Gemm SpnConv / SpnMatMul but the first conv (9 inputs a "
                     "patch: kept exact for every method), official 10,000 test rows; trained on the 60,000")}
    results, parts, lines = {}, [], ["Targets (issue 16):", ""]
    for name, (spec, runs, title) in plans.items():
        if args.only not in (None, name):
            continue
        rows = measure(spec, runs, args.repetitions)
        folder = BUILD / Path(spec["model"]).stem
        paths = {"fp32": ROOT / spec["model"], "int8 static": folder / "int8_static.onnx"}
        paths.update({label: folder / f"lut_{i}.onnx" for i, (label, _) in enumerate(runs)})
        positions = conv_positions(onnx.load(paths["fp32"]))
        exact_mults = multiplications(onnx.load(paths["fp32"]), positions)
        extra = {label: {"multiplications": multiplications(onnx.load(path), positions),
                         "exact_multiplications": exact_mults, "file_bytes": os.path.getsize(path),
                         "fp32_bytes": os.path.getsize(paths["fp32"])} for label, path in paths.items()}
        results[name] = {"rows": rows, "extra": extra}
        parts.append(table(title, rows, extra))
        lines += targets(name, rows, extra, [label for label, w in runs if w.get("method") == "spn"])
        lines += [f"- {TITLES[name]}, {label}: chose {', '.join(f'{n} {c}' for n, c in rows[label]['plan'].items())}"
                  for label, w in runs if "max_multiplications" in w]
    command = "python scripts/spn_table.py" + (f" --only {args.only}" if args.only else "")
    footer = (f"Machine: {machine()}; one thread; latencies are medians of interleaved runs in one process. "
              f"Produced by `{command}` in {time.perf_counter() - started:.0f} s.")
    publish("spn_table", BUILD, results, parts + ["\n".join(lines)], footer, args.only is None)


if __name__ == "__main__":
    main()
