"""SpnMatMul and SpnConv with uint8 activations (`activations = 1`, docs/lutmatmul.md): each
product's input rows quantised to 8 bits on the fly, integer sums, the float dequantisation.
Every kernel path (scalar, AVX2 maddubs, AVX-512 vpdpbusd) equals spn.kernel_reference bit for
bit on awkward shapes and row counts, special rows (NaN, inf, constant, overflowing spans, exact
half steps), real activations and two SpnConv geometries; bad attribute values are refused."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnxruntime as ort
import pytest

import lutcompile
from lutcompile.ops import spn
from lutcompile.ops.spec import ConvGeometry

from test_spn import _corrupt, random_spn, run_spn, spn_conv_model, spn_node_model

ROW_COUNTS = (0, 1, 2, 3, 4, 5, 17, 64, 70, 257)  # around the 4-row tiles, 16-row blocks, 64-row tasks


def uint8_spn(rng, D: int, M: int, R: int, zeros: float = 0.4) -> spn.SpnParams:
    return dataclasses.replace(random_spn(rng, D, M, R, zeros), uint8_activations=True)


def mixed_rows(rng, N: int, D: int) -> np.ndarray:
    """Rows of different characters: Gaussian, ReLU-like (many exact zeros), large, tiny, shifted."""
    X = rng.standard_normal((N, D)).astype(np.float32)
    scale = np.float32(10.0) ** rng.integers(-6, 7, size=(N, 1)).astype(np.float32)
    X = X * scale + rng.standard_normal((N, 1)).astype(np.float32) * scale
    X[::3] = np.maximum(X[::3], 0)
    return X.astype(np.float32)


def assert_equal_to_reference(model, X, params, relu, threads=1):
    want = spn.kernel_reference(X, params, relu)
    got = run_spn(model, X, threads)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)  # bit for bit, NaN where the reference has NaN


@pytest.mark.parametrize("M", [1, 7, 16, 40])
@pytest.mark.parametrize("R", [1, 5, 16, 33])
@pytest.mark.parametrize("D", [1, 3, 4, 17, 64, 65, 200])
def test_every_kernel_path_equals_the_reference_bit_for_bit(D, R, M, path, monkeypatch):
    """Widths around multiples of 4 (input groups), 16 (output blocks) and 64; row counts around
    the tiles, the 16-row blocks and the 64-row tasks; both epilogues; one and two threads."""
    rng = np.random.default_rng(10000 * D + 100 * R + M)
    params = uint8_spn(rng, D, M, R)
    X = mixed_rows(rng, max(ROW_COUNTS), D)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        model = spn_node_model(params, relu)
        for threads in (1, 2):
            session = ort.InferenceSession(model.SerializeToString(), lutcompile.session_options(threads),
                                           providers=["CPUExecutionProvider"])
            for N in ROW_COUNTS:
                got = session.run(None, {"X": X[:N]})[0]
                np.testing.assert_array_equal(got, spn.kernel_reference(X[:N], params, relu),
                                              err_msg=f"{path} relu={relu} threads={threads} N={N}")


def special_rows(D: int) -> np.ndarray:
    """Rows the quantisation treats apart, D >= 8 wide."""
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((14, D)).astype(np.float32)
    rows[0, 3] = np.nan
    rows[1, D - 1] = np.inf  # in the last (partial) vector
    rows[2, 0] = -np.inf
    rows[3] = 2.5  # constant: step 1, every q 0
    rows[4] = 0.0
    rows[4, 1::2] = -0.0
    rows[5, 0], rows[5, 1] = 3e38, -3e38  # max - min overflows to +inf
    rows[6, 0], rows[6, 1] = 1.7e38, -1.6e38  # finite span, near the top of the range
    # lo = 0 and max 255: step 1, so (v - lo) / step is exactly k + 0.5: ties to even
    rows[7] = (np.arange(D) % 255 + 0.5).astype(np.float32)
    rows[7, 0], rows[7, 1] = 0.0, 255.0
    rows[8] = rows[7] * np.float32(0.25)  # the same ties at step 0.25
    # a subnormal span: span / 255 rounds to a few ulps, or to 0 (then step 1)
    rows[9] = np.float32(0)
    rows[9, 2] = np.float32(300e-45)
    rows[10] = np.float32(0)
    rows[10, 2] = np.float32(100e-45)
    rows[11] = 1e30 + rows[11] * np.float32(1e24)  # large values, small span: q from big - big
    rows[12] = np.where(np.arange(D) % 2 == 0, np.float32(1e37), np.float32(-1e37))  # s may overflow in stage 1
    rows[13, :] = np.nan
    return rows


@pytest.mark.parametrize("D, M, R", [(9, 5, 6), (67, 33, 17), (200, 40, 70)])
def test_special_rows_follow_the_reference(D, M, R, path, monkeypatch):
    rng = np.random.default_rng(D)
    params = uint8_spn(rng, D, M, R, zeros=0.2)
    wb = params.wb.copy()
    wb[0] = 0  # a hidden unit of no input: s constant along it
    params = dataclasses.replace(params, wb=wb)
    X = special_rows(D)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        want = spn.kernel_reference(X, params, relu)
        if not relu:  # the special rows are special: NaN rows, and finite ones
            assert np.isnan(want[[0, 1, 2, 5, 13]]).all() and np.isfinite(want[[3, 4, 7, 8, 9, 10]]).all()
        model = spn_node_model(params, relu)
        for threads in (1, 2):
            np.testing.assert_array_equal(run_spn(model, X, threads), want)
        for n in range(len(X)):  # one row a call
            np.testing.assert_array_equal(run_spn(model, X[n:n + 1]), want[n:n + 1])
        # among ordinary rows, at every position of a 16-row block and a 4-row tile
        ordinary = mixed_rows(rng, 40, D)
        for at in (0, 3, 4, 15, 16, 39):
            mixed = ordinary.copy()
            mixed[at] = X[(at * 5) % len(X)]
            np.testing.assert_array_equal(run_spn(model, mixed), spn.kernel_reference(mixed, params, relu))


@pytest.mark.parametrize("D", [256, 257, 520, 1031])
def test_long_rows_of_extreme_sums(D, path, monkeypatch):
    """Rows past the AVX2 path's 64-group int16 partial sums (256 inputs), with the largest sums:
    q = 255 nearly everywhere, W_b rows all +1 or all -1 (sums +-255 D), W_c likewise."""
    rng = np.random.default_rng(D)
    params = uint8_spn(rng, D, 20, 18)
    wb, wc = params.wb.copy(), params.wc.copy()
    wb[0], wb[1], wb[2, ::2] = 1, -1, 1
    wc[0], wc[1] = 1, -1
    params = dataclasses.replace(params, wb=wb, wc=wc, a=np.abs(params.a))
    X = mixed_rows(rng, 30, D)
    X[:10] = 1.0
    X[:10, 0] = 0.0  # q: 0, then 255 everywhere
    X[10:20, 3] = -5.0
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        for N in (1, 2, 30):
            assert_equal_to_reference(spn_node_model(params, relu), X[:N], params, relu)


def test_half_steps_round_to_even_by_hand(path, monkeypatch):
    """One input row 0, 255, 0.5, 1.5, 2.5, 253.5: step 1, q = 0, 255, 0, 2, 2, 254 (ties to even);
    W_b's one hidden unit sums them all, so s = 1 * 513 + 0 * 6 = 513; W_c copies it."""
    x = np.array([[0, 255, 0.5, 1.5, 2.5, 253.5]], np.float32)
    params = spn.SpnParams(np.ones((1, 6), np.int8), np.ones(1, np.float32), np.ones((1, 1), np.int8),
                           np.zeros(1, np.float32), uint8_activations=True)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    got = run_spn(spn_node_model(params), x)
    assert got.tolist() == [[513.0]] == spn.kernel_reference(x, params).tolist()


@pytest.mark.parametrize("source", ["digits", "random"])
def test_real_activations_equal_the_reference_and_stay_near_float(source, digits_mlp, digits, path, monkeypatch):
    """The digits rows (all 1,797, several tasks) through a ternary SVD layer of the digits MLP's
    first layer (64 -> 48, r = 48) or of a random 64 x 100 weight (r = 70)."""
    X = digits[0]
    if source == "digits":
        W, b = digits_mlp[0]
        width = W.shape[1]
    else:
        rng = np.random.default_rng(5)
        W, b = rng.standard_normal((64, 100)).astype(np.float32), rng.standard_normal(100).astype(np.float32)
        width = 70
    params = dataclasses.replace(spn.ternary_init(W, b, width), uint8_activations=True)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        for threads in (1, 2):
            assert_equal_to_reference(spn_node_model(params, relu), X, params, relu, threads)
    # the quantisation costs about 1 % of the layer's output, not more
    exact = spn.kernel_reference(X, dataclasses.replace(params, uint8_activations=False))
    error = np.linalg.norm(spn.kernel_reference(X, params) - exact) / np.linalg.norm(exact)
    assert 0 < error < 0.03, error


@pytest.mark.parametrize("cin, kernel, strides, pads, dilations, H, W", [
    (3, (2, 3), (2, 1), (0, 1, 1, 0), (1, 2), 11, 8),  # D = 18
    (7, (3, 3), (3, 2), (2, 0, 0, 2), (2, 1), 13, 23),  # D = 63, 17 x 23 positions: a tile of 256 and a remainder
])
@pytest.mark.parametrize("N", [1, 3])
def test_spn_conv_with_uint8_activations_equals_its_reference(cin, kernel, strides, pads, dilations, H, W, N, path,
                                                              monkeypatch):
    g = ConvGeometry(cin, kernel, strides, pads, dilations)
    rng = np.random.default_rng(cin * 100 + H + N)
    params = uint8_spn(rng, g.D, 17, 33)
    X = rng.standard_normal((N, cin, H, W)).astype(np.float32)
    X[0, 0, 0, 0] = np.nan  # the patches that hold it give NaN (0 with relu)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        want = spn.conv_reference(X, params, g, relu)
        assert want.shape == (N, 17, *g.output_size(H, W))
        for threads in (1, 2):
            np.testing.assert_array_equal(run_spn(spn_conv_model(params, g, relu), X, threads), want)


def test_without_the_attribute_the_op_keeps_float_activations():
    rng = np.random.default_rng(9)
    params = random_spn(rng, 20, 7, 9)
    X = rng.standard_normal((5, 20)).astype(np.float32)
    model = _corrupt(spn_node_model(dataclasses.replace(params, uint8_activations=True)), "activations", None)
    np.testing.assert_array_equal(run_spn(model, X), spn.kernel_reference(X, params))


def _refused(model, needle: str, name: str = "SpnMatMul node 'spn0'"):
    with pytest.raises(Exception, match=re.escape(name)) as error:
        ort.InferenceSession(model.SerializeToString(), lutcompile.session_options(1),
                             providers=["CPUExecutionProvider"])
    assert needle in str(error.value), str(error.value)
    assert "\n" not in str(error.value).split(name, 1)[1]  # one line


@pytest.mark.bad_input
@pytest.mark.parametrize("value, needle", [
    (2, "attribute 'activations' must be 0 (float32) or 1 (uint8), got 2"),
    (-1, "attribute 'activations' must be 0 (float32) or 1 (uint8), got -1"),
    (1.0, "attribute 'activations' (int) is missing or malformed"),
])
def test_bad_activations_are_refused_at_session_creation(value, needle):
    params = random_spn(np.random.default_rng(4), 5, 3, 4)
    _refused(_corrupt(spn_node_model(params), "activations", value), needle)
    g = ConvGeometry(1, (2, 2))
    conv = _corrupt(spn_conv_model(random_spn(np.random.default_rng(4), 4, 3, 4), g), "activations", value)
    _refused(conv, needle, "SpnConv node 'spnconv0'")


def wide_layer(D: int, uint8: bool) -> spn.SpnParams:
    """One hidden unit of one weight (+1 at input 0) over D inputs, one output; built without
    SpnParams' checks (its D limit is the op's)."""
    wb = np.zeros((1, D), np.int8)
    wb[0, 0] = 1
    params = object.__new__(spn.SpnParams)
    for name, value in dict(wb=wb, a=np.ones(1, np.float32), wc=np.ones((1, 1), np.int8), bias=np.zeros(1, np.float32),
                            uint8_activations=uint8).items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.bad_input
def test_too_many_inputs_for_uint8_are_refused_at_session_creation():
    D = (1 << 23) + 1
    _refused(spn_node_model(wide_layer(D, True)),
             f"with activations = 1 (uint8), D and R must be at most 2^23, got D = {D}, R = 1")
    # float activations take it; so does uint8 at 2^23 inputs
    for D, uint8 in ((1 << 23) + 1, False), (1 << 23, True):
        ort.InferenceSession(spn_node_model(wide_layer(D, uint8)).SerializeToString(), lutcompile.session_options(1),
                             providers=["CPUExecutionProvider"])
