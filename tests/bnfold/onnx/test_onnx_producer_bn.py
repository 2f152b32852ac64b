"""Backward folds on ONNX graphs: Conv / ConvTranspose / Gemm / MatMul(+Add) -> BN."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx_graphs import GraphBuilder, assert_same_outputs, op_types

from bnfold.onnx.fold import fold_onnx
from bnfold.report import Action


@pytest.mark.parametrize("opset", [9, 14, 15])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_folds_backward(bias, groups, transposed, opset):
    g = GraphBuilder(seed=groups + 2 * transposed)
    cin, cout = 4, 6
    if transposed:  # weight [in, out/groups, k, k]
        w = g.weight("w", cin, cout // groups, 3, 3)
    else:  # weight [out, in/groups, k, k]
        w = g.weight("w", cout, cin // groups, 3, 3)
    ins = ["x", w] + ([g.weight("b", cout)] if bias else [])
    g.node("ConvTranspose" if transposed else "Conv", ins, ["c"], group=groups, pads=[1, 1, 1, 1])
    g.bn("c", "y", cout)
    g.node("Relu", ["y"], ["out"])
    model = g.model({"x": ["N", cin, 5, 5]}, {"out": ["N", cout, 5, 5]}, opset=opset)

    result = fold_onnx(model)

    assert result.modified
    assert "BatchNormalization" not in op_types(result.model)
    (entry,) = result.report.entries
    assert entry.action is Action.FOLDED_BACKWARD
    onnx.checker.check_model(result.model, full_check=True)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, cin, 5, 5)).astype(np.float32)
        assert_same_outputs(model, result.model, {"x": x})


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_bn_folds_backward(trans_b, bias):
    g = GraphBuilder(seed=trans_b)
    w = g.weight("w", 5, 7) if trans_b else g.weight("w", 7, 5)
    ins = ["x", w] + ([g.weight("c", 5)] if bias else [])
    g.node("Gemm", ins, ["h"], transB=trans_b, alpha=0.5, beta=2.0)
    g.bn("h", "y", 5)
    model = g.model({"x": ["N", 7]}, {"y": ["N", 5]})

    result = fold_onnx(model)

    assert op_types(result.model) == ["Gemm"]
    x = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x})


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_bn_folds_backward(with_add):
    g = GraphBuilder()
    g.node("MatMul", ["x", g.weight("w", 7, 5)], ["m"])
    if with_add:
        g.node("Add", [g.weight("b", 5), "m"], ["h"])  # bias first: either order is a Linear
    g.bn("h" if with_add else "m", "y", 5)
    model = g.model({"x": ["N", 7]}, {"y": ["N", 5]})

    result = fold_onnx(model)

    assert "BatchNormalization" not in op_types(result.model)
    assert [o.name for o in result.model.graph.output] == ["y"]
    x = np.random.default_rng(1).standard_normal((4, 7)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x})


def test_matmul_bn_on_rank3_is_kept():
    g = GraphBuilder()
    g.node("MatMul", ["x", g.weight("w", 7, 5)], ["m"])
    g.node("Add", ["m", g.weight("b", 5)], ["h"])
    g.bn("h", "y", 4)  # BN axis 1 is the sequence axis L=4, not the features
    model = g.model({"x": ["N", 4, 7]}, {"y": ["N", 4, 5]})

    result = fold_onnx(model)

    assert not result.modified and result.model is model
    assert "rank 3" in result.report.entries[0].reason


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("perms", [[[0, 2, 1]], [[1, 0, 2], [1, 2, 0]], [None, [2, 0, 1]]])
def test_matmul_transposed_to_bn_folds_backward(perms, with_add):
    """A Linear on [N, L, F] whose features some Transposes bring to axis 1 (no perm: reversed)."""
    g = GraphBuilder(seed=len(perms))
    g.node("MatMul", ["x", g.weight("w", 7, 5)], ["m"])
    if with_add:
        g.node("Add", ["m", g.weight("b", 5)], ["t0"])
    else:
        g.node("Identity", ["m"], ["t0"])  # a plain MatMul: its shift needs a new Add
    shape = ["N", 4, 5]
    for i, perm in enumerate(perms):
        g.node("Transpose", [f"t{i}"], [f"t{i + 1}"], **({} if perm is None else {"perm": perm}))
        shape = shape[::-1] if perm is None else [shape[p] for p in perm]
    g.bn(f"t{len(perms)}", "y", 5)
    model = g.model({"x": ["N", 4, 7]}, {"y": shape})
    if not with_add:  # the Identity would hide the MatMul: take it out again
        model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "Identity"))
        next(n for n in model.graph.node if n.op_type == "MatMul").output[0] = "t0"

    result = fold_onnx(model)

    assert "BatchNormalization" not in op_types(result.model), result.report.summary()
    assert result.report.entries[0].action is Action.FOLDED_BACKWARD
    assert op_types(result.model).count("Add") == 1  # the Linear's bias took the shift
    onnx.checker.check_model(result.model, full_check=True)
    x = np.random.default_rng(2).standard_normal((3, 4, 7)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x})


@pytest.mark.parametrize(
    "perm,other_user,why",
    [([1, 0, 2], False, "axis 2 at the BN"), ([0, 2, 1], True, "has 2 consumers")],
)
def test_matmul_transposed_to_bn_is_kept_unless_features_reach_axis_1_alone(perm, other_user, why):
    g = GraphBuilder()
    g.node("MatMul", ["x", g.weight("w", 7, 5)], ["m"])
    g.node("Add", ["m", g.weight("b", 5)], ["h"])
    g.node("Transpose", ["h"], ["t"], perm=perm)
    shape = [[3, 4, 5][p] for p in perm]
    g.bn("t", "y", shape[1])
    outputs = {"y": shape}
    if other_user:
        g.node("Relu", ["h"], ["r"])
        outputs["r"] = [3, 4, 5]
    model = g.model({"x": [3, 4, 7]}, outputs)

    result = fold_onnx(model)

    assert not result.modified
    assert why in result.report.entries[0].reason


def test_matmul_bn_with_unknown_rank_is_kept():
    g = GraphBuilder()
    g.node("MatMul", ["x", g.weight("w", 7, 5)], ["m"])
    g.bn("m", "y", 5)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)  # no shape at all
    model = g.model({}, {"y": None}, graph_inputs_extra=[x_info], check=False)

    result = fold_onnx(model)

    assert not result.modified
    assert "rank unknown" in result.report.entries[0].reason


def test_producer_with_two_consumers_is_not_folded_backward():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    g.bn("c", "y", 4)
    g.node("Add", ["c", "y"], ["out"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"out": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    assert not result.modified
    assert "2 consumers" in result.report.entries[0].reason


def test_weight_that_is_a_graph_input_stays():
    g = GraphBuilder()
    g.init("w", np.ones((4, 3, 1, 1), np.float32))  # an initializer that is also an input
    g.node("Conv", ["x", "w"], ["c"])
    g.bn("c", "y", 4)
    w_info = helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 1, 1])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]}, graph_inputs_extra=[w_info])

    result = fold_onnx(model)

    assert not result.modified
    assert "weight is not a constant" in result.report.entries[0].reason


def test_weight_computed_from_a_graph_input_stays():
    # Abs of an initializer would be a constant (test_onnx_constant_inputs.py); of an input not
    g = GraphBuilder()
    g.node("Abs", ["w0"], ["w"])
    g.node("Conv", ["x", "w"], ["c"])
    g.bn("c", "y", 4)
    w0_info = helper.make_tensor_value_info("w0", TensorProto.FLOAT, [4, 3, 1, 1])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]}, graph_inputs_extra=[w0_info])

    result = fold_onnx(model)

    assert not result.modified
    assert "weight is not a constant: 'w0' is a graph input" in result.report.entries[0].reason


def test_shared_weight_gets_its_own_initializer():
    g = GraphBuilder()
    w = g.weight("w", 4, 3, 1, 1)
    g.node("Conv", ["x", w], ["c1"])
    g.bn("c1", "y1", 4)
    g.node("Conv", ["x", w], ["y2"])  # same weight, no BN: must keep seeing the original
    model = g.model({"x": ["N", 3, 4, 4]}, {"y1": ["N", 4, 4, 4], "y2": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    assert result.modified
    inits = {i.name for i in result.model.graph.initializer}
    assert "w" in inits
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert convs[0].input[1] != "w" and convs[1].input[1] == "w"
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x})


def test_training_mode_bn_is_kept():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    bn = g.bn("c", "y", 4, training_mode=1)
    bn.output.extend(["running_mean", "running_var"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    assert not result.modified
    assert "training_mode=1" in result.report.entries[0].reason


def test_bn_output_that_is_a_graph_output_keeps_its_name_type_and_shape():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    g.bn("c", "y", 4)
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    (conv,) = result.model.graph.node
    assert conv.output[0] == "y"
    assert result.model.graph.output[0] == model.graph.output[0]
    assert result.model.graph.input[0] == model.graph.input[0]


@settings(max_examples=15, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 3]),
    per_group=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    transposed=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
)
def test_conv_bn_fold_is_exact_for_any_conv_shape(
    groups, per_group, kernel, stride, transposed, eps
):
    cin, cout = groups * per_group[0], groups * per_group[1]
    g = GraphBuilder(seed=cin * 7 + cout)
    shape = (cin, cout // groups) if transposed else (cout, cin // groups)
    w = g.weight("w", *shape, kernel, kernel)
    op = "ConvTranspose" if transposed else "Conv"
    g.node(op, ["x", w], ["c"], group=groups, strides=[stride, stride])
    g.bn("c", "y", cout, epsilon=eps)
    model = g.model({"x": [2, cin, 5, 5]}, {"y": None}, check=False)

    result = fold_onnx(model)

    assert op_types(result.model) == [op]
    x = np.random.default_rng(0).standard_normal((2, cin, 5, 5)).astype(np.float32)
    assert_same_outputs(model, result.model, {"x": x})
