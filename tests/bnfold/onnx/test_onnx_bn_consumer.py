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


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap", "constant", "crop"])
def test_bn_pad_conv_folds_forward_when_the_pad_copies_channel_values(mode):
    """Conv(padding_mode="reflect" / "replicate") exports as Pad -> Conv; constant padding
    folds only with a zero shift, a crop (negative pads) always."""
    g = GraphBuilder(seed=4)
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b", 4, zero_shift=mode == "constant")
    pads = [0, 0, -1, 0, 0, 0, 0, -1] if mode == "crop" else [0, 0, 1, 2, 0, 0, 2, 1]
    attrs = {"mode": "constant" if mode == "crop" else mode}
    g.node("Pad", ["b", g.init("pads", np.array(pads, np.int64))], ["p"], **attrs)
    g.node("Conv", ["p", g.weight("w", 6, 4, 3, 3)], ["y"])
    hw = (2, 2) if mode == "crop" else (6, 6)
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": ["N", 6, *hw]}, opset=19)

    result = fold_onnx(model)

    assert op_types(result.model) == ["Relu", "Pad", "Conv"], result.report.summary()
    assert result.report.entries[0].action is Action.FOLDED_FORWARD
    for batch in (1, 3):
        assert_same_outputs(model, result.model, _x(batch, 4, 5, 5))


@pytest.mark.parametrize("opset", [10, 18])
def test_bn_pad_conv_reads_pads_from_attributes_and_axes(opset):
    """opset < 11 keeps pads in an attribute; opset >= 18 may name the padded axes."""
    g = GraphBuilder(seed=5)
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b", 4)
    if opset == 10:
        g.node("Pad", ["b"], ["p"], mode="reflect", pads=[0, 0, 1, 1, 0, 0, 1, 1])
    else:
        axes = g.init("axes", np.array([-2, 3], np.int64))
        pads = g.init("pads", np.array([1, 1, 1, 1], np.int64))
        g.node("Pad", ["b", pads, "", axes], ["p"], mode="reflect")
    g.node("Conv", ["p", g.weight("w", 6, 4, 3, 3)], ["y"])
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": ["N", 6, 5, 5]}, opset=opset)

    result = fold_onnx(model)

    assert "BatchNormalization" not in op_types(result.model), result.report.summary()
    assert_same_outputs(model, result.model, _x(2, 4, 5, 5))


@pytest.mark.parametrize(
    "mode,pads,why",
    [
        ("constant", [0, 0, 1, 1, 0, 0, 1, 1], "not exact at the borders"),
        ("reflect", [0, 1, 0, 0, 0, 1, 0, 0], "pads the channel axis"),
    ],
)
def test_bn_pad_conv_is_kept_when_the_pad_is_not_exact(mode, pads, why):
    g = GraphBuilder()
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b", 4)
    g.node("Pad", ["b", g.init("pads", np.array(pads, np.int64))], ["p"], mode=mode)
    channels = 4 + pads[1] + pads[5]
    g.node("Conv", ["p", g.weight("w", 6, channels, 3, 3)], ["y"])
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": None}, check=False)

    result = fold_onnx(model)

    assert not result.modified
    assert why in result.report.entries[0].reason


@pytest.mark.parametrize("shape,folds", [([2, 48], True), ([0, -1], False)])
def test_static_reshape_with_allowzero_folds_unless_it_holds_a_zero(shape, folds):
    """The exporter writes allowzero=1 on every Reshape; without a 0 it changes nothing."""
    g = GraphBuilder()
    _bn_head(g)
    g.node("Reshape", ["b", g.init("shape", np.array(shape))], ["f"], allowzero=1)
    g.node("Gemm", ["f", g.weight("w", 48, 5)], ["y"])
    model = g.model({"x": [2, 3, 4, 4]}, {"y": None}, opset=14, check=False)

    result = fold_onnx(model)

    assert result.modified is folds, result.report.summary()
    if folds:
        assert_same_outputs(model, result.model, _x(2, 3, 4, 4))
    else:
        assert "allowzero=1 with a 0" in result.report.entries[0].reason


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
