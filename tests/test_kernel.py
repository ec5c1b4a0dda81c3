"""The native LutMatMul kernel against the numpy reference, on every path, and in onnxruntime."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lutcompile
from lutcompile.ops import kernel
from lutcompile.ops.spec import DOMAIN, OP_TYPE, LutParams, apply_reference, encode_reference, scan_reference
from lutcompile.ops.spec import CONV_OP_TYPE, ConvGeometry, apply_conv_reference, im2col_reference
from conftest import AVAILABLE, MISSING_REASON  # the `path` fixture is conftest's too

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------
# helpers


def make_case(seed: int, N: int, M: int, C: int, D: int, relu: bool = False,
              tables: np.ndarray | None = None, scale: float = 0.0137, rows: np.ndarray | None = None):
    """Random data and LutParams whose thresholds are data quantiles (codes spread out); with
    `rows` [N, D], the quantiles are those rows' (e.g. a convolution's patches)."""
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((max(N, 64), D)) * rng.uniform(0.5, 3.0, D)).astype(np.float32) \
        if rows is None else rows
    split = rng.integers(0, D, size=(C, 4))
    thr = np.empty((C, 15), dtype=np.float32)
    for c in range(C):
        for level in range(4):
            col = X[:, split[c, level]]
            for i in range(1 << level):
                q = rng.uniform(0.3, 0.7)
                # "lower" picks an actual data value: rows equal to a threshold go left
                method = "lower" if (c + i) % 2 else "linear"
                thr[c, (1 << level) - 1 + i] = np.quantile(col, q, method=method)
    if tables is None:
        tables = rng.integers(0, 256, size=(M, C, 16), dtype=np.uint8)
    params = LutParams(D=D, split_dims=split, thresholds=thr, tables=tables, scale=scale,
                       offsets=rng.standard_normal(C).astype(np.float32),
                       bias=rng.standard_normal(M).astype(np.float32), relu=relu)
    return X[:N].copy(), params


def width_for(C: int) -> int:
    return 2 * C + 5  # never a multiple of C (for C > 1)


def lut_model(params: LutParams, input_type: int = TensorProto.FLOAT, drop: tuple = (),
              shape: list | None = None, op_type: str = OP_TYPE, **overrides) -> bytes:
    attrs = dict(D=params.D, M=params.M, C=params.C, K=16,
                 split_dims=[int(v) for v in params.split_dims.reshape(-1)],
                 thresholds=[float(v) for v in params.thresholds.reshape(-1)],
                 tables=numpy_helper.from_array(params.tables, "tables"),
                 scale=float(params.scale), offsets=[float(v) for v in params.offsets],
                 bias=[float(v) for v in params.bias], relu=int(params.relu),
                 source_op="MatMul")  # a descriptive extra attribute the kernel ignores
    attrs.update(overrides)
    for name in drop:
        attrs.pop(name)
    node = helper.make_node(op_type, ["X"], ["Y"], domain=DOMAIN, name="lut0", **attrs)
    out_shape = None if shape is None else [*shape[:-1], params.M]
    graph = helper.make_graph([node], "lut", [helper.make_tensor_value_info("X", input_type, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 9
    return model.SerializeToString()


def session(model: bytes, threads: int = 1, register: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 4
    if register:
        so.register_custom_ops_library(kernel.library_path())
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------
# the Python entry points, every path against the reference


def test_available_paths():
    assert AVAILABLE[0] == "scalar"
    assert set(AVAILABLE) <= set(kernel.PATHS) == set(MISSING_REASON) | {"scalar"}
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if flags:
        assert ("avx2" in AVAILABLE) == ("avx2" in flags)
        # the AVX-512 scan needs vpermb (VBMI) and vpdpbusd (VNNI) besides F/BW/VL
        want512 = all(f in flags for f in ("avx2", "avx512f", "avx512bw", "avx512vl",
                                           "avx512vbmi", "avx512_vnni"))
        assert ("avx512" in AVAILABLE) == want512


@pytest.mark.parametrize("N", [1, 31, 33, 1000])
@pytest.mark.parametrize("C", [1, 3, 16, 64])
@pytest.mark.parametrize("M", [1, 10, 17, 100])
def test_paths_match_reference(N, M, C, path):
    D = width_for(C)
    X, params = make_case(1000 * N + 10 * M + C, N, M, C, D)
    codes_ref = encode_reference(X, params.split_dims, params.thresholds)
    if N >= 33 and C >= 3:
        assert len(np.unique(codes_ref)) >= 8, "test data should spread the codes"
    for relu in (False, True):
        params.relu = relu
        y_ref = scan_reference(codes_ref, params)
        plan = kernel.Plan(params)
        codes = kernel.encode(X, params.split_dims, params.thresholds, path=path)
        assert codes.dtype == np.uint8 and codes.shape == (N, C)
        assert np.array_equal(codes, codes_ref)
        y = kernel.scan(codes_ref, params, path=path)
        assert y.dtype == np.float32 and y.shape == (N, M)
        assert np.array_equal(y, y_ref)
        assert np.array_equal(plan.apply(X, path=path), y_ref)
        assert np.array_equal(plan.encode(X, path=path), codes_ref)


@pytest.mark.parametrize("N, M, C", [
    (15, 16, 4), (16, 15, 5), (17, 17, 2), (63, 31, 17), (64, 32, 33), (65, 33, 8),
    (129, 48, 7), (200, 1, 20), (1, 16, 63),
    (1, 1, 1), (2, 31, 5), (3, 255, 16), (1, 256, 64), (3, 257, 3), (2, 600, 70), (4, 256, 64)])
def test_block_tile_and_group_edges(N, M, C, path):
    """Row counts around the 16-row groups and 64-row blocks, output counts around the 16-wide
    AVX-512 tiles (and their 4-output steps), codebook counts around the groups of 4 and the
    16-codebook encode chunks: every path equals the reference and so the scalar path, whose
    table reads share the plan's one layout. Up to 3 rows take the row path instead (scanned
    output-parallel from the code-major copy of the tables, in chunks of 256 outputs), 4 rows
    the blocks again."""
    X, params = make_case(7 * N + 3 * M + C, N, M, C, width_for(C) + 40)
    codes_ref = encode_reference(X, params.split_dims, params.thresholds)
    for relu in (False, True):
        params.relu = relu
        plan = kernel.Plan(params)
        y_ref = scan_reference(codes_ref, params)
        assert np.array_equal(plan.encode(X, path=path), codes_ref)
        assert np.array_equal(plan.scan(codes_ref, path=path), y_ref)
        y = plan.apply(X, path=path)
        assert np.array_equal(y, y_ref)
        # bit-identical to the scalar path (implied above; stated for the reader)
        assert y.tobytes() == plan.apply(X, path="scalar").tobytes()


def test_split_dims_at_the_end_of_long_rows(path):
    """Split dims at the first and the last column of long rows whose starts are not 16-byte
    aligned (D = 4099), the last one read from the last row of X."""
    N, M, C, D = 37, 20, 6, 4099
    X, params = make_case(21, N, M, C, D)
    params.split_dims[:, 0] = D - 1
    params.split_dims[:, 3] = 0
    assert np.array_equal(kernel.apply(X, params, path=path), apply_reference(X, params))


@pytest.mark.parametrize("layout", ["prefix", "duplicates", "row end", "mixed"])
@pytest.mark.parametrize("N", [1, 5, 16, 37, 200])
def test_split_dims_in_dense_windows(layout, N, path):
    """Split dims packed into 16 consecutive columns (on AVX-512 they are moved by a 16x16
    transpose, the rest one by one): a dense prefix (a pruned producer's layout), windows with
    repeated dims, a window pushed back from the end of the row, and windows mixed with lone
    dims; every row count around the 16-row groups."""
    M, C, D = 19, 24, 203
    X, params = make_case(N + len(layout), N, M, C, D)
    rng = np.random.default_rng(N)
    dims = {"prefix": np.arange(4 * C),
            "duplicates": rng.integers(40, 56, 4 * C),
            "row end": D - 1 - rng.permutation(4 * C) % 20,
            "mixed": np.concatenate([np.arange(100, 100 + 2 * C), rng.integers(0, D, 2 * C)])}[layout]
    params.split_dims = rng.permutation(dims).reshape(C, 4).astype(np.int64)
    assert np.array_equal(kernel.Plan(params).encode(X, path=path),
                          encode_reference(X, params.split_dims, params.thresholds))
    assert np.array_equal(kernel.apply(X, params, path=path), apply_reference(X, params))


@pytest.mark.parametrize("N", [70, 1])  # the blocks, and the row path's own flush
@pytest.mark.parametrize("C", [257, 258, 300, 600])
def test_uint16_flush_long_C(C, N, path):
    """C > 257 overflows 16-bit lanes unless the kernel flushes to uint32."""
    M = 11
    tables = np.full((M, C, 16), 255, dtype=np.uint8)
    X, params = make_case(C, N, M, C, 23, tables=tables, scale=1.0)
    params.offsets[:] = 0
    params.bias[:] = 0
    y = kernel.apply(X, params, path=path)
    assert np.array_equal(y, np.full((N, M), 255.0 * C, dtype=np.float32))
    # random tables and a relu epilogue, still exact
    _, params = make_case(C + 1, N, M, C, 23, relu=True)
    y_ref = apply_reference(X, params)
    assert np.array_equal(kernel.apply(X, params, path=path), y_ref)
    codes = kernel.encode(X, params.split_dims, params.thresholds, path=path)
    assert np.array_equal(kernel.scan(codes, params, path=path), y_ref)


def test_special_values(path):
    """NaN goes left, +-inf and -0.0 compare like IEEE floats, overflow rounds to inf."""
    X, params = make_case(7, 200, 13, 9, 12, relu=True)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, X.size, 300)
    X.reshape(-1)[idx[:100]] = np.nan
    X.reshape(-1)[idx[100:150]] = np.inf
    X.reshape(-1)[idx[150:200]] = -np.inf
    X.reshape(-1)[idx[200:]] = -0.0
    params.thresholds[0, :] = 0.0
    params.thresholds[1, :] = np.inf
    params.thresholds[2, :] = np.nan
    codes_ref = encode_reference(X, params.split_dims, params.thresholds)
    y_ref = apply_reference(X, params)
    assert np.array_equal(kernel.encode(X, params.split_dims, params.thresholds, path=path), codes_ref)
    assert np.array_equal(kernel.apply(X, params, path=path), y_ref)
    # float32 overflow in the epilogue: acc * scale = inf
    params.scale = 3.0e38
    params.relu = False
    with np.errstate(over="ignore"):
        y_ref = apply_reference(X, params)
    assert np.isinf(y_ref).any()
    assert np.array_equal(kernel.apply(X, params, path=path), y_ref)


def test_apply_shapes_and_empty(path):
    X, params = make_case(3, 10, 17, 4, 9)
    X3 = X.reshape(2, 5, 9)
    y = kernel.apply(X3, params, path=path)
    assert y.shape == (2, 5, 17)
    assert np.array_equal(y, apply_reference(X3, params))
    assert np.array_equal(kernel.apply(X[0], params, path=path), apply_reference(X[:1], params)[0])
    assert kernel.apply(np.zeros((0, 9), np.float32), params, path=path).shape == (0, 17)
    assert kernel.encode(np.zeros((0, 9), np.float32), params.split_dims, params.thresholds,
                         path=path).shape == (0, 4)
    assert kernel.scan(np.zeros((0, 4), np.uint8), params, path=path).shape == (0, 17)
    # a non-contiguous view is copied, not misread
    Xf = np.asfortranarray(X)
    assert np.array_equal(kernel.apply(Xf, params), apply_reference(X, params))


@pytest.mark.bad_input
def test_python_validation_errors():
    X, params = make_case(4, 10, 5, 3, 7)
    with pytest.raises(ValueError, match="float32"):
        kernel.apply(X.astype(np.float64), params)
    with pytest.raises(ValueError, match="float32"):
        kernel.encode(X.astype(np.int32), params.split_dims, params.thresholds)
    with pytest.raises(ValueError, match="D=7"):
        kernel.apply(X[:, :6], params)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        kernel.scan(np.full((2, 3), 16, np.uint8), params)
    with pytest.raises(ValueError, match="C=3"):
        kernel.scan(np.zeros((2, 4), np.uint8), params)
    with pytest.raises(ValueError, match="split_dims"):
        kernel.encode(X, np.full((3, 4), 7), params.thresholds)
    with pytest.raises(ValueError, match="thresholds"):
        kernel.encode(X, params.split_dims, params.thresholds[:, :14])
    bad = LutParams(D=7, split_dims=params.split_dims, thresholds=params.thresholds,
                    tables=params.tables, scale=1.0, offsets=params.offsets,
                    bias=np.array([0, 0, np.nan, 0, 0], np.float32))
    with pytest.raises(ValueError, match="bias"):
        kernel.Plan(bad)
    with pytest.raises(ValueError, match="unknown kernel path"):
        kernel.apply(X, params, path="sse9")


def test_env_var_auto_and_unknown(monkeypatch):
    monkeypatch.delenv("LUTCOMPILE_KERNEL_PATH", raising=False)
    assert kernel.resolve_path() == AVAILABLE[-1]
    X, params = make_case(5, 40, 6, 5, 11)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", "turbo")
    with pytest.raises(kernel.KernelPathError, match="LUTCOMPILE_KERNEL_PATH"):
        kernel.apply(X, params)


def test_env_var_selects_path(path, monkeypatch):
    X, params = make_case(5, 40, 6, 5, 11)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    assert kernel.resolve_path() == path
    assert np.array_equal(kernel.apply(X, params), apply_reference(X, params))


@pytest.mark.parametrize("missing", sorted(MISSING_REASON))
def test_env_var_refuses_a_missing_path(missing, monkeypatch):
    """On a CPU without a SIMD path, asking for it (variable or argument) is an error."""
    if missing in AVAILABLE:
        pytest.skip(f"this CPU has the {missing} path: nothing to refuse")
    X, params = make_case(5, 40, 6, 5, 11)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", missing)
    with pytest.raises(kernel.KernelPathError, match="does not support"):
        kernel.apply(X, params)
    with pytest.raises(kernel.KernelPathError):
        kernel.apply(X, params, path=missing)


# ---------------------------------------------------------------------------------------
# onnxruntime


def test_library_path():
    path = Path(kernel.library_path())
    assert path.is_absolute() and path.is_file() and path.name.startswith("_lutops")
    assert path.parent == Path(lutcompile.__file__).resolve().parent  # beside the package root


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("relu", [False, True])
def test_ort_session(threads, relu):
    X, params = make_case(11, 1000, 100, 64, 37, relu=relu)
    sess = session(lut_model(params), threads)
    y = sess.run(None, {"X": X})[0]
    assert y.dtype == np.float32 and y.shape == (1000, 100)
    assert np.array_equal(y, apply_reference(X, params))
    X3 = X[:10].reshape(2, 5, 37)
    y3 = sess.run(None, {"X": X3})[0]
    assert y3.shape == (2, 5, 100)
    assert np.array_equal(y3, apply_reference(X3, params))
    assert sess.run(None, {"X": X[0]})[0].shape == (100,)
    assert sess.run(None, {"X": X[:0]})[0].shape == (0, 100)


def test_ort_thread_count_invariance():
    """N=1000 rows with M*C = 6400 lookups each are split into 16 row tasks; run on 1 to 4
    threads the outputs are identical, and equal to the reference."""
    X, params = make_case(18, 1000, 100, 64, 200, relu=True)
    y_ref = apply_reference(X, params)
    model = lut_model(params)
    for threads in (1, 2, 3, 4):
        y = session(model, threads).run(None, {"X": X})[0]
        assert np.array_equal(y, y_ref), threads


def test_ort_every_path_and_long_C(path, monkeypatch):
    X, params = make_case(12, 333, 9, 300, 41, relu=True)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)  # read when the kernel is created
    assert np.array_equal(session(lut_model(params), 2).run(None, {"X": X})[0], apply_reference(X, params))


def test_ort_unknown_path_variable(monkeypatch):
    _, params = make_case(12, 8, 9, 3, 41)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", "turbo")
    with pytest.raises(Exception, match="LUTCOMPILE_KERNEL_PATH"):
        session(lut_model(params))


@pytest.mark.parametrize("C, threads, strides", [(6, 1, (1, 1)), (6, 3, (2, 1)), (300, 2, (1, 2))])
def test_ort_conv_every_path(C, threads, strides, path, monkeypatch):
    """LutConv in onnxruntime equals the reference on each path: three images of 7 or 4 tiles of
    64 positions, claimed by the thread pool's workers (one scratch buffer each, reused from tile
    to tile), stride 1 along x (on AVX-512 the gather copies runs) or 2, and C = 300, whose
    codes outgrow the kernel's stack buffer and live in the worker's scratch."""
    g = ConvGeometry(in_channels=5, kernel=(3, 2), strides=strides, pads=(1, 0, 2, 1), dilations=(2, 1))
    X = np.random.default_rng(C + threads).standard_normal((3, 5, 19, 23)).astype(np.float32)
    patches = im2col_reference(X, g)
    _, params = make_case(C, len(patches), 13, C, g.D, relu=True, rows=patches)
    model = lut_model(params, op_type=CONV_OP_TYPE, in_channels=g.in_channels, kernel_shape=list(g.kernel),
                      strides=list(g.strides), pads=list(g.pads), dilations=list(g.dilations))
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    y = session(model, threads).run(None, {"X": X})[0]
    want = apply_conv_reference(X, params, g)
    assert y.shape == want.shape and y.tobytes() == want.tobytes()


def test_ort_fresh_process(tmp_path):
    """The library works in a process that never imports lutcompile."""
    X, params = make_case(13, 77, 19, 8, 21, relu=True)
    (tmp_path / "m.onnx").write_bytes(lut_model(params, shape=["n", 21]))
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", apply_reference(X, params))
    script = textwrap.dedent("""
        import sys
        import numpy as np, onnx, onnxruntime as ort
        lib, folder = sys.argv[1], sys.argv[2]
        onnx.checker.check_model(onnx.load(folder + "/m.onnx"))  # onnx imported and used
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.register_custom_ops_library(lib)
        sess = ort.InferenceSession(folder + "/m.onnx", so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"X": np.load(folder + "/x.npy")})[0]
        assert np.array_equal(y, np.load(folder + "/y.npy")), "output differs"
        assert not any(m.startswith("lutcompile") for m in sys.modules), "lutcompile was imported"
        print("fresh-ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script, kernel.library_path(), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fresh-ok" in res.stdout


@pytest.mark.bad_input
def test_ort_input_type_errors():
    X, params = make_case(14, 8, 5, 3, 7)
    sess = session(lut_model(params))
    for bad in (X.astype(np.float64), X.astype(np.int32)):
        with pytest.raises(Exception, match="float") as info:
            sess.run(None, {"X": bad})
        assert "tensor(float)" in str(info.value)
    # a graph whose input is double: onnxruntime's type check rejects the node at load
    with pytest.raises(Exception) as info:
        session(lut_model(params, input_type=TensorProto.DOUBLE))
    msg = str(info.value)
    assert "LutMatMul" in msg and "double" in msg
    # wrong last dimension and rank 0: our kernel's errors
    with pytest.raises(Exception, match="last dimension 6, expected D=7"):
        sess.run(None, {"X": X[:, :6].copy()})
    with pytest.raises(Exception, match="rank >= 1"):
        sess.run(None, {"X": np.array(1.0, dtype=np.float32)})


def test_ort_without_library():
    _, params = make_case(15, 8, 5, 3, 7)
    with pytest.raises(Exception) as info:
        session(lut_model(params), register=False)
    assert "LutMatMul" in str(info.value) or "ai.lutcompile" in str(info.value)


def _tables(M, C, K=16, dtype=np.uint8):
    return numpy_helper.from_array(np.zeros((M, C, K), dtype=dtype), "tables")


@pytest.mark.parametrize("overrides, drop, needle", [
    (dict(split_dims=[0] * 11 + [7]), (), "split_dims"),
    (dict(split_dims=[-1] + [0] * 11), (), "split_dims"),
    (dict(split_dims=[0] * 8), (), "split_dims"),
    (dict(tables=_tables(5, 2)), (), "tables"),
    (dict(tables=numpy_helper.from_array(np.zeros(240, np.uint8), "tables")), (), "tables"),
    (dict(tables=_tables(5, 3, dtype=np.int8)), (), "tables"),
    (dict(tables=[1, 2, 3]), (), "tables"),
    (dict(scale=float("nan")), (), "scale"),
    (dict(scale=0.0), (), "scale"),
    (dict(scale=float("inf")), (), "scale"),
    (dict(K=8, tables=_tables(5, 3, K=8)), (), "'K'"),
    (dict(K=8), (), "'K'"),
    (dict(thresholds=[0.0] * 44), (), "thresholds"),
    (dict(offsets=[0.0, float("nan"), 0.0]), (), "offsets"),
    (dict(bias=[0.0] * 4), (), "bias"),
    (dict(bias=[0.0, 0.0, float("inf"), 0.0, 0.0]), (), "bias"),
    (dict(relu=2), (), "relu"),
    (dict(C=0), (), "'C'"),
    (dict(D=0), (), "'D'"),
    ({}, ("tables",), "tables"),
    ({}, ("scale",), "scale"),
    ({}, ("split_dims",), "split_dims"),
    ({}, ("relu",), "relu"),
])
@pytest.mark.bad_input
def test_ort_malformed_attributes(overrides, drop, needle):
    _, params = make_case(16, 8, 5, 3, 7)
    with pytest.raises(Exception) as info:
        session(lut_model(params, drop=drop, **overrides))
    msg = str(info.value)
    assert "LutMatMul" in msg and needle in msg, msg


# ---------------------------------------------------------------------------------------
# ort_abi.h against the real runtime, from C

SMOKE_C = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ort_abi.h"

static const OrtApi *api;
#define CHECK(expr) do { OrtStatus *s_ = (expr); if (s_) { \
    fprintf(stderr, "%s failed: %s\n", #expr, api->GetErrorMessage(s_)); \
    api->ReleaseStatus(s_); return 10; } } while (0)
#define EXPECT(cond) do { if (!(cond)) { fprintf(stderr, "expectation failed: %s\n", #cond); \
    return 11; } } while (0)

/* argv: libonnxruntime lutops model x.bin N D M y.bin threads */
int main(int argc, char **argv) {
    if (argc != 10) return 2;
    void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!h) { fprintf(stderr, "dlopen: %s\n", dlerror()); return 3; }
    OrtGetApiBaseFn get_base = (OrtGetApiBaseFn)dlsym(h, "OrtGetApiBase");
    if (!get_base) return 4;
    const OrtApiBase *base = get_base();
    printf("version=%s\n", base->GetVersionString());
    api = base->GetApi(ORT_API_VERSION);
    if (!api) return 5;

    /* [0] [1] [2] [93] */
    OrtStatus *st = api->CreateStatus(ORT_NO_SUCHFILE, "probe message");
    EXPECT(api->GetErrorCode(st) == ORT_NO_SUCHFILE);
    EXPECT(strcmp(api->GetErrorMessage(st), "probe message") == 0);
    api->ReleaseStatus(st);
    /* [254] */
    const char *info = api->GetBuildInfoString();
    printf("buildinfo=%.40s\n", info);
    EXPECT(strncmp(info, "ORT Build Info", 14) == 0);

    /* tensors: [78] [48] [50] [65] [60] [61] [62] [64] [51] [99] [96] */
    OrtAllocator *alloc = NULL;
    CHECK(api->GetAllocatorWithDefaultOptions(&alloc));
    int64_t shape[3] = {2, 3, 5};
    OrtValue *v = NULL;
    CHECK(api->CreateTensorAsOrtValue(alloc, shape, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16, &v));
    int is_tensor = 0;
    CHECK(api->IsTensor(v, &is_tensor));
    EXPECT(is_tensor == 1);
    OrtTensorTypeAndShapeInfo *ti = NULL;
    CHECK(api->GetTensorTypeAndShape(v, &ti));
    ONNXTensorElementDataType et;
    CHECK(api->GetTensorElementType(ti, &et));
    EXPECT(et == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16);
    size_t rank = 0, count = 0;
    CHECK(api->GetDimensionsCount(ti, &rank));
    EXPECT(rank == 3);
    int64_t dims[3] = {0, 0, 0};
    CHECK(api->GetDimensions(ti, dims, 3));
    EXPECT(dims[0] == 2 && dims[1] == 3 && dims[2] == 5);
    CHECK(api->GetTensorShapeElementCount(ti, &count));
    EXPECT(count == 30);
    void *data = NULL;
    CHECK(api->GetTensorMutableData(v, &data));
    EXPECT(data != NULL);
    memset(data, 0, 30 * 2);
    api->ReleaseTensorTypeAndShapeInfo(ti);
    api->ReleaseValue(v);

    /* a session running LutMatMul: [3] [10] [24] [228] [7] [69] [49] [9] [94] [95] [100] [92] */
    long N = atol(argv[5]), D = atol(argv[6]), M = atol(argv[7]);
    float *x = malloc(sizeof(float) * N * D);
    FILE *f = fopen(argv[4], "rb");
    if (!f || fread(x, sizeof(float), N * D, f) != (size_t)(N * D)) return 6;
    fclose(f);
    OrtEnv *env = NULL;
    CHECK(api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "lutcompile-smoke", &env));
    OrtSessionOptions *so = NULL;
    CHECK(api->CreateSessionOptions(&so));
    CHECK(api->SetIntraOpNumThreads(so, atoi(argv[9])));
    CHECK(api->RegisterCustomOpsLibrary_V2(so, argv[2]));
    OrtSession *sess = NULL;
    CHECK(api->CreateSession(env, argv[3], so, &sess));
    OrtMemoryInfo *mi = NULL;
    CHECK(api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &mi));
    int64_t xshape[2] = {N, D};
    OrtValue *xin = NULL;
    CHECK(api->CreateTensorWithDataAsOrtValue(mi, x, sizeof(float) * N * D, xshape, 2,
                                              ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &xin));
    const char *in_names[1] = {"X"}, *out_names[1] = {"Y"};
    const OrtValue *ins[1] = {xin};
    OrtValue *yout = NULL;
    CHECK(api->Run(sess, NULL, in_names, ins, 1, out_names, 1, &yout));
    CHECK(api->GetTensorTypeAndShape(yout, &ti));
    CHECK(api->GetDimensions(ti, dims, 2));
    EXPECT(dims[0] == N && dims[1] == M);
    api->ReleaseTensorTypeAndShapeInfo(ti);
    float *y = NULL;
    CHECK(api->GetTensorMutableData(yout, (void **)&y));
    f = fopen(argv[8], "wb");
    if (!f || fwrite(y, sizeof(float), N * M, f) != (size_t)(N * M)) return 7;
    fclose(f);
    api->ReleaseValue(yout);
    api->ReleaseValue(xin);
    api->ReleaseMemoryInfo(mi);
    api->ReleaseSession(sess);
    api->ReleaseSessionOptions(so);
    api->ReleaseEnv(env);
    free(x);
    printf("smoke-ok\n");
    return 0;
}
"""


def _libonnxruntime() -> str | None:
    capi = Path(ort.__file__).resolve().parent / "capi"
    found = sorted(glob.glob(str(capi / "libonnxruntime.so*")))
    return found[0] if found else None


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.skipif(_libonnxruntime() is None, reason="wheel has no libonnxruntime.so")
def test_ort_abi_from_c(tmp_path):
    """Compile a C program against ort_abi.h only; drive libonnxruntime through every slot
    the header declares (status, tensors, session, custom-op registration) and run the op."""
    src = tmp_path / "smoke.c"
    src.write_text(SMOKE_C)
    exe = tmp_path / "smoke"
    subprocess.run(["gcc", "-std=gnu11", "-O1", "-Wall", "-Werror", f"-I{REPO / 'custom_ops'}",
                    str(src), "-o", str(exe), "-ldl"], check=True, capture_output=True)
    X, params = make_case(17, 129, 23, 20, 30, relu=True)
    (tmp_path / "m.onnx").write_bytes(lut_model(params))
    X.tofile(tmp_path / "x.bin")
    res = subprocess.run([str(exe), _libonnxruntime(), kernel.library_path(), str(tmp_path / "m.onnx"),
                          str(tmp_path / "x.bin"), "129", "30", "23", str(tmp_path / "y.bin"), "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "smoke-ok" in res.stdout and f"version={ort.__version__}" in res.stdout
    y = np.fromfile(tmp_path / "y.bin", dtype=np.float32).reshape(129, 23)
    assert np.array_equal(y, apply_reference(X, params))


# ---------------------------------------------------------------------------------------
# RegisterCustomOps against the real runtime and against a runtime whose ABI does not match

REGISTER_SCRIPT = r"""
import ctypes, sys

ORT_API_VERSION = 17
libonnxruntime, lutops, case = sys.argv[1:4]
GET_API = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)


class OrtApiBase(ctypes.Structure):
    _fields_ = [("GetApi", ctypes.c_void_p), ("GetVersionString", ctypes.c_void_p)]


runtime = ctypes.CDLL(libonnxruntime)
runtime.OrtGetApiBase.restype = ctypes.POINTER(OrtApiBase)
real_base = runtime.OrtGetApiBase().contents
real_get_api = GET_API(real_base.GetApi)
slots = ctypes.cast(real_get_api(ORT_API_VERSION), ctypes.POINTER(ctypes.c_void_p))
get_error_message = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(slots[2])  # [2]
release_status = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(slots[93])  # [93]

lib = ctypes.CDLL(lutops)
lib.RegisterCustomOps.restype = ctypes.c_void_p
lib.RegisterCustomOps.argtypes = [ctypes.c_void_p, ctypes.POINTER(OrtApiBase)]


def fake_base(get_api):
    # the real version string, GetApi answered by get_api(version); the callback stays alive
    callback = GET_API(get_api)
    base = OrtApiBase(ctypes.cast(callback, ctypes.c_void_p).value, real_base.GetVersionString)
    base.keep = callback
    return base


def register(options, base):
    status = lib.RegisterCustomOps(options, ctypes.byref(base))
    if status is None:
        return None
    message = get_error_message(status).decode()
    release_status(status)
    return message


if case == "no-api":  # no version-17 table; every other version is the real runtime's
    message = register(None, fake_base(lambda v: None if v == ORT_API_VERSION else real_get_api(v)))
elif case == "bad-table":  # a version-17 table whose GetErrorCode (slot 1) gives the wrong code
    wrong_code = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(lambda status: 0)
    table = (ctypes.c_void_p * 3)(slots[0], ctypes.cast(wrong_code, ctypes.c_void_p).value, slots[2])
    message = register(None, fake_base(lambda v: ctypes.addressof(table) if v == ORT_API_VERSION
                                       else real_get_api(v)))
elif case == "no-api-at-all":  # not even version 1: no way to make a status
    message = register(None, fake_base(lambda v: None))
else:  # "real": the real runtime and session options made by its CreateSessionOptions [10]
    options = ctypes.c_void_p()
    assert ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(slots[10])(ctypes.byref(options)) is None
    message = register(options, real_base)
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(slots[100])(options)  # ReleaseSessionOptions [100]
print("status:", "NULL" if message is None else message)
"""


def _register(case: str) -> subprocess.CompletedProcess:
    """REGISTER_SCRIPT in a fresh process (a second onnxruntime, loaded by ctypes, stays out of this one)."""
    res = subprocess.run([sys.executable, "-c", REGISTER_SCRIPT, _libonnxruntime(), kernel.library_path(), case],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


@pytest.mark.skipif(_libonnxruntime() is None, reason="wheel has no libonnxruntime.so")
@pytest.mark.parametrize("case, needles", [
    ("no-api", ["does not provide C API version 17"]),
    ("bad-table", ["C API version 17 table", "does not match"])])
def test_register_abi_mismatch_is_an_error(case, needles):
    """RegisterCustomOps answers a runtime without the version-17 API, or with a table whose
    first slots are not where ort_abi.h says, with an error status (made through GetApi(1))
    naming lutcompile, the API version and the runtime's version, instead of success."""
    line = _register(case).stdout.strip()
    assert line.startswith("status: lutcompile: ") and f"onnxruntime {ort.__version__}" in line, line
    for needle in needles:
        assert needle in line, line


@pytest.mark.skipif(_libonnxruntime() is None, reason="wheel has no libonnxruntime.so")
def test_register_success_and_no_api_at_all():
    """Success is a NULL status; a base that serves no API at all (no status can be made) gets
    NULL too, and the message on stderr."""
    assert _register("real").stdout.strip() == "status: NULL"
    res = _register("no-api-at-all")
    assert res.stdout.strip() == "status: NULL"
    assert "lutcompile: onnxruntime" in res.stderr and "version 17" in res.stderr
