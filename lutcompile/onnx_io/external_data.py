"""Models over protobuf's 2 GB limit: tensors stored as external data stay outside the proto.

protobuf can neither serialise nor copy a message over 2 GB, and onnx.checker, shape
inference and onnx-graphsurgeon all do one or the other. So a model's externally stored
initializers are never loaded into its proto: each stays a small stub (data_location
EXTERNAL, no bytes) tagged with a key into this module's registry of read-only memory-mapped
arrays. Every stage then works on a proto of a few kilobytes:

- the stages read values with `tensor_array` (the frontend's weights, the fine-tune
  program's parameters);
- onnxruntime receives the arrays through `SessionOptions.add_external_initializers`, with no
  temporary file;
- the fine-tune pass replaces a trained array with `attach`;
- export writes every attached array to one data file beside the output (`write_data_file`);
- `released_after` frees, at the end of a compile, the arrays that only its intermediate
  models referred to (every fine-tune write-back attaches new ones).
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import numpy_helper

KEY = "lutcompile.array"
ALIGNMENT = 4096  # data file offsets, so onnxruntime can memory-map each tensor
_ARRAYS: dict[str, np.ndarray] = {}


class ExternalDataError(ValueError):
    """A tensor's external data is missing, outside the model's folder, or the wrong size."""


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_attached(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and KEY in _entries(tensor)


def attach(tensor: onnx.TensorProto, array: np.ndarray, location: str | None = None) -> None:
    """Make `tensor` a stub whose values are `array` (same shape and dtype as the tensor)."""
    expected = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if array.dtype != expected or tuple(array.shape) != tuple(tensor.dims):
        raise ValueError(f"tensor '{tensor.name}' is {expected}{list(tensor.dims)}, "
                         f"not {array.dtype}{list(array.shape)}")
    location = location or _entries(tensor).get("location") or tensor.name
    key = uuid.uuid4().hex
    _ARRAYS[key] = array
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), (KEY, key)):
        entry = tensor.external_data.add()
        entry.key, entry.value = k, v


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, whether stored in the proto or attached here (read-only then)."""
    if is_attached(tensor):
        key = _entries(tensor)[KEY]
        if key not in _ARRAYS:
            raise ExternalDataError(f"tensor '{tensor.name}' refers to data this process no longer holds")
        return _ARRAYS[key]
    return numpy_helper.to_array(tensor)


def held_arrays() -> int:
    """How many arrays the registry holds (for tests and leak checks)."""
    return len(_ARRAYS)


@contextmanager
def released_after(keep: Callable[[], Iterable[onnx.ModelProto]]):
    """Release, when the block ends, the arrays attached inside it that none of the models
    `keep()` returns then refers to (on an exception, keep() may return what survives)."""
    before = set(_ARRAYS)
    try:
        yield
    finally:
        live = {_entries(t)[KEY] for model in keep() for t in attached_initializers(model)}
        for key in set(_ARRAYS) - before - live:
            del _ARRAYS[key]


def map_file(tensor: onnx.TensorProto, folder: str) -> np.ndarray:
    """Memory-map a tensor's external data, checking that it lies inside `folder` and that the
    file holds exactly the bytes its dims and offset/length promise."""
    entries = _entries(tensor)
    location = entries.get("location", "")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, location))
    if not location or os.path.isabs(location) or os.path.commonpath([root, path]) != root:
        raise ExternalDataError(f"external data '{location}' of tensor '{tensor.name}' lies outside the model's folder")
    if not os.path.isfile(path):
        raise ExternalDataError(f"external data file '{location}' of tensor '{tensor.name}' not found")
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    except (KeyError, TypeError) as exc:
        raise ExternalDataError(f"tensor '{tensor.name}' has a data type external data cannot hold") from exc
    if dtype.kind not in "biuf":
        raise ExternalDataError(f"tensor '{tensor.name}' of type {dtype} cannot be memory-mapped")
    shape = tuple(int(d) for d in tensor.dims)
    if any(d < 0 for d in shape):
        raise ExternalDataError(f"tensor '{tensor.name}' has negative dims {list(shape)}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    try:
        offset = int(entries.get("offset", 0))
        length = int(entries.get("length", nbytes))
    except ValueError as exc:
        raise ExternalDataError(f"tensor '{tensor.name}' has a malformed offset or length") from exc
    size = os.path.getsize(path)
    if length != nbytes or offset < 0 or offset + nbytes > size:
        raise ExternalDataError(
            f"external data of tensor '{tensor.name}' ({list(shape)} {dtype}, {nbytes} bytes at offset "
            f"{offset}, length {length}) does not fit '{location}' ({size} bytes)")
    if nbytes == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def attached_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if is_attached(t)]


def _as_graph_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with each attached initializer turned into a typed graph input. onnx.checker
    resolves an in-memory stub's location against the working directory, and shape inference
    never needs these values (they are weights, not shapes), so both run on this copy."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    graph = light.graph
    listed = {i.name for i in graph.input}
    kept = [t for t in graph.initializer if not is_attached(t)]
    for t in attached_initializers(light):
        if t.name not in listed:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return light


def check_model(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(_as_graph_inputs(model) if attached_initializers(model) else model)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference on a model that may hold attached initializers (a new model)."""
    if not attached_initializers(model):
        return onnx.shape_inference.infer_shapes(model)
    inferred = onnx.shape_inference.infer_shapes(_as_graph_inputs(model))
    graph = inferred.graph
    inputs = [i for i in model.graph.input]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.initializer[:]
    graph.initializer.extend(model.graph.initializer)
    return inferred


def add_to_session(model: onnx.ModelProto, options) -> list:
    """Hand the model's attached arrays to onnxruntime; the returned OrtValues must outlive
    the session's creation (onnxruntime copies them then)."""
    import onnxruntime as ort

    tensors = attached_initializers(model)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor_array(t))) for t in tensors]
    if tensors:
        options.add_external_initializers([t.name for t in tensors], values)
    return values


def write_data_file(model: onnx.ModelProto, data_path: str, location: str) -> onnx.ModelProto:
    """Write the attached arrays to `data_path` (4 KiB aligned) and return a copy of `model`
    whose stubs point there under `location`, as ordinary ONNX external data."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    with open(data_path, "wb") as f:
        for t in attached_initializers(out):
            array = np.ascontiguousarray(tensor_array(t)).astype(np.dtype(tensor_array(t).dtype).newbyteorder("<"),
                                                                   copy=False)
            offset = -(-f.tell() // ALIGNMENT) * ALIGNMENT
            f.seek(offset)
            f.write(memoryview(array.reshape(-1)).cast("B"))
            del t.external_data[:]
            for k, v in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
    return out
