"""StrassenNets' sum-product layer (ops/spn.py): the SVD initialisation reproduces a real layer,
TWN ternarisation and the operation count match hand computations, and the portable lowering
run in onnxruntime equals the numpy reference on real activations."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lutcompile
from lutcompile.ops.spec import DOMAIN

from lutcompile.errors import OptionsError
from lutcompile.onnx_io.sessions import make_session
from lutcompile.ops import spn
from lutcompile.compile.torch_program import SpnModule

from conftest import numpy_mlp


@pytest.fixture(scope="module")
def first_layer(digits_mlp, digits_split):
    """The digits MLP's first layer (W [64, 48], b) and its real input rows."""
    W, b = digits_mlp[0]
    return W, b, digits_split[0]


@pytest.mark.parametrize("extra", [0, 5])
def test_the_full_precision_init_is_the_layer_when_the_width_reaches_its_rank(first_layer, extra):
    W, b, X = first_layer
    rank = np.linalg.matrix_rank(W)
    wb, a, wc = spn.full_precision_init(W, rank + extra)
    assert wb.shape == (rank + extra, 64) and wc.shape == (48, rank + extra)
    np.testing.assert_allclose(((X @ wb.T) * a) @ wc.T, X.astype(np.float64) @ W, rtol=1e-5, atol=1e-5)


def test_below_the_rank_the_init_is_the_best_approximation_of_that_rank(first_layer):
    W, _, _ = first_layer
    wb, a, wc = spn.full_precision_init(W, 10)
    singular = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    # Eckart-Young: no rank-10 matrix is closer to W in the Frobenius norm
    np.testing.assert_allclose(np.linalg.norm(W - wb.T @ np.diag(a) @ wc.T), np.sqrt(np.sum(singular[10:] ** 2)),
                               rtol=1e-6)


def test_twn_ternarises_by_hand():
    # mean |w| = 0.38, threshold 0.266: -0.5 and 0.9 kept, scale their mean magnitude 0.7
    t, s = spn.ternarize(np.array([[0.1, -0.5, 0.9, 0.02], [0.0, 0.0, 0.0, 0.0]]), axis=1)
    np.testing.assert_array_equal(t, [[0, -1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(s, [0.7, 0.0])
    assert t.dtype == np.int8


def test_operations_by_hand():
    params = spn.SpnParams(np.array([[1, 0, -1], [0, 0, 0], [1, 1, 1]], np.int8), np.ones(3, np.float32),
                           np.array([[1, -1, 0], [0, 0, 0]], np.int8), np.zeros(2, np.float32))
    # hidden: 1 + 0 + 2 additions; outputs: (1 + bias) and (bias alone, none); products with a: 3
    assert spn.operations(params) == spn.OperationCount(multiplications=3, additions=5)
    assert spn.exact_operations(3, 2) == spn.OperationCount(multiplications=6, additions=6)
    assert params.sparsity == (pytest.approx(4 / 9), pytest.approx(4 / 6))


def test_uint8_quantisation_by_hand():
    """quantize_rows (docs/lutmatmul.md, activations = 1): lo the row's minimum, step (max - lo)
    / 255, rint half to even; a constant row's step is 1; a non-finite row is marked bad."""
    v = np.array([[0.0, 1.0, 2.55, 0.005], [3.0, 3.0, 3.0, 3.0], [-1.0, np.nan, 0.0, 1.0],
                  [-3e38, 3e38, 0.0, 0.0]], np.float32)
    q, lo, step, bad = spn.quantize_rows(v)
    assert lo[:2].tolist() == [0.0, 3.0] and bad.tolist() == [False, False, True, True]
    assert step[0] == np.float32(2.55) / np.float32(255) and step[1] == 1.0
    # 1 / 0.01 = 100, 2.55 / 0.01 = 255, 0.005 / 0.01 = 0.5 -> 0 (half to even)
    assert q[0].tolist() == [0, 100, 255, 0] and q[1].tolist() == [0, 0, 0, 0]
    params = spn.SpnParams(np.array([[1, -1, 0, 1]], np.int8), np.ones(1, np.float32), np.ones((1, 1), np.int8),
                           np.zeros(1, np.float32), uint8_activations=True)
    y = spn.kernel_reference(v, params)
    assert np.isnan(y[2:]).all()  # non-finite, or a span past float32: NaN
    # the constant row is exact: 0 * 1 + 3 * (1 - 1 + 1) = 3, quantised again as a constant row
    assert y[1, 0] == 3.0


def test_uint8_activations_cost_their_quantisation(first_layer):
    """Counted by hand: D + R divisions and 2 (R + M) multiplications besides the R products
    with a, D + R subtractions and R + M additions besides the sums; on real activations the
    layer stays within about 1 % of the float one."""
    params = spn.SpnParams(np.array([[1, 0, -1], [0, 0, 0], [1, 1, 1]], np.int8), np.ones(3, np.float32),
                           np.array([[1, -1, 0], [0, 0, 0]], np.int8), np.zeros(2, np.float32), True)
    assert spn.operations(params) == spn.OperationCount(multiplications=3 + 6 + 10, additions=5 + 6 + 5)
    assert spn.multiplications(3, 2, 3, True) == 19 and spn.multiplications(3, 2, 3) == 3
    W, b, X = first_layer
    fitted = spn.fit_layer(X, W, b, 48)
    quantized = spn.kernel_reference(X, replace(fitted, uint8_activations=True))
    exact = spn.kernel_reference(X, fitted)
    assert 0 < np.linalg.norm(quantized - exact) / np.linalg.norm(exact) < 0.02
    with pytest.raises(OptionsError, match="at most 2\\^23"):
        replace(fitted, wb=np.zeros((1, 2**23 + 1), np.int8), a=np.ones(1, np.float32), wc=np.zeros((48, 1), np.int8),
                uint8_activations=True)


def test_the_torch_layer_with_uint8_activations_is_the_kernel_reference(first_layer):
    """SpnModule fake-quantises each product's input rows as the kernel quantises them, so its
    forward is the exported layer's kernel_reference within float rounding, and gradients flow
    to the latent weights through the rounding (straight through)."""
    W, b, X = first_layer
    module = SpnModule.from_params(spn.fit_layer(X, W, b, 48, uint8_activations=True), relu=True)
    with torch.no_grad():
        module.wb.add_(0.01 * torch.randn_like(module.wb))
    out = module(torch.as_tensor(X))
    params = module.params()
    assert params.uint8_activations
    expected = spn.kernel_reference(X, params, relu=True)
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    out.sum().backward()
    assert module.wb.grad.abs().sum() > 0 and module.a.grad.abs().sum() > 0


def test_ternary_init_folds_both_scales_into_a(first_layer):
    W, b, X = first_layer
    params = spn.ternary_init(W, b, 48)
    wb, a, wc = spn.full_precision_init(W, 48)
    tb, sb = spn.ternarize(wb, axis=1)
    tc, sc = spn.ternarize(wc, axis=0)
    # the layer with the ternary factors and their scales, written out
    scaled = ((X @ (sb[:, None] * tb).T) * a) @ (tc * sc[None, :]).T + b
    np.testing.assert_allclose(spn.reference(X, params), scaled, rtol=1e-4, atol=1e-4)
    exact = X @ W + b
    error = np.linalg.norm(spn.reference(X, params) - exact) / np.linalg.norm(exact)
    print(f"untrained ternary SPN, r = M: relative error {error:.3f}")
    assert error < 0.6  # measured 0.40: a start for training, not a replacement


@pytest.mark.parametrize("bad", ["value", "shape"])
def test_parameters_that_are_not_a_ternary_layer_are_refused(bad):
    wb = np.array([[1, 2]] if bad == "value" else [[1, 0]], np.int8)
    a = np.ones(1 if bad == "value" else 2, np.float32)
    with pytest.raises(OptionsError, match="ternary" if bad == "value" else "shapes disagree"):
        spn.SpnParams(wb, a, np.ones((3, 1), np.int8), np.zeros(3, np.float32))


def test_the_portable_lowering_in_onnxruntime_equals_the_reference(first_layer):
    W, b, X = first_layer
    params = spn.ternary_init(W, b, 48)
    nodes, initializers = spn.portable_nodes(params, "input", "output", "fc0")
    graph = helper.make_graph(nodes, "spn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 48])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in model.graph.node} == {"Cast", "MatMul", "Mul", "Add"}
    out = make_session(model).run(None, {"input": X})[0]
    expected = spn.reference(X, params)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def spn_network(layers, width_of=lambda M: M):
    from lutcompile.compile.torch_program import SpnModule
    return [SpnModule.from_layer(W, b, width_of(W.shape[1])) for W, b in layers]


def run_network(modules, X):
    h = torch.as_tensor(X)
    for i, m in enumerate(modules):
        h = m(h)
        if i < len(modules) - 1:
            h = torch.relu(h)
    return h


def test_the_torch_layer_exports_the_ternary_layer_its_forward_computes(first_layer):
    W, b, X = first_layer
    (module,) = spn_network([(W, b)])
    with torch.no_grad():
        module.wb.add_(0.01 * torch.randn_like(module.wb))  # latent weights off their initial values
        out = module(torch.as_tensor(X)).numpy()
    params = module.params()
    assert set(np.unique(params.wb)) <= {-1, 0, 1} and set(np.unique(params.wc)) <= {-1, 0, 1}
    np.testing.assert_allclose(spn.reference(X, params), out, rtol=1e-4, atol=1e-4 * np.abs(out).max())
    # the initial ternary layer is ops.spn.ternary_init's
    (fresh,) = spn_network([(W, b)])
    expected = spn.ternary_init(W, b, 48)
    np.testing.assert_array_equal(fresh.params().wb, expected.wb)
    np.testing.assert_array_equal(fresh.params().wc, expected.wc)
    np.testing.assert_allclose(fresh.params().a, expected.a, rtol=1e-5)


def test_straight_through_training_lifts_an_all_ternary_mlp_towards_exact(digits_mlp, digits_split):
    """Every layer of the digits MLP ternarised (r = M) loses most of its accuracy; trained
    through the TWN straight-through forward with distillation and labels, it recovers."""
    Xtr, ytr, Xte, yte = digits_split
    torch.manual_seed(0)
    modules = spn_network(digits_mlp)
    teacher = torch.as_tensor(numpy_mlp(digits_mlp, Xtr).astype(np.float32))

    def accuracy():
        with torch.no_grad():
            return float((run_network(modules, Xte).argmax(1).numpy() == yte).mean())
    exact = float((numpy_mlp(digits_mlp, Xte).argmax(1) == yte).mean())
    before = accuracy()
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=3e-3)
    # a cosine decay settles the ternary pattern: at a constant rate the last epoch's accuracy
    # swings by 3-5 points as weights cross the threshold (0.92-0.97 over the last ten)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 30)
    x, y = torch.as_tensor(Xtr), torch.as_tensor(ytr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        for rows in torch.randperm(len(x), generator=generator).split(64):
            logits = run_network(modules, x[rows])
            loss = 0.5 * torch.nn.functional.cross_entropy(logits, y[rows]) + 0.5 * torch.nn.functional.kl_div(
                torch.log_softmax(logits / 2, 1), torch.log_softmax(teacher[rows] / 2, 1), log_target=True,
                reduction="batchmean") * 4
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    after = accuracy()
    print(f"all-ternary digits MLP: {before:.3f} -> {after:.3f} (exact {exact:.3f})")
    assert after >= before + 0.1 and after >= exact - 0.05, (before, after, exact)


# ---------------------------------------------------------------- the SpnMatMul op and its kernel

def spn_node_model(params: spn.SpnParams, relu: bool = False, name: str = "spn0") -> onnx.ModelProto:
    """One SpnMatMul node, X [N, D] -> Y [N, M]."""
    D, M = params.wb.shape[1], params.wc.shape[0]
    attrs = spn.node_attributes(params, relu)
    attrs = {k: numpy_helper.from_array(v, k) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    node = helper.make_node(spn.SPN_OP_TYPE, ["X"], ["Y"], name=name, domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "spn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", D])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", M])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def run_spn(model: onnx.ModelProto, X: np.ndarray, threads: int = 1) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), lutcompile.session_options(threads),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"X": np.ascontiguousarray(X, np.float32)})[0]


def random_spn(rng, D: int, M: int, R: int, zeros: float = 0.4) -> spn.SpnParams:
    def ternary(shape):
        return (rng.choice([-1, 1], shape) * (rng.random(shape) >= zeros)).astype(np.int8)
    return spn.SpnParams(ternary((R, D)), rng.standard_normal(R).astype(np.float32), ternary((M, R)),
                         rng.standard_normal(M).astype(np.float32))


def test_packing_is_four_weights_a_byte_lowest_first():
    t = np.array([[1, -1, 0, 1, -1], [0, 0, 0, 0, 1]], np.int8)
    packed = spn.pack_ternary(t)
    # row 0: codes 1, 2, 0, 1 -> 0b01_00_10_01; then 2 alone; row 1: 0, then 1
    assert packed.tolist() == [[0b01001001, 0b10], [0, 0b01]]
    np.testing.assert_array_equal(spn.unpack_ternary(packed, 5), t)


@pytest.mark.parametrize("D, M, R", [(1, 1, 1), (5, 3, 7), (17, 16, 33), (64, 17, 16), (130, 10, 40),
                                     (20, 150, 140)])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 5, 7, 8, 16, 17, 100])
def test_every_kernel_path_is_bit_exact_to_the_reference(D, M, R, N, path, monkeypatch):
    """Awkward shapes (row counts around the 8- and 16-row SIMD groups and the few-rows path's
    4, widths not multiples of 4 nor 16, R and M past the row path's 8 blocks of 16), both
    epilogues, one and two threads: each path equals kernel_reference bit for bit."""
    rng = np.random.default_rng(1000 * D + 10 * M + R + N)
    params = random_spn(rng, D, M, R)
    X = rng.standard_normal((N, D)).astype(np.float32)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        want = spn.kernel_reference(X, params, relu)
        np.testing.assert_allclose(want, np.maximum(spn.reference(X, params), 0) if relu else spn.reference(X, params),
                                   rtol=1e-4, atol=1e-4)  # the float64 layer, within float32 rounding
        model = spn_node_model(params, relu)
        for threads in (1, 2):
            assert run_spn(model, X, threads).tobytes() == want.tobytes(), (path, relu, threads)


def test_the_op_on_real_activations_equals_the_numpy_reference(first_layer, path, monkeypatch):
    """The digits MLP's first layer as its ternary SVD initialisation at r = M, on the real rows."""
    W, b, X = first_layer
    params = spn.ternary_init(W, b, W.shape[1])
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    got = run_spn(spn_node_model(params, relu=True), X)
    np.testing.assert_array_equal(got, spn.kernel_reference(X, params, relu=True))
    assert np.mean(got > 0) > 0.2  # the layer's outputs are not all clipped away


def test_special_values_follow_the_reference(path, monkeypatch):
    rng = np.random.default_rng(3)
    params = random_spn(rng, 9, 5, 6, zeros=0.2)
    X = rng.standard_normal((20, 9)).astype(np.float32)
    X[0, :] = np.nan
    X[1, 3] = np.inf
    X[2, :] = -0.0
    X[3, 2] = 3e38
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        want = spn.kernel_reference(X, params, relu)
        assert run_spn(spn_node_model(params, relu), X).tobytes() == want.tobytes()
        for n in range(4):  # one row a call: the few-rows path
            assert run_spn(spn_node_model(params, relu), X[n:n + 1]).tobytes() == want[n:n + 1].tobytes()


def _corrupt(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    node = bad.graph.node[0]
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)
    if value is not None:
        node.attribute.append(helper.make_attribute(name, numpy_helper.from_array(value, name)
                                                    if isinstance(value, np.ndarray) else value))
    return bad


@pytest.mark.bad_input
@pytest.mark.parametrize("name, value, needle", [
    ("wb", "code3", "holds code 3"),
    ("wb", "tail", "has a weight past its 5 entries"),
    ("wb", np.zeros((4, 1), np.uint8), "must have shape [R, ceil(D / 4)] = [4, 2], got [4, 1]"),
    ("wc", np.zeros((3, 1), np.int8), "'wc' must be a uint8 tensor"),
    ("a", [1.0, float("nan"), 1.0, 1.0], "'a' holds a value that is not finite"),
    ("a", [1.0, 2.0], "'a' must have 4 values, got 2"),
    ("bias", None, "'bias'"),
    ("R", 0, "D, M and R must lie in [1, 2^31 - 1]"),
    ("relu", 2, "'relu' must be 0 or 1"),
])
def test_bad_attributes_are_refused_at_session_creation(name, value, needle):
    params = random_spn(np.random.default_rng(4), 5, 3, 4)
    model = spn_node_model(params)
    if isinstance(value, str) and value == "code3":
        wb = spn.pack_ternary(params.wb)
        wb[1, 0] |= 0b11
        value = wb
    elif isinstance(value, str) and value == "tail":  # D = 5: the second byte of a row holds one weight, in bits 0-1
        wb = spn.pack_ternary(params.wb)
        wb[2, 1] |= 0b01 << 2
        value = wb
    with pytest.raises(Exception, match=r"SpnMatMul node 'spn0'") as error:
        ort.InferenceSession(_corrupt(model, name, value).SerializeToString(), lutcompile.session_options(1),
                             providers=["CPUExecutionProvider"])
    assert needle in str(error.value)


# ---------------------------------------------------------------- the SpnConv op

def spn_conv_model(params: spn.SpnParams, g, relu: bool = False, **overrides) -> onnx.ModelProto:
    """One SpnConv node, X [N, Cin, H, W] -> Y [N, M, OH, OW]."""
    from lutcompile.ops.node_format import conv_attributes
    attrs = {**spn.node_attributes(params, relu), **conv_attributes(g), **overrides}
    attrs = {k: numpy_helper.from_array(v, k) if isinstance(v, np.ndarray) else v for k, v in attrs.items()}
    node = helper.make_node(spn.SPN_CONV_OP_TYPE, ["X"], ["Y"], name="spnconv0", domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], "spn", [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                              ["N", g.in_channels, "H", "W"])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("cin, kernel, strides, pads, dilations, H, W", [
    (1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 7, 9),
    (3, (2, 3), (2, 1), (0, 1, 1, 0), (1, 2), 11, 8),
    (5, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 4, 4),
    (2, (3, 3), (3, 2), (2, 0, 0, 2), (2, 1), 13, 23),  # 17 x 23 positions: tiles of 256 and a remainder
])
@pytest.mark.parametrize("N", [1, 3])
def test_spn_conv_equals_its_reference_on_every_path(cin, kernel, strides, pads, dilations, H, W, N, path,
                                                     monkeypatch):
    """SpnConv: the sum-product layer on each patch (zeros in the padding), NCHW out, bit for bit
    spn.conv_reference on every path and thread count, with and without relu; and the
    standard-op lowering (Conv, Mul, 1x1 Conv, Add) within float rounding."""
    from lutcompile.ops.spec import ConvGeometry
    g = ConvGeometry(cin, kernel, strides, pads, dilations)
    rng = np.random.default_rng(cin * 100 + H + N)
    params = random_spn(rng, g.D, 6, 10)
    X = rng.standard_normal((N, cin, H, W)).astype(np.float32)
    monkeypatch.setenv("LUTCOMPILE_KERNEL_PATH", path)
    for relu in (False, True):
        want = spn.conv_reference(X, params, g, relu)
        assert want.shape == (N, 6, *g.output_size(H, W))
        for threads in (1, 2):
            assert run_spn(spn_conv_model(params, g, relu), X, threads).tobytes() == want.tobytes(), (relu, threads)
        nodes, inits = spn.portable_nodes(params, "X", "Y", "c0", relu, geometry=g)
        graph = helper.make_graph(nodes, "p", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(X.shape))],
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        got = make_session(model).run(None, {"X": X})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.bad_input
@pytest.mark.parametrize("overrides, needle", [
    ({"in_channels": 2}, "D = 9 but in_channels*kh*kw = 18"),
    ({"kernel_shape": [3]}, "attribute 'kernel_shape' must have 2 values"),
    ({"pads": [0, 0, -1, 0]}, "pads[2] = -1 out of range"),
])
def test_bad_spn_conv_geometry_is_refused_at_session_creation(overrides, needle):
    from lutcompile.ops.spec import ConvGeometry
    g = ConvGeometry(1, (3, 3))
    params = random_spn(np.random.default_rng(0), 9, 4, 5)
    with pytest.raises(Exception, match=re.escape(needle)):
        ort.InferenceSession(spn_conv_model(params, g, **overrides).SerializeToString(), lutcompile.session_options(1),
                             providers=["CPUExecutionProvider"])
