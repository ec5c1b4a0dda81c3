"""The automatic budget search (max_accuracy_drop / max_output_error) on a small real model: the
digits MLP, calibrated on its 1,297 training rows. Every target is checked independently, by
running the written model file and the original model in onnxruntime on the held-out rows.

The searches that compare plans use a fixed cost model (seconds proportional to a node's
multiply-adds, exact, or to its lookups), so that which nodes they replace does not depend on
how busy the machine is; the cost model measured in onnxruntime is tested on its own, and the
command-line runs use it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lutcompile
from lutcompile.budget import search as budget
from lutcompile.tools import cli
from lutcompile.compile import frontend
from lutcompile.budget.search import BudgetOptions, CostModel, Sensitivity
from lutcompile.compile.calibrate import load_calibration
from lutcompile.errors import OptionsError

CANDIDATES = (4, 8, 16, 32, 64)


@pytest.fixture(scope="module")
def calib(digits_split):
    Xtr, ytr, _, _ = digits_split
    return {"input": Xtr, "labels": ytr}


@pytest.fixture(scope="module")
def flop_cost(digits_model):
    """Exact: D*M multiply-adds; lookups: C*(M + 16) table reads and tree steps (ns each)."""
    targets = frontend.analyse(digits_model).targets
    return CostModel(256, {t.name: {None: 1e-9 * t.D * t.M,
                                    **{C: 1e-9 * C * (t.M + 16) for C in CANDIDATES if C <= t.D}}
                           for t in targets})


@pytest.fixture(scope="module")
def searches(digits_model, calib, flop_cost, tmp_path_factory):
    """{limit: (CompileResult, written model path)} for a tight and a loose accuracy target."""
    folder = tmp_path_factory.mktemp("budget")
    out = {}
    for limit in (0.03, 0.15):
        path = folder / f"budget_{limit}.onnx"
        # plans judged by the fixed cost model alone: whole-model timing would tie them to machine noise
        options = BudgetOptions(cost_model=flop_cost, time_whole_model=False)
        result = lutcompile.compile_model(digits_model, path, calib, max_accuracy_drop=limit,
                                          budget_options=options, progress=False)
        out[limit] = (result, path)
    return out


def first_output(model, X: np.ndarray) -> np.ndarray:
    """The model's logits in onnxruntime (with our kernel library, which plain models ignore)."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, lutcompile.session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})[0]


def lookups(path) -> dict[str, int]:
    """{node name: C} of the LutMatMul nodes in a model file."""
    return {n.name: next(a.i for a in n.attribute if a.name == "C")
            for n in onnx.load(str(path)).graph.node if n.op_type == "LutMatMul"}


@pytest.mark.slow
@pytest.mark.parametrize("limit", [0.03, 0.15])
def test_chosen_model_meets_the_accuracy_target_on_held_out_rows(searches, digits_model, calib, limit):
    result, path = searches[limit]
    b = result.budget
    assert sorted(np.concatenate([b.fit_rows, b.held_out_rows]).tolist()) == list(range(len(calib["labels"])))
    assert len(b.held_out_rows) == round(0.2 * len(calib["labels"]))
    X, y = calib["input"][b.held_out_rows], calib["labels"][b.held_out_rows]
    before = np.mean(np.argmax(first_output(digits_model, X), axis=1) == y)
    after = np.mean(np.argmax(first_output(path, X), axis=1) == y)
    assert before - after <= limit + 1e-9  # a drop of exactly the limit, up to float rounding
    assert b.measured == pytest.approx(before - after, abs=1e-12)
    assert (b.accuracy_before, b.accuracy_after) == (pytest.approx(before), pytest.approx(after))
    # the file holds exactly the plan: the replaced nodes at their counts, the others exact
    assert lookups(path) == b.replaced
    assert {s.name for s in result.skipped} == {n for n, C in b.plan.items() if C is None}
    assert all(v.met == (v.measured <= limit + 1e-9) for v in b.verifications)
    assert len(b.verifications) <= BudgetOptions().max_verifications


def test_a_looser_target_replaces_at_least_as_many_nodes(searches):
    tight, loose = (lookups(searches[limit][1]) for limit in (0.03, 0.15))
    assert len(loose) >= len(tight)
    assert len(loose) >= 1  # the loose target does buy speed on this model
    tight_b, loose_b = searches[0.03][0].budget, searches[0.15][0].budget
    assert loose_b.seconds <= tight_b.seconds <= tight_b.seconds_exact


def test_greedy_path_takes_the_most_time_per_loss_first():
    """Two nodes, hand-worked: seconds saved per predicted drop added, the floor charged."""
    cost = CostModel(256, {"A": {None: 10.0, 16: 4.0, 4: 2.0}, "B": {None: 6.0, 16: 5.0, 4: 1.0}})
    sens = Sensitivity("accuracy", {"A": {16: 0.01, 4: 0.05}, "B": {16: 0.002, 4: 0.025}}, floor=0.004)
    path = budget.greedy_path(cost, sens, {"A": [4, 16], "B": [4, 16]})
    # ratios from all exact: A->16 6/0.01=600, A->4 8/0.05=160, B->16 1/0.004=250, B->4 5/0.025=200
    assert [(m.node, m.before, m.after) for m in path] == [("A", None, 16), ("B", None, 16), ("B", 16, 4),
                                                           ("A", 16, 4)]
    assert [m.seconds for m in path] == [10.0, 9.0, 5.0, 3.0]
    assert [m.predicted for m in path] == pytest.approx([0.01, 0.014, 0.035, 0.075])
    predicted = [0.0] + [m.predicted for m in path]
    assert [budget.furthest_within(predicted, t) for t in (0.0, 0.012, 0.02, 0.05, 1.0)] == [0, 1, 2, 3, 4]
    assert budget.plan_at(path, 3, ["A", "B"]) == {"A": 16, "B": 4}


def test_budget_path_inserts_the_moves_that_still_fit():
    """On the hand-worked path above, a limit of 0.005 is left by its first move (A to 16,
    0.01); B to 16 (0.002, charged the floor 0.004) still fits, so it comes first, and the
    path then goes on unconstrained from there."""
    cost = CostModel(256, {"A": {None: 10.0, 16: 4.0, 4: 2.0}, "B": {None: 6.0, 16: 5.0, 4: 1.0}})
    sens = Sensitivity("accuracy", {"A": {16: 0.01, 4: 0.05}, "B": {16: 0.002, 4: 0.025}}, floor=0.004)
    choices = {"A": [4, 16], "B": [4, 16]}
    path = budget.budget_path(cost, sens, choices, 0.005)
    assert [(m.node, m.before, m.after) for m in path] == [("B", None, 16), ("A", None, 16), ("B", 16, 4),
                                                           ("A", 16, 4)]
    assert [m.predicted for m in path] == pytest.approx([0.004, 0.014, 0.035, 0.075])
    # where the plain path stays within the limit, nothing changes
    plain = budget.greedy_path(cost, sens, choices)
    assert budget.budget_path(cost, sens, choices, 0.02) == plain
    assert budget.budget_path(cost, sens, choices, 0.0) == plain  # nothing fits 0


@pytest.mark.parametrize("factor,limit,max_verifications,slow,visited,best", [
    (2.0, 0.04, 4, None, [(3, False), (2, True)], 2),  # over at 3: revert one move, 2 is within
    (2.0, 0.04, 1, None, [(3, False)], 0),  # no compile left: all exact
    # well within at 2 (0.0035, counted as the floor 0.004: scale 0.29) the rescaled predictions
    # allow 3; at 3 (scale 0.25), 4
    (0.25, 0.02, 4, None, [(2, True), (3, True), (4, True)], 4),
    (0.25, 0.02, 4, 3, [(2, True), (3, False)], 2),  # 3 is within but the whole model is not faster
    # no point predicted within 0.005: the first move is probed, as fine-tuning may recover it;
    # within (scale 0.4: 0.0025 counted as the floor 0.004), the rescaled 2 (0.0056) is over
    (0.25, 0.005, 4, None, [(1, True)], 1),
    (2.0, 0.005, 4, None, [(1, False)], 0),  # the probe fails: all exact
])
def test_verification_backs_off_and_steps_forward(factor, limit, max_verifications, slow, visited, best):
    """Compiles that measure `factor` times the prediction, on the hand-worked path above (the
    point `slow` is not faster than the original as a whole)."""
    cost = CostModel(256, {"A": {None: 10.0, 16: 4.0, 4: 2.0}, "B": {None: 6.0, 16: 5.0, 4: 1.0}})
    sens = Sensitivity("accuracy", {"A": {16: 0.01, 4: 0.05}, "B": {16: 0.002, 4: 0.025}}, floor=0.004)
    path = budget.greedy_path(cost, sens, {"A": [4, 16], "B": [4, 16]})
    found, verifications = budget.verify_path(path, ["A", "B"], budget.Goal("accuracy", limit), sens.floor,
                                              lambda plan, moves: (factor * sens.predict(plan), moves != slow),
                                              max_verifications)
    assert [(v.moves, v.met) for v in verifications] == visited
    assert found == best


def test_measured_cost_model_times_every_option(digits_model, calib):
    analysis = frontend.analyse(digits_model)
    data = load_calibration(calib, analysis.model)
    choices = {t.name: [C for C in CANDIDATES if C <= t.D] for t in analysis.targets}
    cost = budget.measure_costs(analysis.model, analysis.targets, choices, data, batch=256, repetitions=3)
    assert cost.batch == 256
    assert {n: sorted(t, key=lambda c: c or 0) for n, t in cost.seconds.items()} == {
        "fc0": [None, 4, 8, 16, 32, 64], "fc1": [None, 4, 8, 16, 32], "fc2": [None, 4, 8, 16, 32]}
    assert all(0 < s < 1 for times in cost.seconds.values() for s in times.values())


def test_candidate_subvectors_add_a_width_per_node(digits_model):
    """BudgetOptions.subvectors (--candidate-subvectors): a node of input width D also tries
    ceil(D / S) codebooks; digits' widths are 64, 48 and 32."""
    targets = frontend.analyse(digits_model).targets
    choices = budget.candidate_choices(targets, budget.BudgetOptions(candidates=(8, 64), subvectors=(9, 16)))
    assert choices == {"fc0": [4, 8, 64], "fc1": [3, 6, 8], "fc2": [2, 4, 8]}
    with pytest.raises(OptionsError, match="candidate sub-vectors must be positive"):
        budget.candidate_choices(targets, budget.BudgetOptions(subvectors=(0,)))


def test_target_zero_keeps_every_node_exact(digits_model, calib, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", **calib)
    onnx.save(digits_model, tmp_path / "model.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report"
    code = cli.main([str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                     "--max-accuracy-drop", "0", "--candidates", "8,32", "--report", str(report), "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert lookups(out) == {}
    X = calib["input"]
    np.testing.assert_array_equal(first_output(out, X), first_output(digits_model, X))
    assert "chosen: fc0 exact, fc1 exact, fc2 exact" in stdout
    data = json.loads((report / "report.json").read_text())["budget"]
    assert data["plan"] == {"fc0": None, "fc1": None, "fc2": None} and data["measured"] == 0.0
    assert data["verifications"] == []  # the all-exact plan is the original model: nothing to verify


def test_output_error_target_works_without_labels(digits_model, calib, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input=calib["input"])
    onnx.save(digits_model, tmp_path / "model.onnx")
    out, limit = tmp_path / "out.onnx", 0.3
    code = cli.main([str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                     "--max-output-error", str(limit), "--candidates", "8,32", "--candidate-subvectors", "16",
                     "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "budget: held-out relative output error at most 0.3000" in stdout and "path (greedy" in stdout
    data = load_calibration(tmp_path / "calib.npz", digits_model)
    _, held = budget.held_out_split(data, 0.2, seed=0)
    X = calib["input"][held]
    exact, approx = first_output(digits_model, X), first_output(out, X)
    assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) <= limit


def test_accuracy_target_without_labels_is_a_data_error(digits_model, calib, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input=calib["input"])
    onnx.save(digits_model, tmp_path / "model.onnx")
    code = cli.main([str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz"),
                     "-o", str(tmp_path / "out.onnx"), "--max-accuracy-drop", "0.01", "-q"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_DATA == 4
    assert err.strip() == ("lutcompile: error: --max-accuracy-drop needs labels: the calibration data has no "
                           "'labels' array (--max-output-error works without labels)")
    assert not (tmp_path / "out.onnx").exists()


def test_accuracy_and_output_targets_exclude_each_other(digits_model, calib):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["m.onnx", "--calib", "c.npz", "-o", "o.onnx", "--max-accuracy-drop", "0.01",
                  "--max-output-error", "0.1"])
    assert exit_info.value.code == cli.EXIT_USAGE
    with pytest.raises(ValueError, match="not both"):
        lutcompile.compile_model(digits_model, None, calib, max_accuracy_drop=0.01, max_output_error=0.1)


def test_with_training_rows_every_verified_plan_is_trained_on_rows_the_search_never_scores(
        digits_model, calib, flop_cost, tmp_path):
    """--max-accuracy-drop with --train: each verified plan is trained before it is scored; the
    training file here is the calibration file itself, so the search's held-out rows must be
    dropped from it, and the written model is the trained plan the search verified."""
    path = tmp_path / "budget_trained.onnx"
    options = BudgetOptions(cost_model=flop_cost, time_whole_model=False)
    result = lutcompile.compile_model(digits_model, path, calib, train=calib, epochs=2, max_accuracy_drop=0.05,
                                      budget_options=options, progress=False)
    b = result.budget
    assert b.replaced and result.training and result.training[-1].stage == "train"
    assert result.options["train_rows"] == len(calib["labels"]) - len(b.held_out_rows)
    X, y = calib["input"][b.held_out_rows], calib["labels"][b.held_out_rows]
    before = np.mean(np.argmax(first_output(digits_model, X), axis=1) == y)
    after = np.mean(np.argmax(first_output(path, X), axis=1) == y)
    assert b.measured == pytest.approx(before - after, abs=1e-12) and before - after <= 0.05 + 1e-9
    untrained = lutcompile.compile_model(digits_model, None, {k: v[b.fit_rows] for k, v in calib.items()},
                                         codebooks=b.replaced, progress=False)
    assert not np.allclose(first_output(untrained.model, X), first_output(path, X))  # the training is in the file
