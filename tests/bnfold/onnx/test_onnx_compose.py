"""fold_onnx composes sequential affine layers (Gemm / MatMul, 1x1 Conv -> Conv) into one."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from onnx_graphs import GraphBuilder, op_types
from torch import nn

import bnfold
from bnfold.onnx.fold import fold_onnx
from tests.bnfold.bn_helpers import randomize_bn


def _fold_and_verify(original: onnx.ModelProto, **kwargs):
    result = fold_onnx(original, **kwargs)
    check = bnfold.verify_onnx(original, result.model)
    assert check.ok, check.summary() + "\n" + result.report.summary()
    return result


def _bias(g: GraphBuilder, name: str, n: int) -> str:
    return g.init(name, g.rng.uniform(-1, 1, n).astype(np.float32))


def _gemm(g: GraphBuilder, x: str, y: str, k: int, n: int, trans_b: int, **attrs) -> None:
    w = g.weight(f"{y}_w", *((n, k) if trans_b else (k, n)))
    g.node("Gemm", [x, w, _bias(g, f"{y}_c", n)], [y], transB=trans_b, **attrs)


def _gemm_pair(
    k: int, mid: int, n: int, t1: int = 1, t2: int = 1, between: tuple[str, ...] = ()
) -> GraphBuilder:
    """Gemm -> `between` ops (one input each) -> Gemm, from x to y through h."""
    g = GraphBuilder()
    _gemm(g, "x", "h", k, mid, t1, alpha=0.5, beta=2.0)
    h = "h"
    for i, op in enumerate(between):
        extra = [g.init("ratio", np.float32(0.3))] if op == "Dropout" else []
        g.node(op, [h, *extra], [f"between{i}"])
        h = f"between{i}"
    _gemm(g, h, "y", mid, n, t2, alpha=1.5, beta=0.25)
    return g


@pytest.mark.parametrize("t1", [0, 1])
@pytest.mark.parametrize("t2", [0, 1])
def test_gemm_then_gemm_composes_into_one_gemm(t1, t2):
    model = _gemm_pair(8, 64, 8, t1, t2).model({"x": ["N", 8]}, {"y": ["N", 8]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Gemm"]
    assert [o.name for o in result.model.graph.output] == ["y"]
    (c,) = result.report.compositions
    assert c.into == result.model.graph.node[0].name
    assert (c.macs_before, c.macs_after) == (8 * 64 + 64 * 8, 8 * 8)
    # only the composed weights stay
    assert len(result.model.graph.initializer) == 2


@pytest.mark.parametrize("bias1", [True, False], ids=["b1", "no_b1"])
@pytest.mark.parametrize("bias2", [True, False], ids=["b2", "no_b2"])
def test_matmul_add_then_matmul_add_composes_on_rank3_input(bias1, bias2):
    g = GraphBuilder()
    h = "h"
    g.node("MatMul", ["x", g.weight("w1", 6, 32)], ["m1" if bias1 else h])
    if bias1:
        g.node("Add", [_bias(g, "b1", 32), "m1"], [h])  # bias first: either operand order
    g.node("MatMul", [h, g.weight("w2", 32, 5)], ["m2" if bias2 else "y"])
    if bias2:
        g.node("Add", ["m2", _bias(g, "b2", 5)], ["y"])
    model = g.model({"x": ["N", 3, 6]}, {"y": ["N", 3, 5]})

    result = _fold_and_verify(model)

    expected = ["MatMul", "Add"] if bias1 or bias2 else ["MatMul"]
    assert op_types(result.model) == expected
    assert result.model.graph.node[-1].output[0] == "y"


def test_dropout_and_identity_between_are_crossed():
    g = _gemm_pair(8, 64, 8, between=("Identity", "Dropout"))
    model = g.model({"x": ["N", 8]}, {"y": ["N", 8]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Gemm"]
    assert [i.name for i in result.model.graph.initializer if i.name == "ratio"] == []


def test_chain_of_three_linears_composes_into_one():
    g = GraphBuilder()
    _gemm(g, "x", "a", 4, 32, 1)
    _gemm(g, "a", "b", 32, 32, 0)
    _gemm(g, "b", "y", 32, 4, 1)
    model = g.model({"x": ["N", 4]}, {"y": ["N", 4]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Gemm"]
    assert sum(c.into is not None for c in result.report.compositions) == 2


@pytest.mark.parametrize(
    "k2, pads, strides, bias1",
    [(3, [1, 1, 1, 1], [1, 1], False), (3, [0, 0, 0, 0], [2, 2], True), (1, [], [1, 1], True)],
    ids=["padded-no-b1", "unpadded-strided-b1", "1x1-b1"],
)
def test_conv1x1_then_conv_composes(k2, pads, strides, bias1):
    g = GraphBuilder()
    b1 = [_bias(g, "b1", 32)] if bias1 else []
    g.node("Conv", ["x", g.weight("w1", 32, 4, 1, 1), *b1], ["h"])
    pad_attr = {"pads": pads} if pads else {}
    w2 = g.weight("w2", 6, 32, k2, k2)
    g.node("Conv", ["h", w2, _bias(g, "b2", 6)], ["y"], strides=strides, **pad_attr)
    model = g.model({"x": ["N", 4, 7, 7]}, {"y": ["N", 6, None, None]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Conv"]
    (c,) = result.report.compositions
    assert c.into and c.macs_after < c.macs_before


def test_shared_first_weight_is_not_mutated_and_stays():
    g = _gemm_pair(8, 64, 8)
    g.node("Gemm", ["x2", "h_w"], ["z"], transB=1)  # shares the first layer's weight
    model = g.model({"x": ["N", 8], "x2": ["N", 8]}, {"y": ["N", 8], "z": ["N", 64]})
    before = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "h_w"))

    result = _fold_and_verify(model)

    assert Counter(op_types(result.model)) == {"Gemm": 2}
    shared = next(i for i in result.model.graph.initializer if i.name == "h_w")
    np.testing.assert_array_equal(numpy_helper.to_array(shared), before)


def test_torch_linear_dropout_bn_linear_ends_as_one_layer():
    net = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.2), nn.BatchNorm1d(64), nn.Linear(64, 8))
    original = bnfold.export_onnx(randomize_bn(net), torch.randn(4, 8))

    result = _fold_and_verify(original)

    counts = Counter(op_types(result.model))
    assert counts["Gemm"] + counts["MatMul"] == 1 and counts["BatchNormalization"] == 0
    assert [c.into is not None for c in result.report.compositions] == [True]


def test_second_run_and_switch_off_change_nothing():
    model = _gemm_pair(8, 64, 8).model({"x": ["N", 8]}, {"y": ["N", 8]})
    first = fold_onnx(model)

    second = fold_onnx(first.model)
    off = fold_onnx(model, merge_branches=False)

    assert second.model is first.model and second.report.compositions == []
    assert off.model is model and off.report.compositions == []


# --- guards: the pair stays, with a reason (or, for a nonlinearity, no entry) -------------


def test_pair_that_would_cost_more_is_left():
    model = _gemm_pair(64, 8, 64).model({"x": ["N", 64]}, {"y": ["N", 64]})

    result = fold_onnx(model)

    assert result.model is model
    (c,) = result.report.compositions
    assert c.into is None and "multiply-adds" in c.reason


def test_conv1x1_with_bias_before_zero_padded_conv_is_left():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w1", 32, 4, 1, 1), _bias(g, "b1", 32)], ["h"])
    g.node("Conv", ["h", g.weight("w2", 4, 32, 3, 3)], ["y"], pads=[1, 1, 1, 1])
    model = g.model({"x": ["N", 4, 7, 7]}, {"y": ["N", 4, None, None]})

    result = fold_onnx(model)

    assert result.model is model
    (c,) = result.report.compositions
    assert c.into is None and "borders" in c.reason


def test_strided_first_conv_is_left():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w1", 32, 4, 1, 1)], ["h"], strides=[2, 2])
    g.node("Conv", ["h", g.weight("w2", 4, 32, 3, 3)], ["y"])
    model = g.model({"x": ["N", 4, 9, 9]}, {"y": ["N", 4, None, None]})

    (c,) = fold_onnx(model).report.compositions
    assert c.into is None and "plain 1x1" in c.reason


def test_first_layer_with_another_consumer_is_left():
    g = _gemm_pair(8, 64, 8)
    g.node("Relu", ["h"], ["r"])
    model = g.model({"x": ["N", 8]}, {"y": ["N", 8], "r": ["N", 64]})

    result = fold_onnx(model)

    assert result.model is model
    (c,) = result.report.compositions
    assert c.into is None and "2 consumers" in c.reason


def test_first_layer_output_that_is_a_graph_output_is_left():
    model = _gemm_pair(8, 64, 8).model({"x": ["N", 8]}, {"y": ["N", 8], "h": ["N", 64]})

    (c,) = fold_onnx(model).report.compositions
    assert c.into is None and "graph output" in c.reason


def test_nonlinearity_between_is_not_a_candidate():
    g = _gemm_pair(8, 64, 8, between=("Identity", "Relu"))
    model = g.model({"x": ["N", 8]}, {"y": ["N", 8]})

    result = fold_onnx(model)

    assert result.model is model and result.report.compositions == []
