"""Forward folds on ONNX graphs: BN -> [Identity/Dropout/Flatten/Reshape] -> Gemm/MatMul/Conv."""

from __future__ import annotations

import numpy as np
import pytest
from onnx_graphs import GraphBuilder, assert_same_outputs, op_types

from bnfold.onnx.fold import fold_onnx
from bnfold.report import Action

RNG = np.random.default_rng(7)


def _x(*shape: int) -> dict[str, np.ndarray]:
    return {"x": RNG.standard_normal(shape).astype(np.float32)}


def _bn_head(g: GraphBuilder, c: int = 3) -> None:
    """x -> Relu -> BN: nothing to fold backward into."""
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b", c)


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape0", "ReshapeK"])
@pytest.mark.parametrize("consumer", ["Gemm", "GemmT", "MatMul", "MatMulAdd"])
def test_bn_flatten_linear_folds_forward(flatten, consumer):
    g = GraphBuilder(seed=3)
    _bn_head(g)
    if flatten == "Flatten":
        g.node("Flatten", ["b"], ["f"], axis=1)
    else:  # [0, -1] keeps the batch axis; [-1, 48] needs the input shape to prove it does
        g.node(
            "Reshape",
            ["b", g.init("shape", np.array([0, -1] if flatten == "Reshape0" else [-1, 48]))],
            ["f"],
        )
    if consumer.startswith("Gemm"):
        trans = int(consumer == "GemmT")
        w = g.weight("w", 5, 48) if trans else g.weight("w", 48, 5)
        g.node("Gemm", ["f", w, g.weight("c", 5)], ["y"], transB=trans, alpha=1.5, beta=0.5)
    else:
        g.node("MatMul", ["f", g.weight("w", 48, 5)], ["m"] if consumer == "MatMulAdd" else ["y"])
        if consumer == "MatMulAdd":
            g.node("Add", ["m", g.weight("c", 5)], ["y"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 5]})

    result = fold_onnx(model)

    assert "BatchNormalization" not in op_types(result.model), result.report.summary()
    assert result.report.entries[0].action is Action.FOLDED_FORWARD
    for batch in (1, 3):
        assert_same_outputs(model, result.model, _x(batch, 3, 4, 4))


def test_bn_through_identity_and_dropout_into_two_gemms():
    g = GraphBuilder()
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b", 6)
    g.node("Identity", ["b"], ["i"])
    g.node("Dropout", ["i"], ["d"])
    g.node("Gemm", ["d", g.weight("w1", 6, 4)], ["y1"])
    g.node("Gemm", ["b", g.weight("w2", 6, 2)], ["y2"])
    model = g.model({"x": ["N", 6]}, {"y1": ["N", 4], "y2": ["N", 2]}, opset=14)

    result = fold_onnx(model)

    (entry,) = result.report.entries
    assert entry.action is Action.FOLDED_FORWARD and len(entry.targets) == 2
    assert_same_outputs(model, result.model, _x(3, 6))


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("padded,zero_shift", [(False, False), (True, True)])
def test_bn_conv_folds_forward_when_exact(groups, padded, zero_shift):
    g = GraphBuilder(seed=groups)
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b", 6, zero_shift=zero_shift)
    pads = [1, 1, 1, 1] if padded else [0, 0, 0, 0]
    g.node("Conv", ["b", g.weight("w", 6, 6 // groups, 3, 3)], ["y"], group=groups, pads=pads)
    hw = 5 if padded else 3
    model = g.model({"x": ["N", 6, 5, 5]}, {"y": ["N", 6, hw, hw]})

    result = fold_onnx(model)

    assert op_types(result.model) == ["Relu", "Conv"]
    assert_same_outputs(model, result.model, _x(2, 6, 5, 5))
    assert_same_outputs(model, result.model, {"x": np.ones((1, 6, 5, 5), np.float32)})


def test_bn_padded_conv_with_shift_is_kept():
    g = GraphBuilder()
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b", 6)
    g.node("Conv", ["b", g.weight("w", 4, 6, 3, 3)], ["y"], pads=[1, 1, 1, 1])
    model = g.model({"x": ["N", 6, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = fold_onnx(model)

    assert not result.modified
    assert "not exact at the borders" in result.report.entries[0].reason


def test_bn_output_that_is_a_graph_output_is_not_folded_forward():
    g = GraphBuilder()
    _bn_head(g, 6)
    g.node("Gemm", ["b", g.weight("w", 6, 2)], ["y"])
    model = g.model({"x": ["N", 6]}, {"y": ["N", 2], "b": ["N", 6]})

    result = fold_onnx(model)

    assert not result.modified
    assert "graph output" in result.report.entries[0].reason


def test_bn_with_a_non_affine_consumer_is_kept():
    g = GraphBuilder()
    _bn_head(g, 6)
    g.node("Gemm", ["b", g.weight("w", 6, 2)], ["y"])
    g.node("Sigmoid", ["b"], ["z"])
    model = g.model({"x": ["N", 6]}, {"y": ["N", 2], "z": ["N", 6]})

    result = fold_onnx(model)

    assert not result.modified
    assert "Sigmoid" in result.report.entries[0].reason


def test_flatten_with_axis_2_is_kept():
    g = GraphBuilder()
    _bn_head(g)
    g.node("Flatten", ["b"], ["f"], axis=2)
    g.node("MatMul", ["f", g.weight("w", 16, 5)], ["y"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": [None, 5]})

    result = fold_onnx(model)

    assert not result.modified
    assert "axis=2" in result.report.entries[0].reason


def test_reshape_that_splits_samples_is_kept():
    g = GraphBuilder()
    _bn_head(g)
    g.node("Reshape", ["b", g.init("shape", np.array([-1, 24]))], ["f"])
    g.node("MatMul", ["f", g.weight("w", 24, 5)], ["y"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": [None, 5]})

    result = fold_onnx(model)

    assert not result.modified
    assert "splits samples" in result.report.entries[0].reason


def test_bn_matmul_on_rank3_is_kept():
    g = GraphBuilder()
    _bn_head(g, 4)
    g.node("MatMul", ["b", g.weight("w", 7, 5)], ["y"])  # features = last axis (7), BN axis 1 (4)
    model = g.model({"x": ["N", 4, 7]}, {"y": ["N", 4, 5]})

    result = fold_onnx(model)

    assert not result.modified
    assert "rank 3" in result.report.entries[0].reason


def test_dropout_with_used_mask_is_kept():
    g = GraphBuilder()
    _bn_head(g, 6)
    g.node("Dropout", ["b"], ["d", "mask"])
    g.node("Gemm", ["d", g.weight("w", 6, 2)], ["y"])
    g.node("Cast", ["mask"], ["m"], to=1)
    model = g.model({"x": ["N", 6]}, {"y": ["N", 2], "m": ["N", 6]}, opset=14)

    result = fold_onnx(model)

    assert not result.modified
    assert "mask" in result.report.entries[0].reason
