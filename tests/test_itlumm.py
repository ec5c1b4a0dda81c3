"""ITLUMM: partitions, loss-aware tables, the torch program and the fine-tune pass, on real data."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from scipy.special import log_softmax
from sklearn.linear_model import LogisticRegression

import lutcompile
from lutcompile.compile import calibrate
from lutcompile.compile.fit import FitOptions, fit_node
from lutcompile.ops.spec import apply_reference
from lutcompile.compile.partition import partition
from lutcompile.compile.torch_program import TorchProgram

from conftest import mlp_model


def kl(exact, approx):
    le, la = log_softmax(exact, axis=1), log_softmax(approx, axis=1)
    return float(np.mean(np.sum(np.exp(le) * (le - la), axis=1)))


# --------------------------------------------------------------- partitions

@pytest.mark.parametrize("method", ["contiguous", "r2", "opq"])
def test_partitions_cover_every_dimension_once(digits, method):
    X = digits[0]  # digits has constant columns (always-blank pixels)
    assert (X.std(axis=0) == 0).sum() >= 1
    groups = partition(X, 5, method)
    assert len(groups) == 5
    assert sorted(np.concatenate(groups).tolist()) == list(range(64))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_r2_groups_constant_dimensions_apart(digits):
    X = np.hstack([digits[0], np.zeros((len(digits[0]), 16), np.float32)])  # 16 dead inputs
    groups = partition(X, 4, "r2")
    dead = set(range(64, 80))
    assert all(len(dead & set(g.tolist())) == 4 for g in groups)


@pytest.fixture(scope="module")
def correlated_classifier(digits_split):
    """Digits at 16x16 (each pixel in a 2x2 block: four perfectly correlated inputs), with the
    columns shuffled, so correlated inputs are not adjacent and a contiguous cut splits them;
    and a logistic-regression layer on them."""
    Xtr, ytr, Xte, _ = digits_split
    upsample = lambda X: X.reshape(-1, 8, 8).repeat(2, 1).repeat(2, 2).reshape(-1, 256)
    perm = np.random.default_rng(3).permutation(256)
    Xtr, Xte = upsample(Xtr)[:, perm], upsample(Xte)[:, perm]
    clf = LogisticRegression(max_iter=200).fit(Xtr, ytr)
    return Xtr, Xte, clf.coef_.T.astype(np.float32), clf.intercept_.astype(np.float32)


@pytest.mark.parametrize("C", [2, 4, 8, 16])
def test_r2_never_worse_than_contiguous_on_correlated_inputs(correlated_classifier, C):
    Xtr, Xte, W, b = correlated_classifier
    err = {}
    for method in ("contiguous", "r2"):
        params = fit_node(Xtr, W, b, None, C, FitOptions(partition=method, table_loss="ridge")).params
        exact = Xte @ W + b
        err[method] = np.linalg.norm(apply_reference(Xte, params) - exact) / np.linalg.norm(exact)
    assert err["r2"] <= err["contiguous"], err


# ------------------------------------------------------- loss-aware tables

@pytest.fixture(scope="module")
def classifier_layer(digits_split):
    Xtr, ytr, Xte, yte = digits_split
    clf = LogisticRegression(max_iter=300).fit(Xtr, ytr)
    return Xtr, Xte, clf.coef_.T.astype(np.float32), clf.intercept_.astype(np.float32)


@pytest.mark.parametrize("C", [2, 4, 8])
def test_kl_tables_beat_ridge_tables_in_kl(classifier_layer, C):
    Xtr, Xte, W, b = classifier_layer
    result = {}
    for loss in ("ridge", "kl"):
        params = fit_node(Xtr, W, b, None, C, FitOptions(partition="contiguous", table_loss=loss)).params
        result[loss] = (kl(Xtr @ W + b, apply_reference(Xtr, params)),
                        kl(Xte @ W + b, apply_reference(Xte, params)))
    assert result["kl"][0] < result["ridge"][0], result  # on the rows it was fitted to
    assert result["kl"][1] < result["ridge"][1] * 1.05, result  # and not worse held out


def test_mse_tables_beat_ridge_after_relu(digits_mlp, digits_split):
    Xtr = digits_split[0]
    W, b = digits_mlp[0]
    exact = np.maximum(Xtr @ W + b, 0)
    err = {loss: np.linalg.norm(apply_reference(Xtr, fit_node(Xtr, W, b, "Relu", 4, FitOptions(
        partition="contiguous", table_loss=loss)).params) - exact) for loss in ("ridge", "mse")}
    assert err["mse"] < err["ridge"], err


# ------------------------------------------------------------ torch program

@pytest.mark.parametrize("style", ["gemm", "matmul"])
def test_torch_program_matches_onnxruntime_on_mlp(digits_mlp, digits, style):
    model = mlp_model(digits_mlp, style)
    X = digits[0][:200]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": X})[0]
    with torch.no_grad():
        got = TorchProgram(model)(torch.from_numpy(X))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_torch_program_matches_onnxruntime_on_exported_cnn(tmp_path, digits):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(4, 6, 3, stride=1, padding=(0, 1), dilation=1),
        torch.nn.Sigmoid(), torch.nn.AvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 10)).eval()
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    X = digits[0][:64].reshape(-1, 1, 8, 8)
    path = tmp_path / "cnn.onnx"
    torch.onnx.export(net, torch.from_numpy(X[:2]), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}}, opset_version=13,
                      dynamo=False)
    import onnx
    model = onnx.load(str(path))
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": X})[0]
    with torch.no_grad():
        got = TorchProgram(model)(torch.from_numpy(X))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_torch_program_reproduces_compiled_model(digits_model, digits_split):
    Xtr, _, Xte, _ = digits_split
    compiled = lutcompile.compile_model(digits_model, None, {"input": Xtr}, codebooks=8,
                                        finetune=False, progress=False).model
    want = ort.InferenceSession(compiled.SerializeToString(), lutcompile.session_options(),
                                providers=["CPUExecutionProvider"]).run(None, {"input": Xte})[0]
    with torch.no_grad():
        got = TorchProgram(compiled)(torch.from_numpy(Xte))[0].numpy()
    close = np.all(np.isclose(got, want, rtol=1e-4, atol=1e-4), axis=1)
    assert close.mean() > 0.99  # rows may differ only where rounding flips a code


# --------------------------------------------------------- fine-tune pass

@pytest.fixture(scope="module")
def finetune_runs(digits_model, digits_split):
    Xtr, ytr, Xte, yte = digits_split
    calib = {"input": Xtr, "labels": ytr}
    held_out = calibrate.CalibrationData({"input": Xte}, yte)
    out = {}
    for name, kwargs in {"plain": dict(finetune=False),
                         "itlumm": dict(finetune=True),
                         "tables": dict(finetune=True, finetune_tables=True)}.items():
        result = lutcompile.compile_model(digits_model, None, calib, codebooks=2, progress=False, **kwargs)
        out[name] = (result, lutcompile.evaluate_accuracy(result.model, held_out))
    return out


def test_finetune_pass_improves_held_out_accuracy(finetune_runs):
    plain, itlumm = finetune_runs["plain"][1], finetune_runs["itlumm"][1]
    assert itlumm > plain + 0.02, (plain, itlumm)


def test_table_finetuning_does_not_hurt_held_out_accuracy(finetune_runs):
    itlumm, tables = finetune_runs["itlumm"][1], finetune_runs["tables"][1]
    assert tables >= itlumm - 0.01, (itlumm, tables)


def test_finetune_records_stages_and_is_on_by_default_with_labels(finetune_runs, digits_model, digits_split):
    result = finetune_runs["itlumm"][0]
    assert [s for s, _ in result.stages] == ["after fc0", "after fc1", "after fc2"]
    assert [n.op_type for n in result.model.graph.node] == ["LutMatMul"] * 3
    assert finetune_runs["tables"][0].stages[-1][0] == "tables fine-tuned"


def test_finetune_without_labels_distils(digits_model, digits_split):
    Xtr, _, Xte, yte = digits_split
    plain = lutcompile.compile_model(digits_model, None, {"input": Xtr}, codebooks=2, progress=False)
    distilled = lutcompile.compile_model(digits_model, None, {"input": Xtr}, codebooks=2, finetune=True,
                                         progress=False)
    held_out = calibrate.CalibrationData({"input": Xte}, yte)
    assert plain.stages == []  # no labels: off by default
    assert lutcompile.evaluate_accuracy(distilled.model, held_out) > \
        lutcompile.evaluate_accuracy(plain.model, held_out)
