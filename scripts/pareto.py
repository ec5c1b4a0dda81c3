"""Accuracy against latency on the shipped models: lutcompile, onnxruntime fp32, onnxruntime int8.

    python scripts/pareto.py            # build every variant (cached in build/pareto/), measure, write
    python scripts/pareto.py --reuse    # reuse the variants already in build/pareto/: measure, write
    python scripts/pareto.py --trained-from build/train_table   # the trained variants from train_table.py's run

For the MNIST MLP and the Fashion-MNIST CNN, each variant is built from the model and its
calibration npz (models/*_calib.npz, 2,000 training rows with labels):

- fp32: the original model;
- int8 static: onnxruntime.quantization.quantize_static, QDQ format, its defaults otherwise
  (int8 activations and weights, per-tensor, MinMax calibration), after quant_pre_process,
  calibrated by a CalibrationDataReader over the calibration npz;
- int8 dynamic: onnxruntime.quantization.quantize_dynamic (int8 weights), after quant_pre_process;
- lutcompile C=4, 8, 16, 32: every replaceable node at C, compile_model's defaults (fine-tune
  pass on);
- lutcompile budget 0.5, 1, 2 points: compile_model(max_accuracy_drop=...), defaults. The three
  searches of a model share one cost model and one set of per-node sensitivities (measured by
  the first; each search would measure the same ones: same split, fits and seeds);
- lutcompile trained: scripts/train_table.py's configurations, compiled and trained by its
  `compile_trained` (compile_model(train=...) on the training rows: the MLP's 8,000 with
  augmentation, the CNN's 60,000), so the two scripts' trained models are the same; with
  --trained-from, the models scripts/train_table.py wrote in its last run are taken instead of
  training them again (the same call, so the same models, without the 20 minutes).

Each variant is measured on the held-out test npz (models/*_test.npz): top-1 accuracy, and
latency in onnxruntime with one thread at batch 1 and batch 256, the median of interleaved
runs of all the model's variants in this process. Writes docs/results/pareto.md (full table),
docs/results/pareto.png (the chart) and the README section `pareto`. Timings want a quiet
machine: build once, then rerun with --reuse when the machine is idle.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

import lutcompile
from lutcompile.budget.search import BudgetOptions
from lutcompile.compile.calibrate import load_calibration
from lutcompile.compile.frontend import load_model
from lutcompile.onnx_io.timing import model_latencies

from readme_tables import update_readme

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "pareto"
RESULTS = ROOT / "docs" / "results"
MODELS = {
    "mnist_mlp": dict(title="MNIST MLP", model="models/mnist_mlp.onnx", calib="models/mnist_calib.npz",
                      test="models/mnist_test.npz"),
    "fashion_cnn": dict(title="Fashion-MNIST CNN", model="models/fashion_cnn.onnx",
                        calib="models/fashion_calib.npz", test="models/fashion_test.npz"),
}
UNIFORM = (4, 8, 16, 32)
BUDGETS = (0.005, 0.01, 0.02)
BATCHES = (1, 256)
FAMILIES = ("fp32", "int8", "lut", "budget", "trained", "spn")


@dataclass
class Variant:
    key: str  # file stem in build/pareto/<model>/
    label: str
    family: str  # one of FAMILIES
    info: dict = field(default_factory=dict)  # how it was built: seconds, replaced nodes, budget
    accuracy: float = float("nan")  # held-out, %
    latency: dict[int, float] = field(default_factory=dict)  # batch -> seconds per run


# ------------------------------------------------------------------------- building

class NpzReader:
    """onnxruntime.quantization.CalibrationDataReader over an npz's input rows, 100 at a time."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int = 100):
        n = len(next(iter(arrays.values())))
        self._batches = iter([{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)])

    def get_next(self):
        return next(self._batches, None)


def preprocessed(model: Path, folder: Path) -> Path:
    """onnxruntime's quantisation pre-processing of `model`, written to folder/preprocessed.onnx."""
    from onnxruntime.quantization import quant_pre_process
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice on pre-processing
    pre = folder / "preprocessed.onnx"
    quant_pre_process(str(model), str(pre))
    return pre


def build_int8_dynamic(pre: Path, out: Path) -> float:
    """onnxruntime's dynamic int8 quantisation (int8 weights, activations per batch) of the
    pre-processed model to `out`; its seconds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    start = time.perf_counter()
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8)
    return time.perf_counter() - start


def build_int8(spec: dict, folder: Path) -> dict[str, dict]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(NpzReader, CalibrationDataReader):
        pass

    pre = preprocessed(ROOT / spec["model"], folder)
    model = load_model(ROOT / spec["model"])
    calib = load_calibration(ROOT / spec["calib"], model)
    start = time.perf_counter()
    quantize_static(str(pre), str(folder / "int8_static.onnx"), Reader(calib.inputs), quant_format=QuantFormat.QDQ)
    static = time.perf_counter() - start
    return {"int8_static": {"seconds": static},
            "int8_dynamic": {"seconds": build_int8_dynamic(pre, folder / "int8_dynamic.onnx")}}


def lut_info(result: lutcompile.CompileResult, seconds: float) -> dict:
    info = {"seconds": seconds, "replaced": {n.name: n.codebooks for n in result.nodes}}
    if result.budget is not None:
        b = result.budget
        info["budget"] = {"plan": b.plan, "predicted": b.predicted, "measured": b.measured,
                          "accuracy_before": b.accuracy_before, "accuracy_after": b.accuracy_after,
                          "node_seconds_exact": b.seconds_exact, "node_seconds": b.seconds,
                          "verifications": len(b.verifications), "held_out_rows": len(b.held_out_rows)}
    return info


def build_model(name: str, spec: dict, variants: list[Variant], reuse: bool, trained_from: Path | None = None,
                spn_from: Path | None = None) -> None:
    """Build (or, with reuse, load the cached) compiled and quantised variants of one model;
    the trained ones taken from scripts/train_table.py's folder `trained_from`, the SPN ones from
    scripts/spn_table.py's `spn_from`, when given."""
    folder = BUILD / name
    folder.mkdir(parents=True, exist_ok=True)

    def cached(v: Variant) -> bool:
        meta = folder / f"{v.key}.json"
        if reuse and meta.exists() and (folder / f"{v.key}.onnx").exists():
            v.info = json.loads(meta.read_text())
            return True
        return False

    def store(v: Variant, info: dict) -> None:
        v.info = info
        (folder / f"{v.key}.json").write_text(json.dumps(info, indent=2) + "\n")

    by_key = {v.key: v for v in variants}
    if not (cached(by_key["int8_static"]) and cached(by_key["int8_dynamic"])):
        for key, info in build_int8(spec, folder).items():
            store(by_key[key], info)
    shared = BudgetOptions()
    for v in variants:
        if v.family not in ("lut", "budget", "trained", "spn") or cached(v):
            continue
        source = {"trained": trained_from, "spn": spn_from}.get(v.family)
        if source is not None:
            store(v, {**v.info, **trained_table_info(source, name, v, folder)})
            continue
        print(f"{name}: building {v.label}", flush=True)
        start = time.perf_counter()
        if v.family in ("trained", "spn"):  # train_table's or spn_table's configuration, compiled as they do
            import train_table
            spec = train_table.MLP if name == "mnist_mlp" else train_table.cnn_spec()
            result = train_table.compile_trained(spec, dict(trained_configs(name, v.family))[v.info["config"]],
                                                 folder / f"{v.key}.onnx", progress=False)
            v.info["train_seconds"] = result.seconds.get("train")
        elif v.family == "lut":
            result = lutcompile.compile_model(ROOT / spec["model"], folder / f"{v.key}.onnx", ROOT / spec["calib"],
                                              codebooks=v.info["codebooks"], progress=False)
        else:
            result = lutcompile.compile_model(ROOT / spec["model"], folder / f"{v.key}.onnx", ROOT / spec["calib"],
                                              max_accuracy_drop=v.info["max_accuracy_drop"],
                                              budget_options=shared, progress=False)
            shared = BudgetOptions(cost_model=result.budget.cost, sensitivity=result.budget.sensitivity)
        store(v, {**v.info, **lut_info(result, time.perf_counter() - start)})


def trained_table_info(trained_from: Path, name: str, v: Variant, folder: Path) -> dict:
    """Copy trained variant `v` (trained_i: train_table's i-th configuration) from the folder
    scripts/train_table.py wrote (its lut_i.onnx and its results.json row)."""
    import shutil
    results = json.loads((trained_from / "results.json").read_text())
    section = results.get("mlp" if name == "mnist_mlp" else "cnn", {})
    rows = section.get("rows", {}) if v.family == "spn" else section
    row = rows.get(v.info["config"])
    model = trained_from / name / f"lut_{v.key.split('_')[-1]}.onnx"
    if row is None or not model.exists():
        script = "spn_table" if v.family == "spn" else "train_table"
        raise SystemExit(f"pareto.py: {trained_from} has no '{v.info['config']}' for {name}: "
                         f"run scripts/{script}.py first")
    shutil.copyfile(model, folder / f"{v.key}.onnx")
    print(f"{name}: {v.label} taken from {model}", flush=True)
    return {"seconds": row["compile_seconds"], "train_seconds": row["train_seconds"], "replaced": row["plan"],
            "from": str(model)}


def trained_configs(name: str, family: str = "trained") -> list[tuple[str, dict]]:
    """The trained configurations of scripts/train_table.py (or, family "spn", of
    scripts/spn_table.py, but its lookups) for one model: (label, compile_model keywords)."""
    import train_table
    if family == "spn":
        import spn_table
        return [run for run in spn_table.model_runs("mlp" if name == "mnist_mlp" else "cnn")
                if run != spn_table.LOOKUPS]
    return train_table.MLP_CONFIGS if name == "mnist_mlp" else train_table.CNN_CONFIGS


def variants_of(name: str) -> list[Variant]:
    return ([Variant("fp32", "fp32", "fp32"), Variant("int8_static", "int8 static (QDQ)", "int8"),
             Variant("int8_dynamic", "int8 dynamic", "int8")]
            + [Variant(f"lut_c{C}", f"lut C={C}", "lut", {"codebooks": C}) for C in UNIFORM]
            + [Variant(f"budget_{x}", f"lut budget {100 * x:g} pt", "budget", {"max_accuracy_drop": x})
               for x in BUDGETS]
            + [Variant(f"trained_{i}", f"lut trained {label}", "trained", {"config": label})
               for i, (label, _) in enumerate(trained_configs(name))]
            + [Variant(f"spn_{i}", f"{label} trained", "spn", {"config": label})
               for i, (label, _) in enumerate(trained_configs(name, "spn"))])


def path_of(name: str, spec: dict, v: Variant) -> Path:
    return ROOT / spec["model"] if v.family == "fp32" else BUILD / name / f"{v.key}.onnx"


# ------------------------------------------------------------------------- measuring

def measure(name: str, spec: dict, variants: list[Variant], repetitions: int) -> None:
    test = load_calibration(ROOT / spec["test"], load_model(ROOT / spec["model"]))
    paths = {v.key: str(path_of(name, spec, v)) for v in variants}
    for v in variants:
        v.accuracy = 100 * lutcompile.evaluate_accuracy(paths[v.key], test)
    for batch in BATCHES:
        feeds = {k: x[:batch] for k, x in test.inputs.items()}
        start = time.perf_counter()
        times = model_latencies(paths, feeds, threads=1, repetitions=repetitions)
        print(f"{name}: batch {batch} timed in {time.perf_counter() - start:.0f} s", flush=True)
        for v in variants:
            v.latency[batch] = times[v.key]


# ------------------------------------------------------------------------- writing

def us(seconds: float) -> str:
    return f"{1e6 * seconds:,.0f} µs" if seconds >= 1e-4 else f"{1e6 * seconds:.1f} µs"


def plan_text(v: Variant) -> str:
    if v.family == "budget":  # a plan's option: C, or "spn:r" (budget.cost.option_json)
        replaced = {n: C for n, C in v.info["budget"]["plan"].items() if C is not None}
        return ", ".join(f"{n} {C}" if isinstance(C, str) else f"{n} C={C}" for n, C in replaced.items()) or "all exact"
    if v.family == "lut":
        return f"{len(v.info['replaced'])} nodes at C={v.info['codebooks']}"
    if v.family == "trained":
        return (f"C = {', '.join(map(str, v.info['replaced'].values()))}, trained "
                f"{v.info['train_seconds']:.0f} s")
    if v.family == "spn":  # each node's r (or C, where a budget kept lookups); a budget trains within its search
        seconds = v.info["train_seconds"]
        return (", ".join(f"{n} {size if isinstance(size, str) else f'C={size}'}" for n, size in v.info["replaced"].items())
                + ("" if seconds is None else f", trained {seconds:.0f} s"))
    return ""


def full_table(results: dict[str, list[Variant]]) -> str:
    rows = ["| model | variant | held-out accuracy | drop (points) | latency b=1 | latency b=256 | "
            "speed-up b=1 | speed-up b=256 | build time | replaced |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, variants in results.items():
        fp32 = variants[0]
        for v in variants:
            build = f"{v.info['seconds']:.0f} s" if "seconds" in v.info else "-"
            rows.append(f"| {MODELS[name]['title']} | {v.label} | {v.accuracy:.2f} % | "
                        f"{fp32.accuracy - v.accuracy:.2f} | {us(v.latency[1])} | {us(v.latency[256])} | "
                        f"{fp32.latency[1] / v.latency[1]:.2f}× | {fp32.latency[256] / v.latency[256]:.2f}× | "
                        f"{build} | {plan_text(v)} |")
    return "\n".join(rows)


def short_table(results: dict[str, list[Variant]]) -> str:
    rows = ["| model | variant | held-out accuracy | latency b=1 | latency b=256 | replaced |",
            "|---|---|---|---|---|---|"]
    for name, variants in results.items():
        for v in variants:
            if v.family != "lut":
                rows.append(f"| {MODELS[name]['title']} | {v.label} | {v.accuracy:.2f} % | {us(v.latency[1])} | "
                            f"{us(v.latency[256])} | {plan_text(v) or '-'} |")
    return "\n".join(rows)


def point(v: Variant, batch: int) -> str:
    return f"{v.label} ({v.accuracy:.2f} %, {us(v.latency[batch])})"


def verdict(results: dict[str, list[Variant]]) -> str:
    """Where a lutcompile model beats an onnxruntime int8 model on both accuracy (at least as
    high) and latency (lower), per model and batch size, and where none does."""
    lines, won = [], []
    for name, variants in results.items():
        title = MODELS[name]["title"]
        int8 = [v for v in variants if v.family == "int8"]
        luts = [v for v in variants if v.family in ("lut", "budget", "trained", "spn") and v.info.get("replaced")]
        for batch in BATCHES:
            wins = [(v, q) for q in int8 for v in luts
                    if v.accuracy >= q.accuracy and v.latency[batch] < q.latency[batch]]
            where = f"{title}, batch {batch}"
            if wins:
                won.append(where)
                lines.append(f"- **{where}: yes.** "
                             + "; ".join(f"{point(v, batch)} beats {point(q, batch)}" for v, q in wins) + ".")
                continue
            fastest_int8 = min(int8, key=lambda q: q.latency[batch])
            faster = [v for v in luts if v.latency[batch] < fastest_int8.latency[batch]]
            if not faster:
                lines.append(f"- **{where}: no.** Every lutcompile model is slower than {fastest_int8.label} "
                             f"({us(fastest_int8.latency[batch])}).")
                continue
            best = max(faster, key=lambda v: v.accuracy)
            worst_int8 = min(int8, key=lambda q: q.accuracy)
            lines.append(f"- **{where}: no.** The most accurate lutcompile model faster than both int8 models, "
                         f"{point(best, batch)}, is {worst_int8.accuracy - best.accuracy:.2f} points less "
                         f"accurate than {point(worst_int8, batch)}.")
    headline = (f"**lutcompile beats int8 on both at: {'; '.join(won)}.**" if won else
                "**Nowhere, on these two models: no lutcompile model is both at least as accurate as and faster "
                "than an onnxruntime int8 model, at batch 1 or 256.**")
    return headline + "\n\n" + "\n".join(lines)


def budget_targets(results: dict[str, list[Variant]]) -> str:
    """Per model, each budget's accuracy drop on the test set against its target and against the
    drop the search measured on its held-out calibration rows."""
    lines = ["Points of accuracy the budget searches lost:", ""]
    for name, variants in results.items():
        fp32, budgets = variants[0], [v for v in variants if v.family == "budget"]
        parts, exact = [], []
        for v in budgets:
            target, b = 100 * v.info["max_accuracy_drop"], v.info["budget"]
            if not v.info["replaced"]:
                exact.append(f"{target:g}")
                continue
            drop = fp32.accuracy - v.accuracy
            parts.append(f"target {target:g}: {drop:.2f} on the test set ({'within' if drop <= target else 'over'}), "
                         f"{100 * b['measured']:.2f} on the held-out calibration rows, where the original model "
                         f"scores {100 * b['accuracy_before']:.2f} %")
        if exact:
            parts.append(f"target{'s' if len(exact) > 1 else ''} {', '.join(exact)}: every node kept exact (the "
                         f"fp32 model), as no lookup that saves time fitted the target")
        lines.append(f"- {MODELS[name]['title']} ({fp32.accuracy:.2f} % on the test set): " + "; ".join(parts) + ".")
    return "\n".join(lines)


def budget_notes(results: dict[str, list[Variant]]) -> str:
    notes = []
    for name, variants in results.items():
        for v in variants:
            if v.family == "budget":
                b = v.info["budget"]
                notes.append(f"{MODELS[name]['title']}, {v.label}: {plan_text(v)}; drop on the "
                             f"{b['held_out_rows']} held-out calibration rows {100 * b['measured']:.2f} points "
                             f"(predicted {100 * b['predicted']:.2f}), {b['verifications']} verification(s), "
                             f"nodes {us(b['node_seconds_exact'])} → {us(b['node_seconds'])} at batch 256 "
                             f"(cost model)")
    return "\n".join(f"- {n}" for n in notes)


# where each family's labels go (points), so that neighbours do not print over each other
LABEL_OFFSETS = {"fp32": (8, 5), "int8_static": (-8, 7), "int8_dynamic": (8, -11), "lut": (7, 3),
                 "budget": (7, -11), "trained": (-8, -12), "spn": (8, 4)}


def identity(v: Variant) -> str:
    """Variants that are the same model share it: a budget is its plan, and all exact is fp32."""
    if v.family != "budget":
        return v.key
    return json.dumps(v.info["replaced"], sort_keys=True) if v.info["replaced"] else "fp32"


def chart(results: dict[str, list[Variant]], out: Path) -> None:
    """One panel per model and batch size: latency against held-out error, both log scale, both
    lower-is-better. Budgets that chose the same plan are one model, drawn once with all their
    names; one that kept every node exact is the fp32 model, named at the fp32 point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    style = {"fp32": dict(marker="s", color="black", s=50), "int8": dict(marker="^", color="tab:blue", s=60),
             "lut": dict(marker="o", color="tab:orange", s=45), "budget": dict(marker="*", color="tab:red", s=150),
             "trained": dict(marker="D", color="tab:green", s=55), "spn": dict(marker="P", color="tab:purple", s=70)}
    legend = {"fp32": "onnxruntime fp32", "int8": "onnxruntime int8", "lut": "lutcompile, one C for every node",
              "budget": "lutcompile --max-accuracy-drop", "trained": "lutcompile --train (scripts/train_table.py)",
              "spn": "lutcompile --method spn --train (scripts/spn_table.py)"}
    fig, axes = plt.subplots(len(results), len(BATCHES), figsize=(11, 4.4 * len(results)), squeeze=False)
    for row, (name, variants) in enumerate(results.items()):
        same: dict[str, list[Variant]] = {}
        for v in variants:
            same.setdefault(identity(v), []).append(v)
        shown = [group[0] for group in same.values()]
        for col, batch in enumerate(BATCHES):
            ax = axes[row][col]
            xy = {v.key: (1e6 * v.latency[batch], 100 - v.accuracy) for v in shown}
            ax.plot(*zip(*[xy[v.key] for v in shown if v.family == "lut"]), color="tab:orange", lw=1, alpha=0.6)
            for family in FAMILIES:
                members = [v for v in shown if v.family == family]
                if members:
                    ax.scatter(*zip(*[xy[v.key] for v in members]), label=legend[family], zorder=3, **style[family])
            for v in shown:
                text = " = ".join(w.label.replace("lut budget ", "≤").replace("lut ", "").replace(" (QDQ)", "")
                                  .replace(" (C = 196, 50, 50, 50)", "")
                                  for w in same[identity(v)])
                dx, dy = LABEL_OFFSETS.get(v.key, LABEL_OFFSETS.get(v.family))
                if v.family == "trained":  # neighbours: the first label left and below, the next above, ...
                    step = int(v.key.split("_")[-1])
                    dx, dy = (dx, dy) if step % 2 == 0 else (-dx, 7 + 4 * (step // 2))
                ax.annotate(text, xy[v.key], textcoords="offset points", xytext=(dx, dy), fontsize=8,
                            ha="right" if dx < 0 else "left")
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"latency at batch {batch}, 1 thread (µs)")
            ax.set_ylabel("held-out error (%)")
            ax.set_title(f"{MODELS[name]['title']}, batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
            ax.margins(x=0.15, y=0.12)
            if row == 0 and col == 0:
                ax.legend(fontsize=8, loc="upper right")
    fig.suptitle("Held-out error against latency, both log scale: lower left is better", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return f"{cpu}, {os.cpu_count()} cores; onnxruntime {ort.__version__}, lutcompile {lutcompile.__version__}"


def command_text(args) -> str:
    """How the figures were made: the command, and where the trained and SPN variants came from."""
    flags = "".join(f" --{flag} {value}" for flag, value in (("trained-from", args.trained_from),
                                                             ("spn-from", args.spn_from)) if value)
    sources = [f"the {what} variants being the models `python scripts/{script}.py` wrote in its run just before"
               for what, script, value in (("trained", "train_table", args.trained_from),
                                           ("SPN", "spn_table", args.spn_from)) if value]
    return f"Command: `python scripts/pareto.py{flags}`" + (", " + "; ".join(sources) if sources else "") + "."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reuse", action="store_true", help="reuse the variants already built in build/pareto/")
    p.add_argument("--trained-from", type=Path, default=None, metavar="DIR",
                   help="take the trained variants from scripts/train_table.py's last run in DIR "
                        "(build/train_table) instead of training them again")
    p.add_argument("--spn-from", type=Path, default=None, metavar="DIR",
                   help="take the SPN variants from scripts/spn_table.py's last run in DIR (build/spn_table)")
    p.add_argument("--repetitions", type=int, default=30, help="interleaved timing repetitions (default 30)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    results = {}
    for name in args.models:
        variants = variants_of(name)
        build_model(name, MODELS[name], variants, args.reuse, args.trained_from, args.spn_from)
        measure(name, MODELS[name], variants, args.repetitions)
        results[name] = variants
        (BUILD / name / "measured.json").write_text(json.dumps([asdict(v) for v in variants], indent=2) + "\n")
    load_after = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    chart(results, RESULTS / "pareto.png")
    setup = (f"Held-out accuracy on the test npz (MNIST 2,000 rows, Fashion-MNIST 10,000); latency in "
             f"onnxruntime, one thread, medians of {args.repetitions} interleaved runs of all a model's "
             f"variants in one process. Machine: {machine()}; 1-minute load average {load_before:.1f} before "
             f"and {load_after:.1f} after the run. The budget searches of a model share one cost model and "
             f"one set of sensitivities, measured (and timed, under build time) by the first. "
             + command_text(args))
    verdicts = verdict(results)
    (RESULTS / "pareto.md").write_text(
        "# Accuracy against latency: lutcompile, onnxruntime fp32 and int8\n\n" + full_table(results)
        + "\n\n" + setup + "\n\n![chart](pareto.png)\n\n## lutcompile against onnxruntime int8\n\n" + verdicts
        + "\n\n## The budget searches\n\n" + budget_targets(results) + "\n\n" + budget_notes(results) + "\n")
    readme = (short_table(results) + "\n\n![Accuracy against latency](docs/results/pareto.png)\n\n"
              + "Where lutcompile beats onnxruntime's int8 quantisation on both held-out accuracy (at least as "
                "high) and latency (lower), and where it does not:\n\n" + verdicts + "\n\n"
              + budget_targets(results) + "\n\n" + setup
              + " The uniform-C points, each budget's plan and the build times: "
                "[docs/results/pareto.md](docs/results/pareto.md).\n")
    if not args.no_readme:
        update_readme("pareto", readme)
    print(readme)


if __name__ == "__main__":
    main()
