"""The compile report: `lutcompile MODEL ... --report DIR`, or `compile_model(..., report_dir=DIR)`.

`write_report(result, directory)` writes two files:

- report.json, every figure of the compile, schema "lutcompile.report/1":

    {
      "schema": "lutcompile.report/1",
      "lutcompile_version": str,
      "created": str,                          # ISO 8601, UTC
      "calibration_rows": int,
      "accuracy": {"before": float | null,     # top-1 on the calibration data (null without labels)
                   "after": float | null},
      "stages": [{"stage": str, "accuracy": float}],   # the fine-tune pass, in order
      "training": [{"stage": str, "best_epoch": int,   # every training run (finetune.TrainingCurve)
                    "reference_loss": float | null, "reference_accuracy": float | null,  # the exact model
                    "epochs": [{"epoch": int, "train_loss": float | null, "held_out_loss": float | null,
                                "held_out_accuracy": float | null, "seconds": float}]}],
      "seconds": {stage: float},               # compile time per stage (frontend, calibrate, fit, ...)
      "total_seconds": float,
      "options": {...},                        # CompileResult.options: the options used
      "nodes": [{"name": str, "op_type": str, "D": int, "M": int, "codebooks": int,
                 "partition": str, "table_loss": str, "activation": str | null,
                 "relative_error": float, "bytes_before": int, "bytes_after": int,
                 "method": "lut" | "spn", "spn": null | {"width": int, "multiplications": int,
                 "additions": int, "exact_multiplications": int, "exact_additions": int,
                 "wb_zeros": float, "wc_zeros": float, "activations": str}, ...}],  # per row; ops.spn.LayerCount
                                               # every NodeReport field, as the API reports it
      "skipped": [{"name": str, "op_type": str, "reason": str}],   # nodes kept exact, and why
      "totals": {"nodes": int, "skipped": int, "bytes_before": int, "bytes_after": int},
      "budget": {...}                          # only after an automatic budget search (max_accuracy_drop
                                               # or max_output_error): BudgetResult.to_json(), budget.py
    }

- report.html, a self-contained page (no scripts, no external files: it opens offline) with
  the same figures as tables and three plots drawn by matplotlib, inlined as SVG: per-node
  relative error (`#plot-error`), calibration accuracy at each stage of the fine-tune pass
  (`#plot-stages`), parameter bytes before and after per node (`#plot-bytes`), and the train
  stage's curve (`#plot-training`): held-out accuracy and loss per epoch, beside the exact model's.

matplotlib is needed for the plots; without it the page is written with its tables and a note.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

SCHEMA = "lutcompile.report/1"
PLOTS = ("plot-error", "plot-stages", "plot-bytes", "plot-training")
log = logging.getLogger("lutcompile")


def _jsonable(value):
    """Plain JSON values from dataclasses, tuples, numpy scalars and arrays, paths."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def report_data(result) -> dict:
    """The content of report.json for a CompileResult."""
    from .. import __version__
    nodes = [_jsonable(n) for n in result.nodes]
    return {
        "schema": SCHEMA,
        "lutcompile_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "calibration_rows": int(result.calibration_rows),
        "accuracy": {"before": _jsonable(result.accuracy_before), "after": _jsonable(result.accuracy_after)},
        "stages": [{"stage": str(s), "accuracy": _jsonable(a)} for s, a in result.stages],
        "training": [_jsonable(c) for c in getattr(result, "training", [])],
        "seconds": {k: float(v) for k, v in result.seconds.items()},
        "total_seconds": float(sum(result.seconds.values())),
        "options": _jsonable(result.options),
        "nodes": nodes,
        "skipped": [_jsonable(s) for s in result.skipped],
        "totals": {"nodes": len(nodes), "skipped": len(result.skipped),
                   "bytes_before": int(sum(n["bytes_before"] for n in nodes)),
                   "bytes_after": int(sum(n["bytes_after"] for n in nodes))},
    } | ({} if getattr(result, "budget", None) is None else {"budget": _jsonable(result.budget.to_json())})


def write_report(result, directory: str | os.PathLike) -> Path:
    """Write report.json and report.html for a CompileResult into `directory` (created if
    needed); returns the path of report.html."""
    from ..onnx_io.export import OutputError, write_atomic
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report directory {folder}: {exc.strerror or exc}") from exc
    data = report_data(result)
    page = render_html(data)
    try:
        write_atomic(folder / "report.json", (json.dumps(data, indent=2) + "\n").encode())
        write_atomic(folder / "report.html", page.encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write the report into {folder}: {exc.strerror or exc}") from exc
    log.info("wrote %s and %s", folder / "report.json", folder / "report.html")
    return folder / "report.html"


# ---------------------------------------------------------------- plots

def _svg(fig) -> str:
    import matplotlib
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "lutcompile"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _figure(width=4.8, height=3.3):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.add_subplot()


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def _short(names: list[str]) -> list[str]:
    return [n if len(n) <= 18 else n[:8] + "…" + n[-8:] for n in names]


def plot_errors(data: dict) -> str:
    fig, ax = _figure()
    nodes = data["nodes"]
    if not nodes:
        _empty(ax, "no node was replaced")
    else:
        x = np.arange(len(nodes))
        errors = [n["relative_error"] or 0.0 for n in nodes]
        bars = ax.bar(x, errors, color="#3b6ea8")
        ax.bar_label(bars, labels=[f"{e:.3f}" for e in errors], fontsize=8, padding=2)
        ax.set_xticks(x, _short([n["name"] for n in nodes]), rotation=30 if len(nodes) > 4 else 0,
                      ha="right" if len(nodes) > 4 else "center", fontsize=8)
        ax.set_ylabel("relative error ||Y_lut - Y|| / ||Y||")
        ax.set_ylim(0, max(errors) * 1.18 or 1)
    ax.set_title("Per-node relative error (calibration rows)")
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def plot_stages(data: dict) -> str:
    fig, ax = _figure()
    acc = data["accuracy"]
    points = []
    if acc["before"] is not None:
        points.append(("original", acc["before"]))
    points += [(s["stage"], s["accuracy"]) for s in data["stages"] if s["accuracy"] is not None]
    if acc["after"] is not None and (not data["stages"] or data["stages"][-1]["accuracy"] != acc["after"]):
        points.append(("compiled", acc["after"]))
    if not points:
        _empty(ax, "no labels in the calibration data:\nno accuracy to plot")
    else:
        x = np.arange(len(points))
        y = [100 * p[1] for p in points]
        ax.plot(x, y, marker="o", color="#c0392b")
        for xi, yi in zip(x, y):
            ax.annotate(f"{yi:.2f}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center",
                        fontsize=8)
        labels = [p[0].replace("after ", "after\n") for p in points]
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("top-1 accuracy, %")
        lo, hi = min(y), max(y)
        pad = max(2.0, 0.15 * (hi - lo))
        ax.set_ylim(max(0, lo - pad), min(106, hi + pad))
        if not data["stages"]:
            ax.text(0.02, 0.04, "no fine-tune pass: original and compiled only", transform=ax.transAxes,
                    fontsize=8, color="#555")
    ax.set_title("Calibration accuracy at each stage")
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def plot_bytes(data: dict) -> str:
    fig, ax = _figure()
    nodes = data["nodes"]
    if not nodes:
        _empty(ax, "no node was replaced")
    else:
        x = np.arange(len(nodes))
        before = [n["bytes_before"] for n in nodes]
        after = [n["bytes_after"] for n in nodes]
        ax.bar(x - 0.2, before, 0.4, label="before (float32 weight + bias)", color="#7f8c8d")
        ax.bar(x + 0.2, after, 0.4, label="after (lookup tables, trees, bias)", color="#27ae60")
        for xi, b, a in zip(x, before, after):
            ax.annotate(f"{b / a:.1f}x" if a else "", (xi, max(b, a)), textcoords="offset points",
                        xytext=(0, 3), ha="center", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(min(after + before) / 2, max(after + before) * 4)
        ax.set_xticks(x, _short([n["name"] for n in nodes]), rotation=30 if len(nodes) > 4 else 0,
                      ha="right" if len(nodes) > 4 else "center", fontsize=8)
        ax.set_ylabel("parameter bytes (log scale)")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_title("Parameter bytes before and after")
    ax.grid(axis="y", alpha=0.3)
    return _svg(fig)


def plot_training(data: dict) -> str:
    """The train stage's held-out accuracy (or loss, without labels) per epoch, with the exact
    model's as a dashed line and the kept epoch marked."""
    fig, ax = _figure()
    runs = [c for c in data.get("training", []) if c["stage"] == "train"] or data.get("training", [])[-1:]
    if not runs or not any(e["held_out_loss"] is not None for e in runs[-1]["epochs"]):
        _empty(ax, "no training with held-out rows:\nno curve to plot")
    else:
        run = runs[-1]
        by_accuracy = all(e["held_out_accuracy"] is not None for e in run["epochs"])
        key, reference = ("held_out_accuracy", run["reference_accuracy"]) if by_accuracy else \
            ("held_out_loss", run["reference_loss"])
        scale = 100 if by_accuracy else 1
        x = [e["epoch"] for e in run["epochs"]]
        y = [scale * e[key] for e in run["epochs"]]
        ax.plot(x, y, marker="o", markersize=3, color="#c0392b", label="lookups (held-out)")
        if reference is not None:
            ax.axhline(scale * reference, color="#555", linestyle="--", label="exact model")
        best = run["best_epoch"]
        ax.plot([best], [y[x.index(best)]], marker="*", markersize=12, color="#27ae60", linestyle="none",
                label=f"kept: epoch {best}")
        ax.set_xlabel("epoch (0: before training)")
        ax.set_ylabel("held-out top-1 accuracy, %" if by_accuracy else "held-out loss")
        ax.legend(fontsize=8, loc="lower right" if by_accuracy else "upper right")
    ax.set_title("Training through the lookups")
    ax.grid(alpha=0.3)
    return _svg(fig)


# ---------------------------------------------------------------- page

_CSS = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 24px 32px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #666; font-size: 13px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; min-width: 150px; background: #fafafa; }
.card .label { font-size: 12px; color: #666; } .card .value { font-size: 19px; font-weight: bold; margin-top: 2px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap: 14px; max-width: 1500px; }
figure { margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: 8px; background: #fff; }
figure svg { display: block; width: 100%; height: auto; }
figcaption { font-size: 12px; color: #555; margin-top: 4px; max-width: 560px; }
table { border-collapse: collapse; font-size: 13px; } th, td { border-bottom: 1px solid #e3e3e3; padding: 4px 10px; text-align: left; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 10px; font-size: 12px; overflow-x: auto; max-width: 1100px; }
.note { color: #8a5300; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><thead><tr>", *[f"<th>{_e(h)}</th>" for h in head], "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=\"num\">{_e(c)}</td>" if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(data: dict) -> str:
    """report.html's text for report_data(result)."""
    try:
        plots = {"plot-error": plot_errors(data), "plot-stages": plot_stages(data),
                 "plot-bytes": plot_bytes(data), "plot-training": plot_training(data)}
        plot_note = ""
    except ImportError:
        plots = {}
        plot_note = "<p class=\"note\">matplotlib is not installed: plots omitted (pip install matplotlib).</p>"
        log.warning("matplotlib is not installed: report.html has no plots")
    captions = {
        "plot-error": "||Y_lut − Y|| / ||Y|| per replaced node on the calibration rows, after the node's "
                      "fused activation.",
        "plot-stages": "Top-1 accuracy on the calibration data: the original model, after each step of "
                       "the fine-tune pass, and the compiled model, all run in onnxruntime.",
        "plot-bytes": "Bytes of each node's parameters: float32 weight and bias before; uint8 tables, "
                      "split dimensions, thresholds, offsets and bias after. Labels give the ratio.",
        "plot-training": "The train stage (--train): accuracy on the held-out slice of the training rows, "
                         "never trained or fitted on, per epoch; the kept epoch is starred (its held-out "
                         "loss is lowest); the dashed line is the exact model on the same rows.",
    }
    acc, totals = data["accuracy"], data["totals"]
    ratio = totals["bytes_before"] / totals["bytes_after"] if totals["bytes_after"] else None
    cards = [
        ("nodes replaced", f"{totals['nodes']}"),
        ("kept exact", f"{totals['skipped']}"),
        ("accuracy before → after", f"{_pct(acc['before'])} → {_pct(acc['after'])}"
         if acc["before"] is not None else "no labels"),
        ("parameter bytes", f"{totals['bytes_before']:,} → {totals['bytes_after']:,}"
         + (f" ({ratio:.1f}x)" if ratio else "")),
        ("compile time", f"{data['total_seconds']:.1f} s"),
    ]
    def size_and_mults(n: dict) -> list[str]:
        """The node's size (C, or an SpnMatMul's r) and its multiplications per row, exact -> now."""
        spn = n.get("spn")
        if spn is None:
            return [str(n["codebooks"]), "-"]
        return [f"r = {spn['width']}", f"{spn['exact_multiplications']:,} → {spn['multiplications']:,}"]
    nodes_rows = [[n["name"], n["op_type"], n.get("method", "lut"), f"{n['D']} x {n['M']}", *size_and_mults(n),
                   n["partition"], n["table_loss"], n.get("activation") or "-", f"{n['relative_error']:.4f}"
                   if n["relative_error"] is not None else "-", f"{n['bytes_before']:,}", f"{n['bytes_after']:,}",
                   f"{n['bytes_before'] / n['bytes_after']:.1f}x" if n["bytes_after"] else "-"]
                  for n in data["nodes"]]
    parts = [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<title>lutcompile report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>lutcompile compile report</h1>",
        f"<div class=\"meta\">lutcompile {_e(data['lutcompile_version'])} · {_e(data['created'])} · "
        f"{data['calibration_rows']} calibration rows · options: codebooks="
        f"{_e(data['options'].get('codebooks'))}, partition={_e(data['options'].get('partition'))}, "
        f"table_loss={_e(data['options'].get('table_loss'))}, finetune={_e(data['options'].get('finetune'))}</div>",
        "<div class=\"cards\">" + "".join(
            f"<div class=\"card\"><div class=\"label\">{_e(k)}</div><div class=\"value\">{_e(v)}</div></div>"
            for k, v in cards) + "</div>",
        "<h2>Plots</h2>", plot_note, "<div class=\"plots\">",
    ]
    for key in PLOTS:
        if key in plots:
            parts.append(f"<figure id=\"{key}\">{plots[key]}<figcaption>{_e(captions[key])}</figcaption></figure>")
    parts.append("</div>")
    parts += ["<h2>Replaced nodes</h2>",
              _table(["node", "op", "method", "D x M", "C or r", "mults/row", "partition", "tables", "activation",
                      "rel. error", "bytes before", "bytes after", "ratio"], nodes_rows, {4, 9, 10, 11, 12})
              if nodes_rows else "<p>No node was replaced.</p>"]
    parts += ["<h2>Kept exact</h2>",
              _table(["node", "op", "reason"], [[s["name"], s["op_type"], s["reason"]] for s in data["skipped"]])
              if data["skipped"] else "<p>Every candidate node was replaced.</p>"]
    if data["stages"]:
        parts += ["<h2>Fine-tune pass</h2>",
                  _table(["stage", "calibration accuracy"], [[s["stage"], _pct(s["accuracy"])] for s in data["stages"]],
                         {1})]
    for run in data.get("training", []):
        rows = [[e["epoch"], "-" if e["train_loss"] is None else f"{e['train_loss']:.4f}",
                 "-" if e["held_out_loss"] is None else f"{e['held_out_loss']:.4f}", _pct(e["held_out_accuracy"]),
                 f"{e['seconds']:.1f}", "kept" if e["epoch"] == run["best_epoch"] else ""] for e in run["epochs"]]
        parts += [f"<h2>Training: {_e(run['stage'])}</h2>",
                  f"<p class=\"meta\">exact model on the held-out rows: loss "
                  f"{'-' if run['reference_loss'] is None else format(run['reference_loss'], '.4f')}, accuracy "
                  f"{_pct(run['reference_accuracy'])}</p>" if run["reference_loss"] is not None else "",
                  _table(["epoch", "train loss", "held-out loss", "held-out accuracy", "seconds", ""], rows,
                         {0, 1, 2, 3, 4})]
    parts += ["<h2>Compile time</h2>",
              _table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in data["seconds"].items()]
                     + [["total", f"{data['total_seconds']:.2f}"]], {1}),
              "<h2>Options</h2>", f"<pre>{_e(json.dumps(data['options'], indent=2))}</pre>",
              "<p class=\"meta\">The same figures are in report.json beside this page.</p>",
              "</body></html>"]
    return "\n".join(p for p in parts if p)
