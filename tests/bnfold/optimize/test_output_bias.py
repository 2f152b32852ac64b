"""Empirical bias correction at the graph's outputs (`bnfold.optimizer.output_bias`)."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.optimizer.accuracy import compare
from bnfold.optimizer.graph import GraphIndex
from bnfold.optimizer.output_bias import (
    apply_corrections,
    channel_mean_error,
    correct_output_bias,
    correctable_biases,
    held_out_rel_l2,
)
from bnfold.optimizer.quantize import CALIBRATION_METHODS
from bnfold.optimizer.timing import make_session


def test_channel_mean_error_is_the_mean_over_every_axis_but_the_channels():
    ref = np.zeros((2, 3, 2, 2))
    out = ref + np.array([1.0, -2.0, 0.5]).reshape(1, 3, 1, 1)
    out[0, 0, 0, 0] += 4.0  # one entry of eight in channel 0
    np.testing.assert_allclose(channel_mean_error(ref, out, 1), [1.5, -2.0, 0.5])
    logits = np.arange(6.0).reshape(1, 2, 3)  # [N, T, C]: channels last
    np.testing.assert_allclose(
        channel_mean_error(np.zeros_like(logits), logits, -1), [1.5, 2.5, 3.5]
    )


def test_held_out_error_removes_a_constant_shift_and_refuses_zero_mean_noise():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 10))
    shifted = ref + rng.standard_normal(10)  # the same error on every sample
    before, after = held_out_rel_l2([ref], [shifted], [1])
    assert before > 0.5 and after < 1e-12
    noisy = ref + 0.1 * rng.standard_normal((16, 10))  # no mean to remove
    noisy -= (noisy - ref).mean(0)
    before, after = held_out_rel_l2([ref], [noisy], [1])
    assert after > before  # a correction fitted on noise adds its own
    left_alone = held_out_rel_l2([ref], [shifted], [None])
    assert left_alone[0] == left_alone[1] > 0.5


def _graph(last: str, shared_bias: bool = False, output_used: bool = False) -> onnx.ModelProto:
    """x [N, 4] -> MatMul/Gemm by W [4, 3] (+ b) -> y, or y through a Relu."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    nodes = []
    if last == "gemm":
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="gemm"))
    elif last == "matmul_add":
        nodes += [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "b"], ["y"], name="add"),
        ]
    else:
        nodes += [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="gemm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if shared_bias:
        nodes.append(helper.make_node("Add", ["x2", "b"], ["z"], name="other"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    if output_used:
        nodes.append(helper.make_node("Neg", ["y"], ["n"], name="neg"))
        outputs.append(helper.make_tensor_value_info("n", TensorProto.FLOAT, None))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])]
    if shared_bias:
        inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [None, 3]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, [w, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("last", "axis"), [("gemm", 1), ("matmul_add", -1)])
def test_an_output_from_a_layer_with_its_own_bias_is_corrected(last, axis):
    model = _graph(last)
    sites, skipped = correctable_biases(model)
    assert [(s.output, s.bias, s.axis) for s in sites] == [("y", "b", axis)] and not skipped
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = make_session(model).run(None, {"x": x})[0]
    assert apply_corrections(model, {sites[0]: np.array([1.0, -1.0, 0.5])}) == {}
    after = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(after - before, np.tile([-1.0, 1.0, -0.5], (2, 1)))


@pytest.mark.parametrize(
    ("graph", "reason"),
    [
        (_graph("relu"), "produced by Relu, not a layer with a bias"),
        (_graph("gemm", shared_bias=True), "its bias 'b' is shared with another node"),
        (_graph("gemm", output_used=True), "also read inside the graph"),
    ],
)
def test_an_output_without_a_bias_of_its_own_is_skipped_with_the_reason(graph, reason):
    sites, skipped = correctable_biases(graph)
    assert sites == [] and skipped["y"] == reason


def _layer_without_bias(op: str, beta: float = 1.0) -> onnx.ModelProto:
    """x -> one Conv, Gemm or MatMul with no bias -> y (3 output channels)."""
    if op == "Conv":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 4, 4])
        w = numpy_helper.from_array(np.ones((3, 2, 1, 1), np.float32), "w")
        node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
        w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
        extra = {"beta": beta} if op == "Gemm" else {}
        node = helper.make_node(op, ["x", "w"], ["y"], name=op.lower(), **extra)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(
    ("op", "beta"), [("Conv", 1.0), ("Gemm", 1.0), ("Gemm", 0.5), ("MatMul", 1.0)]
)
def test_a_layer_without_a_bias_is_given_one_that_holds_the_correction(op, beta):
    model = _layer_without_bias(op, beta)
    sites, skipped = correctable_biases(model)
    axis = -1 if op == "MatMul" else 1
    assert [(s.output, s.bias, s.axis, s.scale) for s in sites] == [("y", None, axis, beta)]
    assert not skipped
    shape = (2, 2, 4, 4) if op == "Conv" else (2, 4)
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    before = make_session(model).run(None, {"x": x})[0]
    d = np.array([1.0, -1.0, 0.5])
    assert apply_corrections(model, {sites[0]: d}) == {}
    after = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(
        after - before, np.broadcast_to(_along_channels(-d, after, axis), after.shape)
    )
    # the added bias is an initializer of the layer's own, and the output keeps its name
    assert [o.name for o in model.graph.output] == ["y"]
    added = [t.name for t in model.graph.initializer if t.name != "w"]
    assert len(added) == 1 and len(GraphIndex(model.graph).consumers[added[0]]) == 1


def _along_channels(d, like, axis):
    shape = [1] * like.ndim
    shape[axis] = -1
    return d.reshape(shape)


def test_a_gemm_whose_beta_is_zero_is_skipped():
    _, skipped = correctable_biases(_layer_without_bias("Gemm", beta=0.0))
    assert skipped == {"y": "produced by a Gemm with beta=0, which ignores its bias"}


def test_a_bias_that_is_not_one_value_per_channel_is_refused():
    model = _graph("gemm")
    GraphIndex(model.graph).set_weight("b", np.zeros(1))
    sites, _ = correctable_biases(model)
    assert apply_corrections(model, {sites[0]: np.ones(3)}) == {
        "y": "its bias has 1 values for 3 channels"
    }


@pytest.fixture(scope="module")
def digits_int8():
    """The shipped, trained digits CNN, folded, quantized on 512 training digits (MinMax)."""
    from bnfold.onnx.export import export_onnx
    from bnfold.onnx.fold import fold_onnx
    from bnfold.optimizer.pooling import reduce_mean_as_global_pool
    from bnfold.optimizer.quantize import calibrate, quantize
    from models import digits

    model, split = digits.build(), digits.load_split()
    train = split.train_x[:512].numpy()
    source = fold_onnx(export_onnx(model, (split.train_x[:1],), dynamic_spatial=False)).model
    reduce_mean_as_global_pool(source)
    name = source.graph.input[0].name
    tmp = tempfile.TemporaryDirectory()
    cache = Path(tmp.name, "minmax.json")
    feeds = [{name: train[i : i + 64]} for i in range(0, 512, 64)]
    int8 = calibrate(source, feeds, "minmax", cache)
    with torch.no_grad():
        reference = [model(torch.from_numpy(train)).numpy(), model(split.test_x).numpy()]
    yield source, int8, reference, split, lambda m: quantize(m, cache, method="minmax")
    tmp.cleanup()


def _outputs(model, x):
    session = make_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_the_correction_fitted_on_training_digits_lowers_the_error_on_held_out_ones(digits_int8):
    source, int8, (train_ref, test_ref), split, requantize = digits_int8
    train = split.train_x[:512].numpy()
    corrected_source, corrected, result = correct_output_bias(
        source, [_outputs(int8, train)], [train_ref], requantize
    )
    assert result.applied and result.corrected == [source.graph.output[0].name]
    assert result.held_out_rel_l2_after < result.held_out_rel_l2_before
    test_x = split.test_x.numpy()
    plain = compare([test_ref], [_outputs(int8, test_x)], split.test_y.numpy())
    fixed = compare([test_ref], [_outputs(corrected, test_x)], split.test_y.numpy())
    # the 539 held-out digits were never seen by the correction
    assert fixed["rel_l2"] < plain["rel_l2"]
    assert fixed["top1_agreement"] >= plain["top1_agreement"] - 1 / 539
    # only the output layer's bias moved, and the graph is quantized as before
    assert [n.op_type for n in corrected.graph.node] == [n.op_type for n in int8.graph.node]
    moved = [
        t.name
        for t, u in zip(source.graph.initializer, corrected_source.graph.initializer, strict=True)
        if not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))
    ]
    assert len(moved) == 1


def test_too_few_samples_leave_the_candidate_as_it_is(digits_int8):
    source, int8, (train_ref, _), split, requantize = digits_int8
    x = split.train_x[:3].numpy()
    corrected_source, corrected, result = correct_output_bias(
        source, [_outputs(int8, x)], [train_ref[:3]], requantize
    )
    assert corrected is None and corrected_source is None and not result.applied
    assert list(result.skipped.values()) == ["3 samples, fewer than 4"]


def test_optimize_reports_the_correction_of_each_calibrated_candidate(fast_pipeline):
    from models import digits

    model, split = digits.build(), digits.load_split()
    calibration = [split.train_x[i : i + 64] for i in range(0, 256, 64)]
    result = bnfold.optimize(model, calibration=calibration)
    steps = result.report.steps["output_bias"]
    assert set(steps) == {f"int8_{method}" for method in CALIBRATION_METHODS}
    for name, step in steps.items():
        candidate = next(c for c in result.candidates if c.name == name)
        assert step["held_out_rel_l2_before"] > 0
        assert ("output bias corrected" in candidate.how) == step["applied"]
        if step["applied"]:
            assert step["held_out_rel_l2_after"] < step["held_out_rel_l2_before"]
