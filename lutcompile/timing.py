"""Latency of onnxruntime sessions, measured one way for the budget search's cost model and
for every script that reports speed.

Variants are timed in the same process, interleaved round-robin within each repetition (the
starting variant rotates, so none always runs first) so that machine noise hits them alike,
and the median over the repetitions is reported.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx

from .runtime import make_session


def interleaved_medians(runs: dict[str, Callable[[], object]], repetitions: int = 30,
                        min_seconds: float = 0.002, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, timed round-robin."""
    names = list(runs)
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    # calls per sample, so that each sample lasts at least min_seconds
    inner = {}
    for name, fn in runs.items():
        start = time.perf_counter()
        fn()
        inner[name] = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repetitions):
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]
            fn, n = runs[name], inner[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: float(np.median(s)) for name, s in samples.items()}


def model_latencies(models: dict[str, onnx.ModelProto | str], feeds: dict[str, np.ndarray],
                    threads: int = 1, repetitions: int = 30) -> dict[str, float]:
    """Median seconds per `run` of each model on `feeds`, interleaved in this process."""
    # onnxruntime's default optimisation level (all graph optimisations) applies
    sessions = {name: make_session(m, threads) for name, m in models.items()}
    return interleaved_medians({name: (lambda s=s: s.run(None, feeds)) for name, s in sessions.items()},
                               repetitions)
