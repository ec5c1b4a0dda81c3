"""The spn method through the pipeline (issue 16): compile_model(method="spn") fits, rewrites,
trains and exports SpnMatMul nodes; the written model runs in onnxruntime as the numpy
reference says on real activations; --portable runs without our library; report, inspect
and diff count the multiplications."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import scipy.linalg

import lutcompile
from lutcompile.compile.calibrate import load_calibration
from lutcompile.compile.pipeline import evaluate_accuracy
from lutcompile.errors import OptionsError
from lutcompile.ops import spn
from lutcompile.ops.spec import DOMAIN, OP_TYPE
from lutcompile.tools.diff import diff_models
from lutcompile.tools.inspection import inspect_model

from conftest import numpy_mlp
from test_diff import DIFF_SCHEMA, INSPECT_SCHEMA, check_schema

FAST = dict(finetune=False, progress=False)


def spn_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if spn.is_spn(n)]


def test_fit_scales_solve_the_least_squares_problem(digits_mlp, digits_split):
    """fit_scales' a is the least-squares a of y - b = sum_k a_k (x wb_k) wc[:, k], solved here
    by scipy's lstsq on the explicit [n*M, r] design matrix; it fits better than the TWN scales."""
    W, b = digits_mlp[0]
    X = digits_split[0][:400].astype(np.float64)
    start = spn.ternary_init(W, b, 20)
    target = X @ W + b
    fitted = spn.fit_scales(X, start, target, ridge=0.0)
    H = X @ start.wb.T.astype(np.float64)  # [n, r]
    design = (H[:, None, :] * start.wc.astype(np.float64)[None, :, :]).reshape(-1, start.width)
    expected = scipy.linalg.lstsq(design, (target - b).reshape(-1))[0]
    np.testing.assert_allclose(fitted.a, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    error = lambda p: np.linalg.norm(spn.reference(X, p) - target)  # noqa: E731
    assert error(fitted) < error(start)


@pytest.mark.parametrize("activations", ["float32", "uint8"])
def test_the_spn_method_fits_trains_and_exports_the_digits_mlp(digits_model, digits_mlp, digits_split, tmp_path,
                                                               activations):
    """Every layer SpnMatMul at r = M: training through the straight-through forward raises
    held-out accuracy well over the untrained ternarised layers; the exported nodes, run in
    onnxruntime with our kernel, equal the numpy reference of their own parameters on the
    activations they receive (from the exact first layers' outputs onwards). With uint8
    activations too: the training fake-quantises as the kernel quantises."""
    Xtr, ytr, Xte, yte = digits_split
    test = load_calibration({"input": Xte, "labels": yte}, digits_model)
    out = tmp_path / "spn.onnx"
    result = lutcompile.compile_model(digits_model, out, {"input": Xtr, "labels": ytr},
                                      train={"input": Xtr, "labels": ytr}, method="spn", epochs=25,
                                      spn_activations=activations, **FAST)
    before, after = evaluate_accuracy(result.before_training, test), evaluate_accuracy(str(out), test)
    exact = float((numpy_mlp(digits_mlp, Xte).argmax(1) == yte).mean())
    print(f"spn digits MLP, {activations}: untrained {before:.3f}, trained {after:.3f}, exact {exact:.3f}")
    assert after >= before + 0.1 and after >= exact - 0.05, (before, after, exact)
    model = onnx.load(out)
    nodes = spn_nodes(model)
    assert [n.name for n in nodes] == ["fc0", "fc1", "fc2"] and all(r.method == "spn" for r in result.nodes)
    # each node's own input and output, from the written model in onnxruntime
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for n in nodes:
        probe.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                   for t in (n.input[0], n.output[0])])
    so = ort.SessionOptions()
    so.register_custom_ops_library(lutcompile.library_path())
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {"input": Xte})))
    for n in nodes:
        params, relu = spn.params_from_node(n)
        assert params.uint8_activations == (activations == "uint8")
        np.testing.assert_array_equal(values[n.output[0]], spn.kernel_reference(values[n.input[0]], params, relu))
        # the report's count is the node's: r multiplications, one addition per nonzero but the first
        report = next(r for r in result.nodes if r.name == n.name)
        assert report.spn == spn.LayerCount.of(params)


def test_portable_output_runs_without_the_library(digits_model, digits_split, tmp_path):
    """--portable: only standard ops, plain onnxruntime, the SpnMatMul model's outputs within
    float rounding (a GEMM sums in its own order)."""
    Xtr, ytr, Xte, _ = digits_split
    kwargs = dict(method="spn", spn_width=24, **FAST)
    custom = lutcompile.compile_model(digits_model, tmp_path / "spn.onnx", {"input": Xtr}, **kwargs)
    portable = lutcompile.compile_model(digits_model, tmp_path / "portable.onnx", {"input": Xtr}, portable=True,
                                        **kwargs)
    assert portable.options["portable"] and all(n.domain in ("", "ai.onnx") for n in portable.model.graph.node)
    assert DOMAIN not in {o.domain for o in portable.model.opset_import}
    plain = ort.InferenceSession(str(tmp_path / "portable.onnx"), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.register_custom_ops_library(lutcompile.library_path())
    ours = ort.InferenceSession(custom.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a, b = plain.run(None, {"input": Xte})[0], ours.run(None, {"input": Xte})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    assert [spn.params_from_node(n)[0].width for n in spn_nodes(custom.model)] == [24, 24, 24]


def test_methods_per_node_inspect_and_diff(digits_model, digits_split, tmp_path):
    """method={node: "spn"}: that node SpnMatMul, the others lookups; inspect and diff count
    its multiplications against the exact layer's (64 x 48 = 3,072 -> r = 48)."""
    Xtr = digits_split[0][:800]
    result = lutcompile.compile_model(digits_model, tmp_path / "mixed.onnx", {"input": Xtr}, method={"fc0": "spn"},
                                      codebooks=8, report_dir=tmp_path / "report", **FAST)
    kinds = {n.name: n.op_type for n in result.model.graph.node if n.domain == DOMAIN}
    assert kinds == {"fc0": spn.SPN_OP_TYPE, "fc1": OP_TYPE, "fc2": OP_TYPE}
    params, _ = spn.params_from_node(spn_nodes(result.model)[0])
    count = spn.operations(params)
    found = inspect_model(tmp_path / "mixed.onnx")
    assert found.consistent and len(found.lookup_nodes) == 2
    (node,) = found.spn_nodes
    assert (node.count.multiplications, node.count.additions, node.count.exact_multiplications) == \
        (48, count.additions, 64 * 48)
    data = json.loads(json.dumps(found.to_json()))
    check_schema(data, INSPECT_SCHEMA)
    assert data["spn_nodes"][0]["count"]["width"] == 48
    check_schema(json.loads(json.dumps(diff_models(digits_model, result.model).to_json())), DIFF_SCHEMA)
    side = next(n for n in diff_models(digits_model, result.model).nodes if n.name == "fc0")
    assert side.status == "replaced" and (side.a.multiplications, side.b.multiplications) == (64 * 48, 48)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["nodes"][0]["method"] == "spn" and report["nodes"][0]["spn"]["multiplications"] == 48
    assert "3,072 → 48" in (tmp_path / "report" / "report.html").read_text()


@pytest.mark.bad_input
@pytest.mark.parametrize("kwargs,message", [
    (dict(method="nonesuch"), "unknown method 'nonesuch'"),
    (dict(method={"nonesuch": "spn"}), "method for node 'nonesuch'"),
    (dict(method="spn", spn_width=0), "spn_width must be a whole number >= 1"),
    (dict(portable=True), "portable writes spn nodes as standard ops"),
    (dict(method="spn", spn_activations="int4"), "unknown spn activations 'int4'"),
    (dict(method="spn", spn_activations="uint8", portable=True), "uint8 activations .* have no standard-op form"),
])
def test_bad_method_options_are_one_line_errors(digits_model, digits_split, kwargs, message):
    with pytest.raises(OptionsError, match=message):
        lutcompile.compile_model(digits_model, None, {"input": digits_split[0][:200]}, **kwargs, **FAST)


def test_the_last_phase_trains_a_alone(digits_model, digits_split):
    """train(train_spn_scales=True), the authors' third phase (TrainOptions.scale_epochs): the
    ternary weights and the bias stay as they were, a moves, and held-out loss does not rise
    (the kept epoch is the best)."""
    from lutcompile.compile.finetune import FinetuneOptions, train
    Xtr, ytr = digits_split[0], digits_split[1]
    compiled = lutcompile.compile_model(digits_model, None, {"input": Xtr}, method="spn", **FAST)
    data = load_calibration({"input": Xtr, "labels": ytr}, digits_model)
    done = train(compiled.model, data, digits_model, set(), FinetuneOptions(), epochs=3, lr=1e-3,
                 train_spn_scales=True, stage="train a")
    before = [spn.params_from_node(n)[0] for n in spn_nodes(compiled.model)]
    after = [spn.params_from_node(n)[0] for n in spn_nodes(done.model)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a.wb, b.wb)
        np.testing.assert_array_equal(a.wc, b.wc)
        np.testing.assert_array_equal(a.bias, b.bias)
    assert done.curve.best_epoch > 0  # a trained epoch was kept: a moved by more than rounding
    assert max(np.abs(a.a - b.a).max() / np.abs(b.a).max() for a, b in zip(after, before)) > 1e-3
    losses = [e.held_out_loss for e in done.curve.epochs]
    assert losses[done.curve.best_epoch] == min(losses)


def test_the_spn_method_replaces_a_cnn_and_trains_it(tmp_path):
    """The shipped Fashion-MNIST CNN with its Convs as SpnConv and Gemms as SpnMatMul (the first
    conv, 9 inputs a patch, stays exact as for every method): training raises accuracy well over
    the untrained layers, and each SpnConv node, run in onnxruntime, equals spn.conv_reference of
    its own parameters on the activations it receives."""
    from pathlib import Path
    from lutcompile.ops.node_format import geometry_from_node
    models = Path(__file__).resolve().parent.parent / "models"
    cal = np.load(models / "fashion_calib.npz")
    data = {"input": cal["input"][:1500], "labels": cal["labels"][:1500]}
    test = load_calibration({"input": cal["input"][1500:], "labels": cal["labels"][1500:]},
                            onnx.load(models / "fashion_cnn.onnx"))
    out = tmp_path / "cnn_spn.onnx"
    result = lutcompile.compile_model(models / "fashion_cnn.onnx", out, data, train=data, method="spn", epochs=3,
                                      **FAST)
    before, after = evaluate_accuracy(result.before_training, test), evaluate_accuracy(str(out), test)
    print(f"spn Fashion-MNIST CNN on 1,500 rows: untrained {before:.3f}, trained {after:.3f}")
    assert after >= before + 0.2, (before, after)
    model = onnx.load(out)
    kinds = [n.op_type for n in model.graph.node if n.domain == DOMAIN]
    assert kinds == [spn.SPN_CONV_OP_TYPE, spn.SPN_CONV_OP_TYPE, spn.SPN_OP_TYPE, spn.SPN_OP_TYPE]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    convs = [n for n in model.graph.node if n.op_type == spn.SPN_CONV_OP_TYPE]
    for n in convs:
        probe.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                   for t in (n.input[0], n.output[0])])
    sess = ort.InferenceSession(probe.SerializeToString(), lutcompile.session_options(1),
                                providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": cal["input"][1500:1600]})))
    for n in convs:
        params, relu = spn.params_from_node(n)
        want = spn.conv_reference(values[n.input[0]], params, geometry_from_node(n), relu)
        assert values[n.output[0]].tobytes() == want.tobytes()
    # --portable: the whole CNN in plain onnxruntime, within float rounding
    lowered = spn.lower_to_standard_ops(model)
    plain = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"])
    a = plain.run(None, {"input": cal["input"][1500:1600]})[0]
    b = sess.run(None, {"input": cal["input"][1500:1600]})[0]
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())
