"""Serving from a non-Python host: custom_ops/host/lut_host.c, built with the system C compiler,
loads libonnxruntime from the onnxruntime wheel (through ort_abi.h only), registers lutcompile's
library and runs compiled models; its outputs must equal the Python session's bit for bit."""
from __future__ import annotations

import glob
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lutcompile

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
HOST_C = REPO / "custom_ops" / "host" / "lut_host.c"
CC = shutil.which("cc") or shutil.which("gcc")
ROWS = 100  # a batch the size of no codebook or block: the models' batch dimension is symbolic


def _libonnxruntime() -> str | None:
    found = sorted(glob.glob(str(Path(ort.__file__).resolve().parent / "capi" / "libonnxruntime.so*")))
    return found[0] if found else None


pytestmark = [pytest.mark.skipif(CC is None, reason="needs a C compiler (cc or gcc)"),
              pytest.mark.skipif(_libonnxruntime() is None, reason="the onnxruntime wheel has no libonnxruntime.so")]


# ---- the host's tensor file (format in the comment at the top of lut_host.c) ----

def write_tensors(path: Path, arrays: list[np.ndarray]) -> None:
    with open(path, "wb") as f:
        f.write(b"LUT1" + struct.pack("<I", len(arrays)))
        for a in arrays:
            a = np.ascontiguousarray(a, dtype="<f4")
            f.write(struct.pack("<I", a.ndim) + np.asarray(a.shape, dtype="<i8").tobytes() + a.tobytes())


def read_tensors(path: Path) -> list[np.ndarray]:
    raw = path.read_bytes()
    assert raw[:4] == b"LUT1"
    (count,), at, out = struct.unpack_from("<I", raw, 4), 8, []
    for _ in range(count):
        (rank,) = struct.unpack_from("<I", raw, at)
        shape = tuple(int(d) for d in np.frombuffer(raw, "<i8", rank, at + 4))
        at += 4 + 8 * rank
        n = int(np.prod(shape))
        out.append(np.frombuffer(raw, "<f4", n, at).reshape(shape))
        at += 4 * n
    assert at == len(raw), "bytes after the last tensor"
    return out


# ---- building and running ----

@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Path:
    """lut_host, compiled exactly as the comment at the top of lut_host.c says."""
    exe = tmp_path_factory.mktemp("c_host") / "lut_host"
    res = subprocess.run([CC, "-O2", "-std=c11", "-I", str(REPO / "custom_ops"), str(HOST_C), "-ldl",
                          "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return exe


def run_host(host: Path, model: Path, inputs: Path, outputs: Path,
             ort_library: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(host), "-t", "1", ort_library or _libonnxruntime(), lutcompile.library_path(),
                           str(model), str(inputs), str(outputs)], capture_output=True, text=True, timeout=120)


def python_outputs(model: Path, arrays: list[np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(lutcompile.library_path())
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), arrays)})


def assert_host_matches_python(host: Path, model: Path, arrays: list[np.ndarray], tmp: Path) -> None:
    write_tensors(tmp / "in.bin", arrays)
    res = run_host(host, model, tmp / "in.bin", tmp / "out.bin")
    assert res.returncode == 0, res.stdout + res.stderr
    got, want = read_tensors(tmp / "out.bin"), python_outputs(model, arrays)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert w.dtype == np.float32 and g.shape == w.shape
        assert g.tobytes() == w.tobytes(), f"max |diff| {np.max(np.abs(g - w))}"


def batch_rows(model: Path) -> int:
    """The model's batch size when its first input fixes one, else ROWS."""
    dim = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else ROWS


# ---- compiled models: the fastest fit (ridge tables, contiguous groups), since only serving is tested ----

def _compile(tmp_path_factory, name: str, calibration, lookup_ops: set[str]) -> Path:
    out = tmp_path_factory.mktemp(f"c_host_{name}") / "fast.onnx"
    lutcompile.compile_model(str(MODELS / f"{name}.onnx"), str(out), calibration, codebooks=8, finetune=False,
                             table_loss="ridge", partition="contiguous")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert lookup_ops <= ops, ops
    return out


# calibration subsets keep the compiles to seconds: 8 codebooks need 128 rows (16 each) per Gemm node

@pytest.fixture(scope="module")
def mnist_fast(tmp_path_factory) -> Path:
    calib = np.load(MODELS / "mnist_calib.npz")["input"][:256]
    return _compile(tmp_path_factory, "mnist_mlp", {"input": calib}, {"LutMatMul"})


@pytest.fixture(scope="module")
def fashion_fast(fast_cnn) -> Path:
    out = fast_cnn[1]
    assert {"LutConv", "LutMatMul"} <= {n.op_type for n in onnx.load(str(out)).graph.node}
    return out


@pytest.mark.parametrize("name, test_data", [("mnist_fast", "mnist_test.npz"), ("fashion_fast", "fashion_test.npz")])
def test_host_matches_python_session(request, host, tmp_path, name, test_data):
    model = request.getfixturevalue(name)
    x = np.load(MODELS / test_data)["input"]
    assert_host_matches_python(host, model, [x[:batch_rows(model)]], tmp_path)


def test_host_several_inputs_and_outputs(host, tmp_path):
    """Inputs matched by position, every output written in order (plain ops, symbolic batch)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["product"]),
         helper.make_node("ReduceSum", ["a"], ["total"], keepdims=0)], "two_in_three_out",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("sum", "product", "total")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((5, 3), dtype=np.float32), rng.standard_normal(3, dtype=np.float32)
    assert_host_matches_python(host, tmp_path / "m.onnx", [a, b], tmp_path)


# ---- bad input: one line on stderr, a non-zero exit, no output file ----

def _bad_files(tmp: Path, x: np.ndarray) -> dict[str, Path]:
    write_tensors(tmp / "good.bin", [x])
    good = (tmp / "good.bin").read_bytes()
    files = {"short": good[:-4], "long": good + b"\0" * 4, "header": good[:10], "magic": b"NPY1" + good[4:]}
    for case, raw in files.items():
        (tmp / f"{case}.bin").write_bytes(raw)
    write_tensors(tmp / "shape.bin", [x[:, :-1]])
    write_tensors(tmp / "count.bin", [x, x])
    return {case: tmp / f"{case}.bin" for case in [*files, "shape", "count"]}


@pytest.mark.bad_input
@pytest.mark.parametrize("case, needle", [
    ("short", "cut short"), ("long", "too many"), ("header", "cut off"), ("magic", "not a tensor file"),
    ("shape", "the model takes [?, 784]"), ("count", "holds 2 tensor(s) but the model has 1 input(s)")])
def test_host_rejects_bad_input_file(host, mnist_fast, tmp_path, case, needle):
    bad = _bad_files(tmp_path, np.load(MODELS / "mnist_test.npz")["input"][:8])[case]
    res = run_host(host, mnist_fast, bad, tmp_path / "out.bin")
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lut_host: error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.bad_input
def test_host_reports_missing_onnxruntime(host, mnist_fast, tmp_path):
    write_tensors(tmp_path / "in.bin", [np.zeros((1, 784), np.float32)])
    res = run_host(host, mnist_fast, tmp_path / "in.bin", tmp_path / "out.bin",
                   ort_library=str(tmp_path / "libonnxruntime.so.missing"))
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "cannot load onnxruntime" in res.stderr, res.stderr
