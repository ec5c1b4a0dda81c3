"""Latency of onnxruntime sessions, measured the way every script here reports it.

Variants are timed in the same process, interleaved round-robin within each repetition so
that machine noise hits them alike, and the median of the repetitions is reported.
"""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort

import lutcompile


def session(model: onnx.ModelProto | str, threads: int = 1) -> ort.InferenceSession:
    so = lutcompile.session_options(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def interleaved_medians(runs: dict[str, callable], repetitions: int = 30, warmup: int = 3,
                        min_seconds: float = 0.002) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed round-robin."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    # calls per sample, so that each sample lasts at least min_seconds
    inner = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repetitions):
        for name, fn in runs.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: float(np.median(s)) for name, s in samples.items()}


def model_latencies(models: dict[str, onnx.ModelProto | str], feeds: dict[str, np.ndarray],
                    threads: int = 1, repetitions: int = 30) -> dict[str, float]:
    sessions = {name: session(m, threads) for name, m in models.items()}
    return interleaved_medians({name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()},
                               repetitions)
