"""Training through the hard lookups (torch_program.LutModule with train_trees): the forward is
exactly the kernel's, gradients reach the thresholds and the layer's input, and the exported
model is what was trained."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import lutcompile
from lutcompile.compile.calibrate import load_calibration
from lutcompile.errors import OptionsError
from lutcompile.compile.finetune import FinetuneOptions, TrainOptions
from lutcompile.compile.torch_program import LutModule, TorchProgram
from lutcompile.ops.node_format import params_from_node
from lutcompile.ops.spec import DOMAIN, apply_reference, encode_reference
from lutcompile.onnx_io.sessions import make_session

FAST = dict(codebooks=4, partition="contiguous", table_loss="ridge", progress=False)


@pytest.fixture(scope="module")
def untrained(digits_model, digits_split):
    Xtr, ytr, _, _ = digits_split
    # unpruned: a node narrowed by compile/prune.py (after training) keeps its stored grid,
    # which the torch module's re-quantisation of the remaining columns would not reproduce
    return lutcompile.compile_model(digits_model, None, {"input": Xtr, "labels": ytr}, finetune=False,
                                    prune_columns=False, **FAST)


def lookups(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def test_trainable_trees_keep_the_kernel_forward_and_pass_gradients(untrained, digits_split):
    Xtr = digits_split[0]
    params = params_from_node(lookups(untrained.model)[0])
    lut = LutModule(params, train_tables=True, train_trees=True)
    x = torch.from_numpy(Xtr[:200]).requires_grad_(True)
    y = lut(x)
    assert np.array_equal(lut.codes(x.detach()).numpy(), encode_reference(Xtr[:200], params.split_dims, params.thresholds))
    np.testing.assert_allclose(y.detach().numpy(), apply_reference(Xtr[:200], params), rtol=1e-5, atol=1e-4)
    (y ** 2).sum().backward()
    for name, grad in (("thresholds", lut.thresholds.grad), ("input", x.grad), ("tables", lut.tables.grad)):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


@pytest.fixture(scope="module")
def trained(digits_model, digits_split):
    Xtr, ytr, _, _ = digits_split
    return {trees: lutcompile.compile_model(digits_model, None, {"input": Xtr, "labels": ytr}, finetune=False,
                                            finetune_tables=True, finetune_trees=trees,
                                            finetune_options=FinetuneOptions(table_epochs=50), **FAST)
            for trees in (False, True)}


def test_training_the_trees_raises_held_out_accuracy(untrained, trained, digits_model, digits_split):
    _, _, Xte, yte = digits_split
    held_out = load_calibration({"input": Xte, "labels": yte}, digits_model)
    before = lutcompile.evaluate_accuracy(untrained.model, held_out)
    tables = lutcompile.evaluate_accuracy(trained[False].model, held_out)
    trees = lutcompile.evaluate_accuracy(trained[True].model, held_out)
    # measured: 71.6 % -> 85.4 % (tables alone 73.6 %) at 30 epochs on an AMD EPYC with AVX-512; at 20
    # epochs 86.2 % on the machine this test was written on but 80.8 % there: the short run follows
    # the float paths torch takes on each CPU. On an Intel Xeon (Sapphire Rapids class) 30 epochs
    # gave 80.8 %, 40 82.6 %, 50 86.4 %, 60 85.8 %: 50 leave the margin on all three
    assert trees >= before + 0.10, (before, tables, trees)
    assert trees >= tables + 0.05, (before, tables, trees)
    moved = [not np.array_equal(params_from_node(a).thresholds, params_from_node(b).thresholds)
             for a, b in zip(lookups(untrained.model), lookups(trained[True].model))]
    assert all(moved)


def test_the_exported_model_is_the_trained_hard_forward(trained, digits_split):
    """onnxruntime on the written model equals the torch program's hard forward on it."""
    X = digits_split[2]
    model = trained[True].model
    session = make_session(model)
    got = session.run(None, {"input": X})[0]
    want = TorchProgram(model)(torch.from_numpy(X))[0].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.array_equal(got.argmax(1), want.argmax(1))


@pytest.fixture(scope="module")
def train_split(digits_split):
    """The digits training rows split in two: a small calibration part, and the training rows."""
    Xtr, ytr, _, _ = digits_split
    return (Xtr[:400], ytr[:400]), (Xtr, ytr)


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "distil"])
def test_training_rows_train_the_compiled_network(digits_model, digits_split, train_split, labels):
    """compile_model(train=...): with labels (distillation + cross-entropy) and without (pure
    distillation from the original model), held-out accuracy rises well above the untrained compile."""
    _, _, Xte, yte = digits_split
    (Xc, yc), (Xt, yt) = train_split
    held_out = load_calibration({"input": Xte, "labels": yte}, digits_model)
    calib = {"input": Xc, "labels": yc} if labels else {"input": Xc}
    untrained = lutcompile.compile_model(digits_model, None, calib, finetune=False, **FAST)
    result = lutcompile.compile_model(digits_model, None, calib, finetune=False, epochs=15,
                                      train={"input": Xt, "labels": yt} if labels else {"input": Xt}, **FAST)
    before = lutcompile.evaluate_accuracy(untrained.model, held_out)
    after = lutcompile.evaluate_accuracy(result.model, held_out)
    print(f"held-out {before:.3f} -> {after:.3f}")
    # measured with TrainOptions' defaults (chosen on the MNIST MLP): labels 68.2 -> 72.6 %;
    # digits at C = 4 is noisy (500 held-out rows): lr 3e-3 gave 75.2 %, the earlier recipe 76.2 %
    assert after >= before + 0.03, (before, after)
    assert result.options["train_rows"] == len(Xt) and "train" in result.seconds


def test_layerwise_schedule_replaces_and_trains_node_by_node(digits_model, digits_split, train_split):
    """TrainOptions(layerwise=True), halutmatmul's schedule: each node is fitted on the model
    trained so far and everything trains after each replacement, the epochs shared out."""
    _, _, Xte, yte = digits_split
    (Xc, yc), (Xt, yt) = train_split
    held_out = load_calibration({"input": Xte, "labels": yte}, digits_model)
    options = FinetuneOptions(train=TrainOptions(layerwise=True, epochs=7))
    result = lutcompile.compile_model(digits_model, None, {"input": Xc, "labels": yc}, finetune_options=options,
                                      train={"input": Xt, "labels": yt}, **FAST)
    names = [n.name for n in result.nodes]
    assert [c.stage for c in result.training] == [f"train after {n}" for n in names[:-1]] + ["train"]
    assert [len(c.epochs) - 1 for c in result.training] == [3, 2, 2]
    # before_training: the first node replaced and nothing trained yet
    assert len(lookups(result.model)) == 3 and len(lookups(result.before_training)) == 1
    untrained = lutcompile.compile_model(digits_model, None, {"input": Xc, "labels": yc}, finetune=False, **FAST)
    before = lutcompile.evaluate_accuracy(untrained.model, held_out)
    after = lutcompile.evaluate_accuracy(result.model, held_out)
    print(f"held-out {before:.3f} -> {after:.3f}")
    assert after >= before + 0.03, (before, after)  # measured 68.2 -> 73.6 %


@pytest.mark.bad_input
@pytest.mark.parametrize("make_train,extra,code,message", [
    (lambda t: np.savez(t / "train.npz", input=np.zeros((50, 63), np.float32)), [], 4,
     "training array 'input' has shape (50, 63), dimension 1 must be 64"),
    (lambda t: np.savez(t / "train.npz", input=np.zeros((50, 64), np.float32), labels=np.full(50, 10)), [], 4,
     "training labels must lie in [0, 10), got [10, 10]"),
    (lambda t: np.savez(t / "train.npz", input=np.zeros((50, 64), np.float32)), ["--epochs", "0"], 2,
     "epochs must be a whole number >= 1"),
    (lambda t: None, ["--epochs", "3"], 2, "--epochs sets the training of --train"),
    (lambda t: None, ["--augment", "shift=1,shape=1x8x8"], 2, "--augment sets the training of --train"),
    (lambda t: np.savez(t / "train.npz", input=np.zeros((50, 64), np.float32)), ["--augment", "rotate=x"], 2,
     "--augment: cannot read 'rotate=x'"),
    (lambda t: np.savez(t / "train.npz", input=np.zeros((50, 64), np.float32)), ["--augment", "shift=1"], 2,
     "--augment needs shape=CxHxW for input of shape [50, 64]"),
])
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, digits_model, digits_split, make_train, extra,
                                                           code, message):
    import subprocess
    import sys
    Xtr, ytr, _, _ = digits_split
    onnx.save(digits_model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "calib.npz", input=Xtr[:400], labels=ytr[:400])
    make_train(tmp_path)
    train = ["--train", str(tmp_path / "train.npz")] if (tmp_path / "train.npz").exists() else []
    proc = subprocess.run([sys.executable, "-m", "lutcompile", str(tmp_path / "m.onnx"), "--calib",
                           str(tmp_path / "calib.npz"), "-o", str(tmp_path / "o.onnx"), "-C", "4", "-q", *train,
                           *extra], capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o.onnx").exists()


def test_subvector_sets_codebooks_from_the_input_width(digits_model, digits_split):
    """--subvector S: a node of input width D gets ceil(D / S) codebooks (digits: 64 -> 48 -> 32 -> 10)."""
    Xtr, ytr, _, _ = digits_split
    result = lutcompile.compile_model(digits_model, None, {"input": Xtr[:600]}, subvector=6, finetune=False,
                                      partition="contiguous", table_loss="ridge", progress=False)
    assert [(n.D, n.codebooks) for n in result.nodes] == [(D, -(-D // 6)) for D in (64, 48, 32)]
    with pytest.raises(OptionsError, match="codebooks or subvector, not both"):
        lutcompile.compile_model(digits_model, None, {"input": Xtr[:600]}, codebooks=4, subvector=6)
    with pytest.raises(OptionsError, match="subvector must be a whole number >= 1"):
        lutcompile.compile_model(digits_model, None, {"input": Xtr[:600]}, subvector=0)


def test_a_method_that_cannot_train_refuses_training_rows(monkeypatch, digits_model, digits_split):
    from dataclasses import replace as replaced
    from lutcompile.compile import methods
    from lutcompile.compile.pipeline import CompileOptions

    class Frozen(methods.LookupMethod):
        name, trainable = "frozen", False
    monkeypatch.setitem(methods.METHODS, "frozen", Frozen())
    Xtr = digits_split[0]
    with pytest.raises(OptionsError, match="method 'frozen' cannot train"):
        lutcompile.compile_model(digits_model, None, {"input": Xtr}, train={"input": Xtr},
                                 options=replaced(CompileOptions(), method="frozen"), **FAST)


def test_held_out_training_rows_are_fitted_on_by_no_stage(digits_model, digits_split, tmp_path):
    """The train stage's held-out rows are dropped from the calibration rows when the two sets
    share them; report.json carries the training curve, epoch 0 being the untrained model."""
    import json
    from lutcompile.compile.calibrate import CalibrationData, without_rows
    from lutcompile.compile.finetune import held_out_rows
    Xtr, ytr, _, _ = digits_split
    data = CalibrationData({"input": Xtr}, ytr)
    held = held_out_rows(len(Xtr), FinetuneOptions())
    kept = without_rows(data, data.subset(held))
    assert kept.rows == len(Xtr) - len(held) and len(held) == int(0.05 * len(Xtr))
    assert not ({r.tobytes() for r in kept.inputs["input"]} & {r.tobytes() for r in Xtr[held]})

    result = lutcompile.compile_model(digits_model, None, {"input": Xtr, "labels": ytr}, epochs=3,
                                      train={"input": Xtr, "labels": ytr}, report_dir=tmp_path, **FAST)
    assert result.calibration_rows == kept.rows
    report = json.loads((tmp_path / "report.json").read_text())
    curve = next(c for c in report["training"] if c["stage"] == "train")
    assert [e["epoch"] for e in curve["epochs"]] == [0, 1, 2, 3] and curve["epochs"][0]["train_loss"] is None
    assert 0 <= curve["best_epoch"] <= 3 and curve["reference_accuracy"] > 0.8
    # epoch 0 is the untrained compile, on the held-out rows
    untrained = lutcompile.evaluate_accuracy(result.before_training, CalibrationData({"input": Xtr[held]}, ytr[held]))
    assert curve["epochs"][0]["held_out_accuracy"] == pytest.approx(untrained, abs=1.5 / len(held))
    assert 'id="plot-training"' in (tmp_path / "report.html").read_text()


def test_uncompressed_training_rows_are_memory_mapped_and_train_the_same_model(digits_model, digits_split, tmp_path):
    """np.savez (stored) training files are memory-mapped, not read: loading 8 MB of rows
    allocates almost nothing (tracemalloc sees numpy's allocations), while the compressed file
    is read into memory once. Training from the map gives the very model the in-memory rows do."""
    import tracemalloc
    Xtr, ytr, _, _ = digits_split
    rows = np.tile(Xtr, (25, 1))  # 32,425 rows x 64 floats = 8.3 MB
    labels = np.tile(ytr, 25)
    np.savez(tmp_path / "stored.npz", input=rows, labels=labels)
    np.savez_compressed(tmp_path / "compressed.npz", input=rows, labels=labels)
    peaks = {}
    for name in ("stored", "compressed"):
        tracemalloc.start()
        data = load_calibration(tmp_path / f"{name}.npz", digits_model, "training")
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(data.inputs["input"], rows)
        np.testing.assert_array_equal(data.labels, labels)
    # the map's only allocations: the finite-values check's chunk of booleans (a quarter of
    # the floats here, bounded by calibrate.CHECK_BYTES / 4 for larger files) and the labels
    assert peaks["stored"] < 0.3 * rows.nbytes < rows.nbytes <= peaks["compressed"]

    np.savez(tmp_path / "train.npz", input=Xtr, labels=ytr)
    loaded = load_calibration(tmp_path / "train.npz", digits_model).inputs["input"]
    assert isinstance(loaded, np.memmap) or isinstance(loaded.base, np.memmap)  # a view of the map, not a copy
    calib = {"input": Xtr[:600], "labels": ytr[:600]}
    mapped = lutcompile.compile_model(digits_model, None, calib, train=tmp_path / "train.npz", epochs=2, **FAST)
    in_memory = lutcompile.compile_model(digits_model, None, calib, train={"input": Xtr, "labels": ytr},
                                         epochs=2, **FAST)
    assert mapped.model.SerializeToString() == in_memory.model.SerializeToString()
    assert mapped.model.SerializeToString() != lutcompile.compile_model(
        digits_model, None, calib, **FAST).model.SerializeToString()


@pytest.mark.bad_input
def test_an_unknown_objective_is_refused_before_training(untrained, digits_split):
    from lutcompile.compile.calibrate import CalibrationData
    from lutcompile.compile.finetune import train
    with pytest.raises(ValueError, match="unknown objective 'nope'"):
        train(untrained.model, CalibrationData({"input": digits_split[0][:100]}), None, set(),
              FinetuneOptions(objective="nope"), train_tables=True)


def test_resplit_learns_split_dimensions_on_the_trained_activations(digits_model, digits_split, train_split):
    """TrainOptions(resplit_every=N): between epochs every lookup's trees are learned afresh on
    its inputs as the trained network computes them, split dimensions included. The written
    model holds new split dimensions, and onnxruntime on it equals the torch program's hard
    forward (the export is what was trained); a re-split refits the tables to the node's
    present output, so the network it sits in keeps most of its accuracy."""
    from dataclasses import replace as replaced
    from lutcompile.compile.finetune import _resplit
    _, _, Xte, yte = digits_split
    (Xc, yc), (Xt, yt) = train_split
    tune = replaced(FinetuneOptions(), train=TrainOptions(resplit_every=2, ema=0.0))
    result = lutcompile.compile_model(digits_model, None, {"input": Xc, "labels": yc}, finetune=False, epochs=5,
                                      train={"input": Xt, "labels": yt}, finetune_options=tune,
                                      prune_columns=False, **FAST)
    before, after = lookups(result.before_training), lookups(result.model)
    assert any(not np.array_equal(params_from_node(a).split_dims, params_from_node(b).split_dims)
               for a, b in zip(before, after))
    got = make_session(result.model).run(None, {"input": Xte})[0]
    want = TorchProgram(result.model)(torch.from_numpy(Xte))[0].detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    # one re-split on its own: new trees, and the held-out accuracy stays near where it was
    from lutcompile.compile import frontend
    from lutcompile.compile.fit import FitOptions, TreeSource
    program = TorchProgram(result.model, set(), train_tables=True, train_trees=True)
    sources = {t.name: TreeSource(np.array_split(np.arange(t.D), 4), t.weight, FitOptions(partition="contiguous"))
               for t in frontend.analyse(digits_model).targets}

    def accuracy() -> float:
        with torch.no_grad():
            return float((program(torch.from_numpy(Xte))[0].argmax(1).numpy() == yte).mean())
    start = accuracy()
    dims = [m.split_dims.clone() for m in program.lut_modules().values()]
    _resplit(program, sources, [torch.from_numpy(Xt)], np.arange(len(Xt)), 64, None, seed=0)
    assert any(not torch.equal(d, m.split_dims) for d, m in zip(dims, program.lut_modules().values()))
    print(f"held-out {start:.3f} -> {accuracy():.3f} after a re-split")
    assert accuracy() >= start - 0.10, (start, accuracy())
