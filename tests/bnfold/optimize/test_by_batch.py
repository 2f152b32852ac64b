"""One graph routed by batch size (bnfold.optimizer.by_batch): the plan on made-up timings,
the routed graph through real onnxruntime sessions, bit for bit against its branches."""

import numpy as np
import onnx
import pytest
import torch
from optimize_graphs import small_cnn

import bnfold
from bnfold.optimizer import pipeline
from bnfold.optimizer.accuracy import compare
from bnfold.optimizer.budget import Budget
from bnfold.optimizer.by_batch import Routing, crossover, plan, route_by_batch
from bnfold.optimizer.inputs import input_spec
from bnfold.optimizer.timing import make_session

B1, B8 = "batch=1", "batch=8"


def test_plan_routes_when_fp32_wins_at_batch_1_and_int8_at_batch_8():
    # EfficientNet-B0 on the AMD EPYC, run 7: INT8 8% slower at batch 1, 15% faster at 8
    ratios = {
        "fp32": {B1: 1.0, B8: 1.0},
        "int8_minmax": {B1: 1.088, B8: 0.866},
        "int8_percentile": {B1: 1.076, B8: 0.843},
    }
    routing = plan(ratios, dict.fromkeys(ratios, True), 0.016)
    assert routing == Routing("fp32", "int8_percentile", 1, routing.why)
    assert routing.name == "by_batch:fp32|int8_percentile"
    assert "1.076x" in routing.why and "0.843x" in routing.why


def test_plan_routes_the_other_way_too():
    ratios = {"int8": {B1: 0.8, B8: 1.2}}
    routing = plan(ratios, {"int8": True}, 0.01)
    assert (routing.small, routing.large) == ("int8", "fp32")


@pytest.mark.parametrize(
    ("ratios", "met", "noise"),
    [
        ({"int8": {B1: 0.7, B8: 0.6}}, {"int8": True}, 0.01),  # one winner everywhere
        ({"int8": {B1: 1.01, B8: 0.6}}, {"int8": True}, 0.02),  # within the noise at batch 1
        ({"int8": {B1: 1.2, B8: 0.6}}, {"int8": False}, 0.01),  # over the budget
        ({"int8": {B1: 1.2}}, {"int8": True}, 0.01),  # one batch size timed
        # the two winners differ, but a third candidate is within the noise of both
        ({"a": {B1: 0.70, B8: 0.61}, "b": {B1: 0.71, B8: 0.60}}, {"a": True, "b": True}, 0.02),
    ],
)
def test_plan_builds_nothing_where_one_graph_does_as_well(ratios, met, noise):
    assert plan(ratios, met, noise) is None


@pytest.mark.parametrize(
    ("between", "max_small"),
    [
        ({}, 1),
        ({2: 0.95, 4: 1.02}, 2),  # the small-batch graph still faster at 2, not at 4
        ({2: 0.9, 4: 0.97}, 4),
        ({2: 1.0}, 1),  # a tie goes to the large-batch graph
        ({2: 1.1, 4: 0.9}, 1),  # walked upwards: stops at the first batch it loses
    ],
)
def test_crossover_moves_the_boundary_while_the_small_batch_graph_is_faster(between, max_small):
    routing = crossover(Routing("fp32", "int8", 1, "why"), between)
    assert routing.max_small == max_small and routing.between == between


def _exported(seed: int) -> onnx.ModelProto:
    return bnfold.fold_onnx(
        bnfold.export_onnx(small_cnn(seed), (torch.randn(2, 3, 16, 16),), dynamic_batch=True)
    ).model


def _outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = make_session(model, 1)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("max_small", [1, 2])
def test_the_routed_graph_runs_each_branch_bit_for_bit(max_small):
    small, large = _exported(0), _exported(1)
    routed = route_by_batch(small, large, max_small)
    onnx.checker.check_model(routed, full_check=True)
    # each branch keeps its own weights (onnxruntime prepacks a graph's own initializers)
    assert not routed.graph.initializer
    branches = {a.name: a.g for a in routed.graph.node[-1].attribute}
    assert len(branches["then_branch"].initializer) == len(small.graph.initializer)
    assert len(branches["else_branch"].initializer) == len(large.graph.initializer)
    rng = np.random.default_rng(0)
    for batch in (1, 2, 3, 5):
        x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        expected = _outputs(small if batch <= max_small else large, x)
        other = _outputs(large if batch <= max_small else small, x)
        got = _outputs(routed, x)
        assert got.shape == (batch, 10)
        np.testing.assert_array_equal(got, expected)
        assert not np.array_equal(got, other)  # the branches do differ
    assert {p.key: p.value for p in routed.metadata_props}["bnfold.by_batch"] == str(max_small)


def test_route_by_batch_refuses_graphs_with_other_inputs():
    small = _exported(0)
    other = _exported(1)
    other.graph.input[0].name = "image"
    for node in other.graph.node:
        node.input[:] = ["image" if n == small.graph.input[0].name else n for n in node.input]
    with pytest.raises(ValueError, match="inputs differ"):
        route_by_batch(small, other)


def test_routed_candidate_of_a_real_int8_graph_is_judged_by_its_worse_branch(cnn, fast_pipeline):
    calibration = [
        np.random.default_rng(i).standard_normal((4, 3, 16, 16)).astype(np.float32)
        for i in range(3)
    ]
    result = bnfold.optimize(cnn, calibration=calibration, budget=Budget(0.5))
    by_name = {c.name: c for c in result.candidates}
    fp32, int8 = by_name["fp32"], by_name["int8_minmax"]
    name = fp32.model.graph.input[0].name
    feeds = [{name: c} for c in calibration]
    with torch.no_grad():
        reference = [np.concatenate([cnn(torch.from_numpy(c)).numpy() for c in calibration])]

    def evaluate(model, batches=None):
        acc = compare(reference, pipeline._run(model, batches or feeds))
        return True, acc

    routing = Routing("fp32", "int8_minmax", 1, "test")
    routed = pipeline._routed(routing, result.candidates, evaluate, feeds, Budget(0.5))
    assert routed.name == "by_batch:fp32|int8_minmax" and routed.precision == "fp32+int8"
    # the worse branch is INT8's; through the routed graph it is INT8's own error
    assert routed.accuracy["rel_l2"] == pytest.approx(int8.accuracy["rel_l2"], rel=1e-6)
    assert routed.accuracy["rel_l2"] > 0
    x = calibration[0]
    np.testing.assert_array_equal(_outputs(routed.model, x[:1]), _outputs(fp32.model, x[:1]))
    np.testing.assert_array_equal(_outputs(routed.model, x), _outputs(int8.model, x))
    assert routed.budget_met == (int8.budget_met and fp32.budget_met)

    # the boundary, timed between batch 1 and LARGE_BATCH (4 here: batch 2 only)
    spec = input_spec(fp32.model, None, calibration)
    measured = pipeline._with_crossover(routing, result.candidates, spec)
    assert set(measured.between) <= {2} and measured.max_small in (1, 2)
    assert measured.max_small == (2 if measured.between.get(2, 1.0) < 1.0 else 1)
