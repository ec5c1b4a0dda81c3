"""Frontend, calibration, fitting and rewriting, each checked against an independent reference."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lutcompile
from lutcompile.compile import calibrate, frontend
from lutcompile.ops import kernel
from lutcompile.compile.fit import FitOptions, fit_node, learn_tree, quantise_tables, ridge_tables
from lutcompile.errors import OptionsError
from lutcompile.ops.spec import DOMAIN, encode_reference
from lutcompile.ops.reference import reference_evaluator

from conftest import mlp_model, numpy_mlp


def exact_session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- frontend

@pytest.mark.parametrize("style", ["gemm", "matmul"])
def test_frontend_normalises_products_to_x_w_plus_b(digits_mlp, digits, style):
    model = mlp_model(digits_mlp, style)
    analysis = frontend.analyse(model)
    assert [t.name for t in analysis.targets] == ["fc0", "fc1", "fc2"]
    assert analysis.skipped == []
    for (W, b), t in zip(digits_mlp, analysis.targets):
        np.testing.assert_array_equal(t.weight, W)
        np.testing.assert_array_equal(t.bias, b)
    # hidden layers absorb their Relu (and, for MatMul, the Add); the last layer has none
    assert analysis.targets[0].activation == "Relu"
    assert analysis.targets[0].output_name == "h0"
    assert analysis.targets[2].activation is None and analysis.targets[2].output_name == "logits"
    if style == "matmul":
        assert analysis.targets[0].absorbed == ["fc0", "add0", "relu0"]


@pytest.mark.parametrize("transA,transB,alpha,beta,c_shape", [
    (0, 0, 1.0, 1.0, (10,)), (0, 1, 0.5, 2.0, (1, 10)), (0, 1, 2.0, 0.25, (1,)), (0, 0, 1.0, 1.0, None),
])
def test_frontend_gemm_attributes_match_onnxruntime(digits, transA, transB, alpha, beta, c_shape):
    X = digits[0][:50]
    rng = np.random.default_rng(1)
    W = rng.standard_normal((64, 10)).astype(np.float32)
    stored = np.ascontiguousarray(W.T) if transB else W
    inits = [numpy_helper.from_array(stored, "W")]
    inputs = ["x", "W"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "C"))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="g", transA=transA, transB=transB,
                            alpha=alpha, beta=beta)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (t,) = frontend.analyse(model).targets
    expected = exact_session(model).run(None, {"x": X})[0]
    got = X @ t.weight + (0 if t.bias is None else t.bias)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_frontend_records_why_nodes_stay_exact():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "x2"], ["y"], name="dynamic"),
             helper.make_node("Gemm", ["x", "W", "x2"], ["z"], name="dynamic_bias"),
             helper.make_node("Identity", ["x"], ["x2"], name="id")]
    graph = helper.make_graph(nodes, "g", [x], [y, z], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    analysis = frontend.analyse(model)
    reasons = {s.name: s.reason for s in analysis.skipped}
    assert analysis.targets == []
    assert "no constant weight" in reasons["dynamic"]
    assert "bias C is not constant" in reasons["dynamic_bias"]


@pytest.mark.bad_input
def test_load_model_rejects_non_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(frontend.FrontendError, match="not an ONNX model"):
        frontend.load_model(bad)
    with pytest.raises(frontend.FrontendError, match="not found"):
        frontend.load_model(tmp_path / "missing.onnx")


# ------------------------------------------------------------- calibration

def test_collect_activations_match_numpy(digits_mlp, digits_model, digits):
    X = digits[0][:300]
    analysis = frontend.analyse(digits_model)
    data = calibrate.load_calibration({"anything": X}, analysis.model)
    names = [t.input_name for t in analysis.targets]
    acts = calibrate.collect_activations(analysis.model, data, names, batch_size=64)
    h = X.astype(np.float64)
    for (W, b), name in zip(digits_mlp, names):
        assert acts[name].shape == (300, W.shape[0])
        np.testing.assert_allclose(acts[name], h, rtol=1e-4, atol=1e-4)
        h = np.maximum(h @ W + b, 0)


@pytest.mark.parametrize("arrays,message", [
    ({"other": np.zeros((5, 64), np.float32), "more": np.zeros((5, 64), np.float32)}, "no array for model input"),
    ({"input": np.zeros((5, 63), np.float32)}, "dimension 1 must be 64"),
    ({"input": np.full((5, 64), np.nan, np.float32)}, "NaN"),
    ({"input": np.zeros((5, 64), np.int64)}, "dtype"),
    ({"input": np.zeros((5, 64), np.float32), "labels": np.zeros(4, np.int64)}, "labels"),
])
@pytest.mark.bad_input
def test_calibration_errors_are_clear(digits_model, arrays, message):
    with pytest.raises(calibrate.CalibrationError, match=message):
        calibrate.load_calibration(arrays, digits_model)


@pytest.mark.bad_input
def test_calibration_refuses_pickled_npz(tmp_path, digits_model):
    path = tmp_path / "pickled.npz"
    np.savez(path, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(calibrate.CalibrationError, match="pickle"):
        calibrate.load_calibration(path, digits_model)


# --------------------------------------------------------------------- fit

def test_tree_levels_share_one_split_dimension_and_balance(digits):
    X = digits[0]
    dims = np.arange(16, 32)
    split_dims, thresholds = learn_tree(X, dims)
    assert set(split_dims) <= set(dims)
    codes = encode_reference(X, split_dims[None], thresholds[None])[:, 0]
    # the greedy tree uses several leaves, and each split lowers the within-bucket error
    assert len(np.unique(codes)) >= 8
    sub = X[:, dims]
    sse = sum(((sub[codes == k] - sub[codes == k].mean(0)) ** 2).sum() for k in np.unique(codes))
    assert sse < 0.6 * ((sub - sub.mean(0)) ** 2).sum()


def _leaf_sse(X, dims, target, tree):
    codes = encode_reference(X, tree[0][None], tree[1][None])[:, 0]
    return sum(((target[codes == k] - target[codes == k].mean(0)) ** 2).sum() for k in np.unique(codes))


@pytest.mark.parametrize("objective", ["input", "output"])
def test_histogram_split_search_equals_the_exact_search_when_bins_hold_every_value(digits, digits_mlp, objective):
    """Digits' pixels take at most 17 values, so 256 bins hold one value each and the histogram
    search (one sparse product per level) must find the sort-per-node search's very trees."""
    X = digits[0].astype(np.float32)
    weight = digits_mlp[0][0]
    for start in range(0, 64, 16):
        dims = np.arange(start, start + 16)
        target = None if objective == "input" else X[:, dims].astype(np.float64) @ weight[dims]
        exact = learn_tree(X, dims, 16, target, bins=0)
        histogram = learn_tree(X, dims, 16, target, bins=256)
        np.testing.assert_array_equal(histogram[0], exact[0])
        np.testing.assert_array_equal(histogram[1], exact[1])


def test_histogram_split_search_on_continuous_rows_stays_near_the_exact_search(digits, digits_mlp):
    """On continuous rows (the digits MLP's hidden activations, 1,797 rows, most columns with
    more than 64 distinct values) 64 quantile bins leave the trees' leaf SSE within 5 % of the
    exact search's; with a bin per row the search is exact again."""
    X, _ = digits
    (w1, b1), _ = digits_mlp[0], digits_mlp[1]
    H = np.maximum(X @ w1 + b1, 0).astype(np.float32)
    assert np.median([len(np.unique(c)) for c in H.T]) > 64
    for start in range(0, 32, 8):
        dims = np.arange(start, start + 8)
        exact = learn_tree(H, dims, 8, bins=0)
        np.testing.assert_array_equal(learn_tree(H, dims, 8, bins=len(H))[0], exact[0])
        coarse = learn_tree(H, dims, 8, bins=64)
        sub = H[:, dims].astype(np.float64)
        assert _leaf_sse(H, dims, sub, coarse) <= 1.05 * _leaf_sse(H, dims, sub, exact)


def test_split_bins_reach_the_fitter_and_the_record(digits_model, digits_split):
    """compile_model(split_bins=N) fits with N bins (recorded in the options report.json shows):
    the first layer's pixels take at most 17 values, so 32 bins fit it exactly as the exact
    search does, while 4 bins cannot (unpruned: the first node's columns follow the next one's trees)."""
    Xtr = digits_split[0][:600]
    fast = dict(codebooks=4, partition="contiguous", table_loss="ridge", finetune=False, progress=False,
                prune_columns=False)
    results = {bins: lutcompile.compile_model(digits_model, None, {"input": Xtr}, split_bins=bins, **fast)
               for bins in (0, 32, 4)}
    assert [r.options["fit_options"]["split_bins"] for r in results.values()] == [0, 32, 4]
    first = {bins: next(n for n in r.model.graph.node if n.domain == DOMAIN).SerializeToString()
             for bins, r in results.items()}
    assert first[32] == first[0] != first[4]
    with pytest.raises(ValueError, match="split_bins"):
        FitOptions(split_bins=1).check()


def test_split_lines_confine_the_first_layer_to_its_heaviest_lines(digits_model, digits_mlp, digits_split):
    """compile_model(split_lines=L): the first layer (its input is the graph's) splits only on
    the columns of the L aligned 16-float lines with the most var(x_j) * ||W_j||^2, computed
    here in numpy; the layers fed by a replaced node are not confined (unpruned, so their split
    dims keep their own numbering); too few columns for the codebooks, or L < 0, is a one-line error."""
    Xtr = digits_split[0][:600]
    fast = dict(codebooks=8, partition="contiguous", table_loss="ridge", finetune=False, progress=False,
                prune_columns=False)
    W0 = digits_mlp[0][0]
    energy = Xtr.astype(np.float64).var(axis=0) * (W0.astype(np.float64) ** 2).sum(axis=1)
    ranked = np.argsort(-energy.reshape(4, 16).sum(axis=1))
    for lines in (1, 2):
        result = lutcompile.compile_model(digits_model, None, {"input": Xtr}, split_lines=lines, **fast)
        assert result.options["fit_options"]["split_lines"] == lines
        dims = [np.array(attr_ints(n, "split_dims")) for n in result.model.graph.node if n.domain == DOMAIN]
        assert set(np.unique(dims[0] // 16)) == set(ranked[:lines])
        assert len(np.unique(dims[1] // 16)) > lines  # fc1 reads fc0's output: not confined
    with pytest.raises(OptionsError, match="keeps 16 input columns, fewer than the 24 codebooks"):
        lutcompile.compile_model(digits_model, None, {"input": Xtr}, split_lines=1, **dict(fast, codebooks=24))
    with pytest.raises(ValueError, match="split_lines must be 0"):
        FitOptions(split_lines=-1).check()


def attr_ints(node, name: str) -> list[int]:
    return next(list(a.ints) for a in node.attribute if a.name == name)


def test_ridge_tables_solve_the_normal_equations(digits):
    X = digits[0][:400]
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(400, 3)).astype(np.uint8)
    target = X[:, :5].astype(np.float64)
    T = ridge_tables(codes, target, ridge=0.5).reshape(48, 5)
    G = np.zeros((400, 48))
    G[np.arange(400)[:, None], np.arange(3) * 16 + codes] = 1
    np.testing.assert_allclose((G.T @ G + 0.5 * np.eye(48)) @ T, G.T @ target, atol=1e-8)


def test_linear_node_tables_minimise_the_mse_objective_exactly(digits):
    """Without an activation the table loss is quadratic, and optimise_tables solves it: the
    numpy gradient of mean((G T + b - y)^2) / mean(y^2) + reg mean((T - T0)^2) / mean(T0^2)
    vanishes at the tables it returns (1e-6 of its size at the ridge start)."""
    from lutcompile.compile.fit import optimise_tables
    X = digits[0][:400].astype(np.float64)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(400, 3)).astype(np.uint8)
    product, bias = X[:, :5] * 3.0, np.linspace(-1, 1, 5)
    T0 = ridge_tables(codes, product, 1.0)
    options = FitOptions(table_loss="mse", table_reg=0.5)
    T = optimise_tables(codes, T0, product + bias, bias, None, options)
    G = np.zeros((400, 48))
    G[np.arange(400)[:, None], np.arange(3) * 16 + codes] = 1

    def gradient(tables):
        tables = tables.reshape(48, 5)
        data = 2 * G.T @ (G @ tables + bias - product - bias) / ((product + bias) ** 2).mean() / tables.size * 48 / 400
        prior = 2 * options.table_reg * (tables - T0.reshape(48, 5)) / (T0 ** 2).mean() / tables.size
        return data + prior
    assert np.abs(gradient(T)).max() <= 1e-6 * np.abs(gradient(T0)).max()


def test_quantised_tables_reconstruct_within_half_a_step(digits):
    T = np.random.default_rng(0).standard_normal((4, 16, 7)) * np.array([1, 10, 0.1, 3])[:, None, None]
    q, scale, offsets = quantise_tables(T)
    assert q.shape == (7, 4, 16) and q.dtype == np.uint8
    back = q.transpose(1, 2, 0).astype(np.float64) * scale + offsets[:, None, None]
    assert np.max(np.abs(back - T)) <= 0.5 * scale * (1 + 1e-5)


def test_more_codebooks_fit_better(digits_mlp, digits):
    X = digits[0]
    W, b = digits_mlp[0]
    ridge = FitOptions(partition="contiguous", table_loss="ridge")
    errors = [fit_node(X, W, b, None, C, ridge).relative_error for C in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15


def test_fit_relative_error_is_measured_against_the_exact_product(digits_mlp, digits):
    X = digits[0][:500]
    W, b = digits_mlp[0]
    fit = fit_node(X, W, b, "Relu", 8, FitOptions(partition="contiguous", table_loss="ridge"))
    exact = np.maximum(X.astype(np.float64) @ W + b, 0)
    approx = kernel.apply(X, fit.params)
    assert fit.relative_error == pytest.approx(np.linalg.norm(approx - exact) / np.linalg.norm(exact), rel=1e-4)


# ---------------------------------------------------------- rewrite and run

@pytest.fixture(scope="module")
def compiled_digits(digits_model, digits_split):
    Xtr, ytr, _, _ = digits_split
    return lutcompile.compile_model(digits_model, None, {"input": Xtr, "labels": ytr},
                                    codebooks=16, progress=False)


def test_rewrite_keeps_interface_and_replaces_every_product(compiled_digits, digits_model):
    model = compiled_digits.model
    onnx.checker.check_model(model)
    ops = [(n.op_type, n.domain) for n in model.graph.node]
    assert ops == [("LutMatMul", DOMAIN)] * 3
    assert [n.name for n in model.graph.node] == ["fc0", "fc1", "fc2"]
    assert [i.name for i in model.graph.input] == [i.name for i in digits_model.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in digits_model.graph.output]
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", 17), (DOMAIN, 1)}
    assert len(model.graph.initializer) == 0  # the weights are gone, only tables remain


def test_compiled_model_matches_reference_per_node(compiled_digits, digits_split):
    """onnxruntime + C kernel against onnx.reference + numpy, node by node on the same inputs."""
    _, _, Xte, _ = digits_split
    model = compiled_digits.model
    nodes = list(model.graph.node)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in nodes:
        probe.graph.output.append(helper.make_empty_tensor_value_info(n.input[0]))
    sess = ort.InferenceSession(probe.SerializeToString(), lutcompile.session_options(),
                                providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"input": Xte})))
    from lutcompile.ops.node_format import params_from_node
    for n in nodes:
        params = params_from_node(n)
        x = outs[n.input[0]]
        np.testing.assert_array_equal(kernel.encode(x, params.split_dims, params.thresholds),
                                      encode_reference(x, params.split_dims, params.thresholds))
        single = reference_evaluator(_single_node_model(n, params.D, params.M)).run(None, {"x": x})[0]
        np.testing.assert_allclose(outs[n.output[0]], single, rtol=1e-6, atol=1e-6)


def _single_node_model(node, D, M):
    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.ClearField("input")
    n.ClearField("output")
    n.input.append("x")
    n.output.append("y")
    graph = helper.make_graph([n], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def test_compiled_model_end_to_end_against_reference_runtime(compiled_digits, digits_split):
    _, _, Xte, _ = digits_split
    got = ort.InferenceSession(compiled_digits.model.SerializeToString(), lutcompile.session_options(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": Xte})[0]
    want = reference_evaluator(compiled_digits.model).run(None, {"input": Xte})[0]
    # the chained layers agree except where float rounding flips a code at a threshold
    close = np.all(np.isclose(got, want, rtol=1e-5, atol=1e-5), axis=1)
    assert close.mean() > 0.99
    assert np.mean(got.argmax(1) == want.argmax(1)) > 0.99


def test_compiled_model_keeps_most_accuracy(compiled_digits, digits_mlp, digits_split):
    _, _, Xte, yte = digits_split
    exact_acc = np.mean(numpy_mlp(digits_mlp, Xte).argmax(1) == yte)
    data = calibrate.CalibrationData({"input": Xte}, yte)
    lut_acc = lutcompile.evaluate_accuracy(compiled_digits.model, data)
    assert compiled_digits.accuracy_before == pytest.approx(
        np.mean(numpy_mlp(digits_mlp, digits_split[0]).argmax(1) == digits_split[1]))
    assert lut_acc > exact_acc - 0.10, (lut_acc, exact_acc)
    assert [r.codebooks for r in compiled_digits.nodes] == [16, 16, 16]


def test_exclude_keeps_named_node_exact(digits_model, digits_split):
    Xtr = digits_split[0]
    result = lutcompile.compile_model(digits_model, None, {"input": Xtr}, codebooks=4,
                                      nodes_to_exclude=["fc2"], progress=False)
    assert [n.op_type for n in result.model.graph.node] == ["LutMatMul", "LutMatMul", "Gemm"]
    assert any(s.name == "fc2" and "exclude" in s.reason for s in result.skipped)
