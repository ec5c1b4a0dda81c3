"""all-MiniLM-L6-v2, every constant-weight MatMul replaced, compiled and trained as a user would.

Builds the ONNX export and the real-sentence data sets with scripts/minilm.py, compiles with
`lutcompile.compile_model` (the CLI's call) with training on train.npz, and reports:

* compile time, split into its stages (calibrate, fit, train), on this machine;
* sentence-embedding quality on 256 held-out sentences: the cosine between each sentence's
  mean-pooled embedding and the original model's, for onnxruntime's int8 (dynamic, the usual
  transformer quantisation), the lookups before training and after;
* latency, one thread, medians of interleaved runs in one process, at 1 and 32 sentences.

    python scripts/bench_transformer.py                  # C = 16, 2 epochs; README section
    python scripts/bench_transformer.py --codebooks 32 --epochs 3
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
from lutcompile.onnx_io.sessions import make_session  # noqa: E402
from lutcompile.onnx_io.timing import model_latencies  # noqa: E402
import minilm  # noqa: E402
from pareto import build_int8_dynamic, machine, preprocessed  # noqa: E402
from readme_tables import publish  # noqa: E402

BUILD = ROOT / "build" / "minilm"
TOKENS = 64


def prepare(folder: Path) -> None:
    if not (folder / "minilm.onnx").exists():
        minilm.export(folder / "minilm.onnx", TOKENS)
    if not all((folder / f"{name}.npz").exists() for name in ("calib", "train", "eval")):
        minilm.write_data(folder, calibration=128, held_out=256, tokens=TOKENS)


def embeddings(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = make_session(model)
    return minilm.mean_pooled(session.run(None, feeds)[0], feeds["attention_mask"])


def int8_dynamic(folder: Path) -> Path:
    out = folder / "int8_dynamic.onnx"
    build_int8_dynamic(preprocessed(folder / "minilm.onnx", folder), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codebooks", "-C", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--partition", default="contiguous",
                    help="fit partition (default contiguous: OPQ costs 25 s per 1536-wide node here, see README)")
    ap.add_argument("--repetitions", type=int, default=20)
    args = ap.parse_args()
    started = time.perf_counter()
    BUILD.mkdir(parents=True, exist_ok=True)
    prepare(BUILD)
    source = BUILD / "minilm.onnx"
    held = dict(np.load(BUILD / "eval.npz"))
    compile_start = time.perf_counter()
    result = lutcompile.compile_model(str(source), BUILD / "lut.onnx", str(BUILD / "calib.npz"),
                                      train=str(BUILD / "train.npz"), epochs=args.epochs,
                                      codebooks=args.codebooks, partition=args.partition,
                                      report_dir=BUILD / "report", progress=True)
    compile_seconds = time.perf_counter() - compile_start
    onnx.save(result.before_training, BUILD / "lut_untrained.onnx")
    models = {"fp32": str(source), "int8 dynamic": str(int8_dynamic(BUILD)),
              f"lookups C = {args.codebooks}, untrained": str(BUILD / "lut_untrained.onnx"),
              f"lookups C = {args.codebooks}, trained": str(BUILD / "lut.onnx")}
    reference = embeddings(str(source), held)
    cosines = {name: (embeddings(path, held) * reference).sum(axis=1) for name, path in models.items()}
    latency = {b: model_latencies({k: v for k, v in models.items() if "untrained" not in k},
                                  {k: v[:b] for k, v in held.items()}, 1, args.repetitions) for b in (1, 32)}
    results = {"compile_seconds": compile_seconds, "seconds": result.seconds, "nodes": len(result.nodes),
               "train_rows": result.options.get("train_rows"),
               "cosine": {k: {"mean": float(v.mean()), "min": float(v.min())} for k, v in cosines.items()},
               "latency": latency}
    fp32 = latency[1]["fp32"], latency[32]["fp32"]
    lines = ["| model | embedding cosine to fp32, mean (min) | 1 sentence | 32 sentences |",
             "|---|---|---|---|"]
    for name in models:
        cos = results["cosine"][name]
        cells = [name, f"{cos['mean']:.3f} ({cos['min']:.3f})"]
        for b, base in zip((1, 32), fp32):
            t = latency[b].get(name)
            cells.append("-" if t is None else f"{t * 1e3:.2f} ms ({base / t:.2f}× fp32)")
        lines.append("| " + " | ".join(cells) + " |")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items() if v >= 1)
    summary = (f"{len(result.nodes)} MatMuls replaced at C = {args.codebooks} ({args.partition} partition); "
               f"calibration 128 sentences ({result.calibration_rows} of them fitted on: the others fall in "
               f"the training's held-out slice), training {result.options.get('train_rows'):,} sentences for "
               f"{args.epochs} epochs; held-out 256 sentences of 64 tokens. "
               f"Compile time {compile_seconds:.0f} s ({stages}).")
    footer = (f"Machine: {machine()}; one thread; latencies are medians of interleaved runs in one process. "
              f"Produced by `python scripts/bench_transformer.py` in {time.perf_counter() - started:.0f} s.")
    publish("transformer", BUILD, results, [summary, "\n".join(lines)], footer,
            readme=args.codebooks == 16 and args.epochs == 2 and args.partition == "contiguous")


if __name__ == "__main__":
    main()
