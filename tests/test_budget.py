"""The automatic budget search (max_accuracy_drop / max_output_error) on a small real model: the
digits MLP, calibrated on its 1,297 training rows. Every target is checked independently, by
running the written model file and the original model in onnxruntime on the held-out rows.

The searches that compare plans use a fixed cost model (seconds proportional to a node's
multiply-adds, exact, or to its lookups), so that which nodes they replace does not depend on
how busy the machine is; the cost model measured in onnxruntime is tested on its own, and the
command-line runs use it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import lutcompile
from lutcompile.budget import search as budget
from lutcompile.tools import cli
from lutcompile.compile import frontend
from lutcompile.budget.search import BudgetOptions, CostModel, Sensitivity
from lutcompile.budget.cost import MultiplicationCount, SumProduct, count_multiplications
from lutcompile.ops import counting
from lutcompile.compile.calibrate import load_calibration
from lutcompile.errors import OptionsError

MODELS = Path(__file__).resolve().parent.parent / "models"

CANDIDATES = (4, 8, 16, 32, 64)


@pytest.fixture(scope="module")
def calib(digits_split):
    Xtr, ytr, _, _ = digits_split
    return {"input": Xtr, "labels": ytr}


def flop_seconds(target, option) -> float:
    """Exact: D*M multiply-adds; lookups: C*(M + 16) table reads and tree steps; a sum-product
    layer of width r: r*(D + M) additions, at most (ns each)."""
    if option is None:
        return 1e-9 * target.D * target.M
    if isinstance(option, SumProduct):
        return 1e-9 * option.width * (target.D + target.M)
    return 1e-9 * option * (target.M + 16)


@pytest.fixture(scope="module")
def flop_cost(digits_model):
    """Every default candidate's flop_seconds."""
    targets = frontend.analyse(digits_model).targets
    choices = budget.candidate_choices(targets, BudgetOptions())
    return CostModel(256, {t.name: {o: flop_seconds(t, o) for o in [None, *choices[t.name]]} for t in targets})


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
    choices = budget.candidate_choices(targets, budget.BudgetOptions(candidates=(8, 64), subvectors=(9, 16),
                                                                     spn_widths=()))
    assert choices == {"fc0": [4, 8, 64], "fc1": [3, 6, 8], "fc2": [2, 4, 8]}
    with pytest.raises(OptionsError, match="candidate sub-vectors must be positive"):
        budget.candidate_choices(targets, budget.BudgetOptions(subvectors=(0,)))


def test_candidate_spn_widths_are_multiples_of_each_nodes_outputs(digits_model):
    """BudgetOptions.spn_widths (--candidate-spn-widths): r = round(f M), at least 1, after the
    lookups; digits' output counts are 48, 32 and 10. No candidate at all is refused."""
    targets = frontend.analyse(digits_model).targets
    choices = budget.candidate_choices(targets, budget.BudgetOptions(candidates=(8,), spn_widths=(0.5, 1, 0.01)))
    assert choices == {"fc0": [8, SumProduct(1), SumProduct(24), SumProduct(48)],
                       "fc1": [8, SumProduct(1), SumProduct(16), SumProduct(32)],
                       "fc2": [8, SumProduct(1), SumProduct(5), SumProduct(10)]}
    assert budget.candidate_choices(targets, budget.BudgetOptions(candidates=()))["fc2"] == [SumProduct(10)]
    with pytest.raises(OptionsError, match="needs candidates"):
        budget.candidate_choices(targets, budget.BudgetOptions(candidates=(), spn_widths=()))
    with pytest.raises(OptionsError, match="spn widths must be positive"):
        budget.candidate_choices(targets, budget.BudgetOptions(spn_widths=(0,)))


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


# ------------------------------------------------------------ the multiplication budget (issue 16)

def hand_count(path) -> int:
    """A model file's multiplications per inference, by hand from its nodes (digits: no Conv):
    an SpnMatMul's R, a LutMatMul's M, a Gemm's weight D x M."""
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "SpnMatMul":
            total += a["R"]
        elif n.op_type == "LutMatMul":
            total += a["M"]
        elif n.op_type in ("Gemm", "MatMul"):
            total += weights[n.input[1]].size
    return total


def spn_widths(path) -> dict[str, int]:
    return {n.name: next(a.i for a in n.attribute if a.name == "R")
            for n in onnx.load(str(path)).graph.node if n.op_type == "SpnMatMul"}


def test_multiplications_are_counted_by_hand(digits_model):
    """Per inference: exact D x M, lookups M (the table scale), a sum-product layer r; a Conv
    per output position (the shipped CNN: 28x28, 14x14 and 7x7 outputs)."""
    targets = frontend.analyse(digits_model).targets  # 64 -> 48 -> 32 -> 10
    choices = {t.name: [16, SumProduct(5)] for t in targets}
    count = count_multiplications(digits_model, targets, choices)
    assert count.per_option == {"fc0": {None: 3072, 16: 48, SumProduct(5): 5},
                                "fc1": {None: 1536, 16: 32, SumProduct(5): 5},
                                "fc2": {None: 320, 16: 10, SumProduct(5): 5}}
    assert count.fixed == 0 and count.least == 15
    assert count.total({"fc0": 16, "fc2": SumProduct(5)}) == 48 + 1536 + 5
    assert counting.multiplications(digits_model) == 3072 + 1536 + 320
    cnn = onnx.load(MODELS / "fashion_cnn.onnx")
    weights = {t.name: numpy_helper.to_array(t).shape for t in cnn.graph.initializer}
    convs = [n for n in cnn.graph.node if n.op_type == "Conv"]
    assert counting.conv_positions(cnn) == {convs[0].name: 784, convs[1].name: 196, convs[2].name: 49}
    by_hand = sum(int(np.prod(weights[n.input[1]])) * p for n, p in zip(convs, (784, 196, 49))) + sum(
        int(np.prod(weights[n.input[1]])) for n in cnn.graph.node if n.op_type in ("Gemm", "MatMul"))
    assert counting.multiplications(cnn) == by_hand
    cnn_targets = frontend.select_targets(frontend.analyse(cnn), frontend.FrontendOptions())
    cnn_count = count_multiplications(cnn, cnn_targets, {t.name: [16] for t in cnn_targets})
    assert cnn_count.total({}) == by_hand  # what the search leaves is counted in `fixed`
    assert cnn_count.fixed == by_hand - sum(c[None] for c in cnn_count.per_option.values()) > 0


def test_greedy_path_on_multiplications_takes_the_most_saved_per_loss_first():
    """Hand-worked: A (exact 1000 multiplications, lookups 40, r=10 10), B (exact 300, lookups
    20, r=5 5); the path ranks multiplications saved per predicted drop, and each move still
    records the seconds of the cost model."""
    cost = CostModel(256, {"A": {None: 10.0, 16: 4.0, SumProduct(10): 12.0},
                           "B": {None: 6.0, 16: 5.0, SumProduct(5): 7.0}})
    sens = Sensitivity("accuracy", {"A": {16: 0.01, SumProduct(10): 0.04}, "B": {16: 0.02, SumProduct(5): 0.03}},
                       floor=0.004)
    count = MultiplicationCount({"A": {None: 1000, 16: 40, SumProduct(10): 10},
                                 "B": {None: 300, 16: 20, SumProduct(5): 5}}, fixed=7, positions={})
    choices = {"A": [16, SumProduct(10)], "B": [16, SumProduct(5)]}
    path = budget.greedy_path(cost, sens, choices, count=count)
    # from all exact: A->16 960/0.01, A->r 990/0.04, B->16 280/0.02, B->r 295/0.03; then A 16->r
    # 30/0.03 = 1000 and B 16->r 15/0.01 = 1500
    assert [(m.node, m.before, m.after) for m in path] == [
        ("A", None, 16), ("B", None, 16), ("B", 16, SumProduct(5)), ("A", 16, SumProduct(10))]
    assert [m.multiplications for m in path] == [347, 67, 52, 22]
    assert [m.seconds_saved for m in path] == [6.0, 1.0, -2.0, -8.0]  # time may grow: it is not the budget
    assert budget.first_within_count(path, count, 100) == 2
    assert budget.first_within_count(path, count, 2000) == 0
    assert budget.first_within_count(path, count, 22) == 4


@pytest.mark.parametrize("limit,outcomes,visited,best", [
    (None, [(0.5, True)], [(2, True)], 2),  # no score limit: the first point within the budget alone
    # the predictions allow 1 move only (0.01; 2 is 0.014): it starts no nearer than 2, which is
    # within; rescaled (0.01 / 0.014), 3 is predicted 0.025, over: 2 stands
    (0.012, [(0.01, True)], [(2, True)], 2),
    (0.05, [(0.03, True)] * 4, [(3, True)], 3),  # as without a budget: 3 is predicted within, 4 is not
    (0.02, [(0.03, True)] * 4, [(2, False)], None),  # over at the lowest point: nothing meets both
])
def test_verification_stays_within_the_multiplication_budget(limit, outcomes, visited, best):
    cost = CostModel(256, {"A": {None: 10.0, 16: 4.0, 4: 2.0}, "B": {None: 6.0, 16: 5.0, 4: 1.0}})
    sens = Sensitivity("accuracy", {"A": {16: 0.01, 4: 0.05}, "B": {16: 0.002, 4: 0.025}}, floor=0.004)
    path = budget.greedy_path(cost, sens, {"A": [4, 16], "B": [4, 16]})
    goal = budget.Goal("accuracy", limit, max_multiplications=100)
    results = iter(outcomes)
    found, verifications = budget.verify_path(path, ["A", "B"], goal, sens.floor,
                                              lambda plan, moves: next(results), lowest=2)
    assert [(v.moves, v.met) for v in verifications] == visited
    assert found == best


def test_the_multiplication_budget_alone_chooses_sum_product_layers(digits_model, calib, tmp_path, capsys):
    """--max-multiplications 60 on digits (exact 4,928; lookups or r = M everywhere 90): only
    sum-product layers at r = M/2 reach it; the written file holds the plan, counted by hand."""
    np.savez(tmp_path / "calib.npz", **calib)
    onnx.save(digits_model, tmp_path / "model.onnx")
    out, report = tmp_path / "out.onnx", tmp_path / "report"
    code = cli.main([str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                     "--max-multiplications", "60", "--candidates", "16", "--candidate-spn-widths", "0.5,1",
                     "--report", str(report), "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert hand_count(out) <= 60 and spn_widths(out)
    assert "at most 60 multiplications per inference" in stdout and "most multiplications saved" in stdout
    data = json.loads((report / "report.json").read_text())["budget"]
    assert data["max_multiplications"] == 60 and data["limit"] is None
    assert data["multiplications"]["exact"] == 4928 and data["multiplications"]["chosen"] == hand_count(out)
    assert {n: p for n, p in data["plan"].items() if isinstance(p, str)} == {n: f"spn:{r}"
                                                                             for n, r in spn_widths(out).items()}
    (verified,) = data["verifications"]  # the least predicted loss within the budget, verified once
    assert verified["multiplications"] == hand_count(out) and verified["met"]
    _, held = budget.held_out_split(load_calibration(tmp_path / "calib.npz", digits_model), 0.2, seed=0)
    X, y = calib["input"][held], calib["labels"][held]
    drop = np.mean(np.argmax(first_output(digits_model, X), 1) == y) - np.mean(np.argmax(first_output(out, X), 1) == y)
    assert data["measured"] == pytest.approx(drop, abs=1e-12)


def test_multiplications_and_accuracy_together(digits_model, calib, flop_cost, tmp_path):
    """A budget under fc0's exact count forces fc0 to be replaced; the plan meets both."""
    path = tmp_path / "both.onnx"
    options = BudgetOptions(cost_model=flop_cost, time_whole_model=False)
    result = lutcompile.compile_model(digits_model, path, calib, max_accuracy_drop=0.15, max_multiplications=2000,
                                      budget_options=options, progress=False)
    b = result.budget
    assert hand_count(path) <= 2000 and b.plan["fc0"] is not None
    X, y = calib["input"][b.held_out_rows], calib["labels"][b.held_out_rows]
    drop = np.mean(np.argmax(first_output(digits_model, X), 1) == y) - np.mean(np.argmax(first_output(path, X), 1) == y)
    assert drop <= 0.15 + 1e-9 and b.measured == pytest.approx(drop, abs=1e-12)


def test_unreachable_multiplication_budgets_and_methods_are_one_line_errors(digits_model, calib, tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", **calib)
    onnx.save(digits_model, tmp_path / "model.onnx")
    out = tmp_path / "out.onnx"
    code = cli.main([str(tmp_path / "model.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                     "--max-multiplications", "40", "-q"])  # lookups or r = M reach 90 at the fewest
    assert code == cli.EXIT_USAGE and not out.exists()
    assert capsys.readouterr().err.strip() == ("lutcompile: error: no plan meets 40 multiplications per inference: "
                                              "the candidates reach 90 at the fewest (0 of them in products the "
                                              "search does not replace)")
    with pytest.raises(OptionsError, match="chooses each node's method"):
        lutcompile.compile_model(digits_model, None, calib, max_multiplications=100, method="spn")
    with pytest.raises(OptionsError, match="whole number >= 0"):
        lutcompile.compile_model(digits_model, None, calib, max_multiplications=-1)
