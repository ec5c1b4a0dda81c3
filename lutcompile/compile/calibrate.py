"""Stage 2, calibration: load the calibration set and capture each target's input activations.

Activations are captured by running the model in onnxruntime with the wanted tensors added as
graph outputs, one batch at a time, so memory is bounded by one batch plus what is stored.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np
import onnx

from ..ops.spec import K
from ..onnx_io.sessions import iter_batches, make_session

LABELS_KEY = "labels"
CHECK_BYTES = 1 << 24  # rows are checked (finite values) in chunks of about this size

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


@dataclass(frozen=True)
class CalibrateOptions:
    """How the calibration stage runs the model and what it keeps."""

    batch_size: int = 256  # rows per onnxruntime run
    max_rows: int = 20000  # rows kept per node (a seeded sample: Conv patches, or rows of 3-D inputs)
    seed: int = 0
    # the model input whose zeros mark padding positions, [batch, tokens] like a sequence
    # model's: a node's rows at those positions are left out of fitting and of the training
    # loss, since they are not tokens. "auto": the input named attention_mask, if there is one;
    # None: every row counts
    mask_input: str | None = "auto"

    MASK_NAME = "attention_mask"  # Hugging Face's name, which its exporters keep


class CalibrationError(ValueError):
    """The calibration data does not fit the model."""


@dataclass
class CalibrationData:
    inputs: dict[str, np.ndarray]  # one array per model input, rows first
    labels: np.ndarray | None = None  # int64 class ids, one per row

    @property
    def rows(self) -> int:
        return len(next(iter(self.inputs.values())))

    def subset(self, rows: slice | np.ndarray) -> "CalibrationData":
        return CalibrationData({k: v[rows] for k, v in self.inputs.items()},
                               None if self.labels is None else self.labels[rows])


def without_rows(data: CalibrationData, excluded: CalibrationData) -> CalibrationData:
    """`data` less every row equal (in all inputs) to a row of `excluded`.

    The training stage's held-out rows pick the epoch; when the calibration set shares rows
    with the training set (a subset of it, or the same file), those rows are dropped from
    the fitting too, so the held-out rows are unseen by every stage."""
    def keys(d: CalibrationData) -> list[bytes]:  # a digest per row: no copy of the rows
        names = sorted(d.inputs)
        return [hashlib.blake2b(b"".join(np.ascontiguousarray(d.inputs[n][i]).tobytes() for n in names),
                                digest_size=16).digest() for i in range(d.rows)]
    if set(excluded.inputs) != set(data.inputs) or not excluded.rows:
        return data
    seen = set(keys(excluded))
    keep = np.array([k not in seen for k in keys(data)])
    return data if keep.all() else data.subset(np.flatnonzero(keep))


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    init = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def _read_all(reader) -> dict[str, np.ndarray]:
    """Drain an onnxruntime.quantization CalibrationDataReader (get_next() -> dict | None)."""
    batches: dict[str, list[np.ndarray]] = {}
    while (item := reader.get_next()) is not None:
        for key, value in item.items():
            batches.setdefault(key, []).append(np.asarray(value))
    if not batches:
        raise CalibrationError("the calibration data reader returned no data")
    return {k: np.concatenate(v) for k, v in batches.items()}


def load_calibration(source, model: onnx.ModelProto, what: str = "calibration") -> CalibrationData:
    """Calibration data, checked against the model inputs, from an .npz path, a dict of arrays,
    or an object shaped like onnxruntime.quantization's CalibrationDataReader.

    A single-input model accepts any single key; `labels`, when present, holds class ids
    (below the width of the model's first output, where that is known). `what` names the
    data in the errors ("calibration", "training", ...).
    """
    if isinstance(source, CalibrationData):
        source = {**source.inputs, **({} if source.labels is None else {LABELS_KEY: source.labels})}
    if hasattr(source, "get_next"):
        source = _read_all(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise CalibrationError(f"{what} file not found: {path}")
        try:
            arrays = read_npz(path)
        except ValueError as exc:
            raise CalibrationError(f"{path}: cannot load without pickle ({exc})") from exc
        except Exception as exc:
            raise CalibrationError(f"{path} is not a readable .npz file ({type(exc).__name__})") from exc
    else:
        arrays = {k: np.asarray(v) for k, v in dict(source).items()}
    labels = arrays.pop(LABELS_KEY, None)
    wanted = _graph_inputs(model)
    if not arrays:
        raise CalibrationError(f"{what} data holds no input arrays")
    if len(wanted) == 1 and len(arrays) == 1:
        arrays = {wanted[0].name: next(iter(arrays.values()))}
    inputs: dict[str, np.ndarray] = {}
    for vi in wanted:
        if vi.name not in arrays:
            raise CalibrationError(
                f"{what} data has no array for model input '{vi.name}' (keys: {sorted(arrays)})")
        inputs[vi.name] = _check_input(vi, arrays[vi.name], what)
    counts = {len(v) for v in inputs.values()}
    if len(counts) != 1:
        raise CalibrationError(f"{what} inputs have different row counts: {sorted(counts)}")
    n = counts.pop()
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
            raise CalibrationError(
                f"labels must be {n} integer class ids, got dtype {labels.dtype} shape {labels.shape}")
        labels = labels.astype(np.int64)
        classes = _classes(model)
        if len(labels) and (labels.min() < 0 or (classes is not None and labels.max() >= classes)):
            raise CalibrationError(f"{what} labels must lie in [0, {classes if classes else 'classes'}), "
                                   f"got [{labels.min()}, {labels.max()}]")
    return CalibrationData(inputs, labels)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, without pickle. Members stored uncompressed (np.savez) are
    memory-mapped, so rows are read from disk as batches index them and a training set of any
    size costs no memory up front; compressed members (np.savez_compressed) are read into
    memory, once."""
    with np.load(path, allow_pickle=False) as npz:
        names = list(npz.files)
        stored = {}
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.compress_type == zipfile.ZIP_STORED and name in names:
                    stored[name] = info
        mapped = {k: _mapped_member(path, info) for k, info in stored.items()}
        return {k: npz[k] if mapped.get(k) is None else mapped[k] for k in names}


def _mapped_member(path: str, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A read-only memory map of one uncompressed .npy member of a zip archive (None for an
    .npy version this reader does not know)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header: its name and extra field lengths vary
        if local[:4] != b"PK\x03\x04":
            raise ValueError("corrupt zip member header")
        name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_length + extra_length)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        reader = readers.get(np.lib.format.read_magic(f))
        if reader is None:  # a newer .npy version: read it the ordinary way
            return None
        shape, fortran, dtype = reader(f)
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        offset = f.tell()
    if not int(np.prod(shape)):
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _classes(model: onnx.ModelProto) -> int | None:
    """The static last dimension of the model's first output (its class count), if known."""
    dims = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0 else None


def _check_input(vi: onnx.ValueInfoProto, arr: np.ndarray, what: str = "calibration") -> np.ndarray:
    elem = vi.type.tensor_type.elem_type
    dtype = _ONNX_TO_NUMPY.get(elem)
    if dtype is None:
        raise CalibrationError(f"model input '{vi.name}' has an unsupported element type {elem}")
    if arr.dtype.kind not in "fiub":
        raise CalibrationError(f"{what} array '{vi.name}' has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if np.issubdtype(dtype, np.floating) != np.issubdtype(arr.dtype, np.floating):
        raise CalibrationError(f"{what} array '{vi.name}' has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    dims = vi.type.tensor_type.shape.dim
    if arr.ndim != len(dims):
        raise CalibrationError(
            f"{what} array '{vi.name}' has shape {arr.shape}, the model expects rank {len(dims)}")
    for axis, d in enumerate(dims):
        if axis > 0 and d.HasField("dim_value") and d.dim_value != arr.shape[axis]:
            raise CalibrationError(
                f"{what} array '{vi.name}' has shape {arr.shape}, dimension {axis} must be {d.dim_value}")
    if len(arr) == 0:
        raise CalibrationError(f"{what} array '{vi.name}' has no rows")
    arr = np.ascontiguousarray(arr, dtype=dtype)  # no copy when it already is (a memory map stays one)
    if np.issubdtype(dtype, np.floating):
        step = max(1, CHECK_BYTES // max(1, arr[:1].nbytes))
        if not all(np.isfinite(arr[i:i + step]).all() for i in range(0, len(arr), step)):
            raise CalibrationError(f"{what} array '{vi.name}' holds NaN or Inf values")
    return arr


def last_axis_rows(value: np.ndarray) -> np.ndarray:
    return value.reshape(-1, value.shape[-1])


def mask_input(model: onnx.ModelProto, option: str | None) -> str | None:
    """The input that masks padding positions (CalibrateOptions.mask_input resolved), or None."""
    names = [vi.name for vi in _graph_inputs(model)]
    if option == "auto":
        return CalibrateOptions.MASK_NAME if CalibrateOptions.MASK_NAME in names else None
    if option and option not in names:
        raise CalibrationError(f"mask input '{option}' is not an input of the model (inputs: {', '.join(names)})")
    return option or None


def collect_activations(model: onnx.ModelProto, data: CalibrationData,
                        requests: list[str] | dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
                        batch_size: int = 256, progress=None, mask: str | None = None) -> dict[str, np.ndarray]:
    """Rows [n, D] of tensors over the calibration data.

    `requests` is a list of tensor names (each flattened to its last axis), or a dict
    key -> (tensor name, view), where `view` maps one batch's value to its rows: swapped axes,
    or a sample of convolution patches, so that memory stays bounded by one batch plus the
    rows kept. `model` may contain lookup nodes (it runs with our kernel registered), which is
    how the fine-tune pass sees activations produced by already-replaced layers.
    With `mask` (an input's name), each view is also given `keep=`, that input's batch != 0.
    """
    if not isinstance(requests, dict):
        requests = {name: (name, last_axis_rows) for name in requests}
    wanted = [n for n in dict.fromkeys(t for t, _ in requests.values()) if n not in data.inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(probe)
    collected: dict[str, list[np.ndarray]] = {key: [] for key in requests}
    for rows, outs in iter_batches(session, data.inputs, wanted or [session.get_outputs()[0].name],
                                   batch_size, progress):
        values = dict(zip(wanted, outs))
        values.update({k: v[rows] for k, v in data.inputs.items()})
        extra = {} if mask is None else {"keep": np.asarray(data.inputs[mask][rows]) != 0}
        for key, (name, view) in requests.items():
            collected[key].append(view(np.asarray(values[name], dtype=np.float32), **extra))
    return {k: np.concatenate(v) for k, v in collected.items()}


def minimum_rows(codebooks: int) -> int:
    """Calibration rows a node needs for `codebooks` codebooks: one per table entry, since the
    tables (codebooks x K entries per output) are fitted by regression on the rows."""
    return codebooks * K


def require_rows(node: str, rows: int, codebooks: int) -> None:
    """A one-line CalibrationError, naming the minimum, when `rows` are too few."""
    need = minimum_rows(codebooks)
    if rows < need:
        raise CalibrationError(f"node {node} gets {rows} calibration rows; {codebooks} codebook(s) need at least "
                               f"{need} ({K} per codebook): give more rows or ask for fewer codebooks")


def patches_per_image(max_rows: int, images: int) -> int:
    """Conv patches kept per calibration image, so that all images give about max_rows rows."""
    return -(-max_rows // images)


def _row_count(target, per_image: int, value: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """[rows target.rows would return for this batch], without building them."""
    if target.conv is None:
        if keep is not None and target.masked(value, keep):
            return np.array([int(keep.sum())])
        return np.array([value.size // target.D])
    OH, OW = target.conv.output_size(*value.shape[2:])
    return np.array([value.shape[0] * min(OH * OW, per_image)])


def check_enough_rows(model: onnx.ModelProto, data: CalibrationData, targets: list,
                      codebooks: Callable[[object], int], options: CalibrateOptions) -> None:
    """Fail, before any fitting, when a target (a frontend.TargetNode) would get fewer rows
    than `codebooks(target)` codebooks need, counted as target_rows keeps them (options'
    max_rows and mask). The rows per calibration sample follow from the shapes, so one batch
    of the model's run in onnxruntime counts them."""
    if not targets:
        return
    sample = data.subset(slice(0, options.batch_size))
    per_image = patches_per_image(options.max_rows, data.rows)
    counts = collect_activations(model, sample, {t.name: (t.input_name, partial(_row_count, t, per_image))
                                                 for t in targets}, options.batch_size,
                                 mask=mask_input(model, options.mask_input))
    for t in targets:
        rows = int(counts[t.name].sum()) * data.rows // sample.rows
        require_rows(t.name, min(rows, options.max_rows), codebooks(t))


def target_rows(model: onnx.ModelProto, data: CalibrationData, targets: list,
                options: CalibrateOptions, progress=None) -> dict[str, np.ndarray]:
    """Each target's input rows [n, D] over the calibration data, from a run of `model` in
    onnxruntime: a Conv's patches sampled per image, rows at masked (padding) positions left
    out, and every node's rows bounded by options.max_rows (a seeded sample, in row order)."""
    rng = np.random.default_rng(options.seed)
    per_image = patches_per_image(options.max_rows, data.rows)
    rows = collect_activations(
        model, data, {t.name: (t.input_name, partial(t.rows, rng=rng, per_image=per_image)) for t in targets},
        options.batch_size, progress=progress, mask=mask_input(model, options.mask_input))
    for name, X in rows.items():
        if len(X) > options.max_rows:
            rows[name] = X[np.sort(rng.choice(len(X), options.max_rows, replace=False))]
    return rows
