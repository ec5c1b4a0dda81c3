"""onnxruntime helpers shared by every stage: sessions with our kernel registered, batched runs."""
from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort

from .kernel import library_path


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions with the LutMatMul library registered (and a thread count, if given)."""
    so = ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def make_session(model: onnx.ModelProto | str, threads: int | None = None) -> ort.InferenceSession:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])


def batches(n: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                output_names: list[str] | None = None, batch_size: int = 512) -> list[np.ndarray]:
    """Run `session` over the rows of `feeds` in batches; concatenated outputs."""
    n = len(next(iter(feeds.values())))
    parts: list[list[np.ndarray]] = []
    for rows in batches(n, batch_size):
        outs = session.run(output_names, {k: v[rows] for k, v in feeds.items()})
        parts.append(outs)
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))
