"""onnxruntime helpers shared by every stage: sessions with our kernel registered, batched runs."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort

from . import external_data
from ..ops.kernel import library_path
from ..errors import OptionsError


_THREADS: int | None = None  # the compiler's own sessions' thread count, set by thread_limit


@contextmanager
def thread_limit(threads: int | None):
    """Within the block, the compiler's own onnxruntime sessions (those not given a count) and
    torch use `threads` threads; None leaves both at their defaults (every core)."""
    global _THREADS
    if threads is None:
        yield
        return
    if int(threads) != threads or threads < 1:
        raise OptionsError(f"threads must be a positive whole number, got {threads}")
    import torch
    saved, saved_torch = _THREADS, torch.get_num_threads()
    _THREADS = int(threads)
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        _THREADS = saved
        torch.set_num_threads(saved_torch)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """SessionOptions with the LutMatMul library registered, and a thread count: `threads`,
    else thread_limit's, else onnxruntime's default."""
    threads = threads if threads is not None else _THREADS
    so = ort.SessionOptions()
    so.register_custom_ops_library(library_path())
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def make_session(model: onnx.ModelProto | str, threads: int | None = None,
                 options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """A CPU session of a model proto or file; a proto's external tensors are passed in memory.
    `options`, if given, must come from session_options (they register our library)."""
    options = options or session_options(threads)
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    values = external_data.add_to_session(model, options)  # noqa: F841 (alive until created)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size the session's first input fixes, or None if the batch is dynamic."""
    dim = (session.get_inputs()[0].shape or [None])[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def iter_batches(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                 output_names: list[str] | None = None, batch_size: int = 512, progress=None):
    """Yield (rows, outputs) over the rows of `feeds`. A model with a fixed batch runs in
    batches of exactly that size, the last one padded with zeros and its outputs trimmed."""
    n = len(next(iter(feeds.values())))
    fixed = fixed_batch(session)
    step = fixed or batch_size
    starts = range(0, n, step)
    for start in (progress(starts) if progress else starts):
        rows = slice(start, min(n, start + step))
        part = {k: v[rows] for k, v in feeds.items()}
        short = step - (rows.stop - rows.start)
        if fixed and short:
            part = {k: np.concatenate([v, np.zeros((short, *v.shape[1:]), v.dtype)]) for k, v in part.items()}
        outs = session.run(output_names, part)
        yield rows, [o[:rows.stop - rows.start] for o in outs]


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray],
                output_names: list[str] | None = None, batch_size: int = 512) -> list[np.ndarray]:
    """Run `session` over the rows of `feeds` in batches; concatenated outputs."""
    parts = [outs for _, outs in iter_batches(session, feeds, output_names, batch_size)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))
