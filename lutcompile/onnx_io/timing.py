"""Latency of onnxruntime sessions, measured one way for the budget search's cost model and
for every script that reports speed.

Variants are timed in the same process, interleaved round-robin within each repetition (the
starting variant rotates, so none always runs first) so that machine noise hits them alike,
and the median over the repetitions is reported.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from .sessions import make_session, session_options


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


@dataclass
class NodeTime:
    """Median time of one node over profiled runs, as onnxruntime's profiler reports it
    (nodes that onnxruntime inserted, such as layout reorders, included)."""
    name: str
    op_type: str
    seconds: float


def node_times(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray], threads: int = 1,
               runs: int = 20, warmup: int = 3) -> list[NodeTime]:
    """Per-node times of `model` on `feeds` from onnxruntime's profiler, in execution order."""
    options = session_options(threads)
    with tempfile.TemporaryDirectory() as folder:
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        session = make_session(model, threads, options)
        for _ in range(warmup + runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    samples: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            samples.setdefault(name, []).append(e["dur"] * 1e-6)
            ops[name] = e.get("args", {}).get("op_name", "?")
    # the first `warmup` runs of every node are dropped
    return [NodeTime(n, ops[n], float(np.median(s[warmup:] or s))) for n, s in samples.items()]
