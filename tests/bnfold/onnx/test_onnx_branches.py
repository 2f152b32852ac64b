"""fold_onnx merges sums of parallel Conv / BN / identity branches into one Conv."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx_graphs import GraphBuilder, op_types
from torch import nn

import bnfold
from bnfold.onnx.fold import fold_onnx
from bnfold.report import Action
from tests.bnfold.bn_helpers import randomize_bn
from tests.bnfold.test_branches import ACBlock, MobileOneBlock, RepVGGBlock


def _export_and_fold(module: nn.Module, shape: tuple[int, ...], **kwargs):
    """Export without folding, fold_onnx, check through onnxruntime (constant inputs too)."""
    original = bnfold.export_onnx(module, torch.randn(*shape), dynamic_spatial=False)
    return original, _fold_and_verify(original, **kwargs)


def _fold_and_verify(original: onnx.ModelProto, **kwargs):
    result = fold_onnx(original, **kwargs)
    check = bnfold.verify_onnx(original, result.model)
    assert check.ok, check.summary() + "\n" + result.report.summary()
    return result


def _count(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize(
    "net, shape",
    [
        (nn.Sequential(RepVGGBlock(4, 6, stride=2), RepVGGBlock(6, 6, groups=2)), (2, 4, 9, 9)),
        (nn.Sequential(MobileOneBlock(6), MobileOneBlock(6, k=2, groups=6, scale=False)),
         (2, 6, 7, 7)),
        (nn.Sequential(ACBlock(3, 5), nn.ReLU(), ACBlock(5, 8, stride=2)), (2, 3, 10, 11)),
    ],
    ids=["repvgg", "mobileone", "acnet"],
)  # fmt: skip
def test_branch_sums_merge_into_one_conv_per_block(net, shape):
    _, result = _export_and_fold(randomize_bn(net), shape)

    blocks = sum(isinstance(m, RepVGGBlock | MobileOneBlock | ACBlock) for m in net)
    counts = _count(result.model)
    assert counts["BatchNormalization"] == 0 and counts["Conv"] == blocks
    assert counts["Add"] == 0
    assert len(result.report.merges) == blocks and all(m.into for m in result.report.merges)
    assert all(m.macs_after <= m.macs_before for m in result.report.merges)
    assert result.report.counts()["kept"] == 0


@pytest.fixture(scope="module")
def repvgg_block() -> onnx.ModelProto:
    """One RepVGG block with an identity BN, exported without folding."""
    block = randomize_bn(RepVGGBlock(4, 4))
    return bnfold.export_onnx(block, torch.randn(2, 4, 6, 6), dynamic_spatial=False)


def test_identity_bn_is_reported_as_merged_into_the_new_conv(repvgg_block):
    result = _fold_and_verify(repvgg_block)

    (merge,) = result.report.merges
    merged = [e for e in result.report.entries if e.action is Action.MERGED]
    assert len(merged) == 1 and merged[0].name in merge.branches
    assert merged[0].targets == [merge.into]
    assert [n.name for n in result.model.graph.node if n.op_type == "Conv"] == [merge.into]
    assert merge.macs_before == (9 + 1) * 4 * 4 + 4 + 2 * 4 and merge.macs_after == 9 * 4 * 4


def test_merge_can_be_switched_off(repvgg_block):
    result = _fold_and_verify(repvgg_block, merge_branches=False)

    assert not result.report.merges
    assert _count(result.model)["Conv"] == 2 and _count(result.model)["BatchNormalization"] == 1


def test_second_run_changes_nothing(repvgg_block):
    first = fold_onnx(repvgg_block)
    second = fold_onnx(first.model)

    assert not second.modified and second.model is first.model
    assert second.report.merges == [] and second.report.entries == []


def _graph(*convs: tuple[int, int, int, int, dict]) -> GraphBuilder:
    """Convs c0, c1, ... of x, each given as (out, in, kh, kw, attributes)."""
    g = GraphBuilder()
    for i, (out, cin, kh, kw, attrs) in enumerate(convs):
        w = g.weight(f"w{i}", out, cin, kh, kw)
        g.node("Conv", ["x", w, g.weight(f"b{i}", out)], [f"c{i}"], **attrs)
    return g


PAD1 = {"pads": [1, 1, 1, 1]}


def test_sum_of_convs_and_x_merges_and_keeps_the_output_name():
    g = _graph((4, 4, 3, 3, PAD1), (4, 4, 1, 1, {}))
    g.node("Sum", ["c0", "c1", "x"], ["y"])
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Conv"]
    assert result.model.graph.output[0].name == result.model.graph.node[0].output[0] == "y"
    assert {i.name for i in result.model.graph.initializer}.isdisjoint({"w0", "b0", "w1", "b1"})


def test_constant_zero_term_is_dropped():
    # timm's MobileOne starts its sum at 0, which the TorchScript exporter keeps as a constant
    g = _graph((4, 4, 3, 3, PAD1), (4, 4, 1, 1, {}))
    g.init("zero", np.zeros((), np.float32))
    g.node("Add", ["zero", "c0"], ["z"])
    g.node("Add", ["z", "c1"], ["y"])
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Conv"] and len(result.model.graph.initializer) == 2


def test_bn_after_a_merged_sum_folds_into_the_merged_conv():
    # RepViT: BN(conv3x3(x) + conv1x1(x) + x); the BN follows a Conv only after the merge
    g = _graph((4, 4, 3, 3, PAD1), (4, 4, 1, 1, {}))
    g.node("Sum", ["c0", "c1", "x"], ["s"])
    g.bn("s", "y", 4)
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Conv"]
    assert [e.action for e in result.report.entries] == [Action.FOLDED_BACKWARD]


def test_sum_inside_a_residual_add_merges_on_its_own():
    # RepGhost: x + (conv3x3(h) + conv1x1(h)); the whole tree is no block, its sub-sum is
    g = GraphBuilder()
    g.node("Relu", ["x"], ["h"])
    g.node("Conv", ["h", g.weight("w0", 4, 4, 3, 3)], ["c0"], pads=[1, 1, 1, 1])
    g.node("Conv", ["h", g.weight("w1", 4, 4, 1, 1)], ["c1"])
    g.node("Add", ["c0", "c1"], ["s"])
    g.node("Add", ["x", "s"], ["y"])
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = _fold_and_verify(model)

    assert op_types(result.model) == ["Relu", "Conv", "Add"]
    (merge,) = result.report.merges
    assert merge.into is not None and merge.branches == ["conv_1", "conv_2"]


STRIDE2 = {"strides": [2, 2]}


@pytest.mark.parametrize(
    "convs, shape, reason",
    [
        # stride 2 on an even size: same output size, different windows
        (((4, 3, 3, 3, PAD1 | STRIDE2), (4, 3, 2, 2, STRIDE2)), (3, 8, 8), "line up"),
        (((4, 4, 1, 5, {"pads": [0, 2, 0, 2]}), (4, 4, 5, 1, {"pads": [2, 0, 2, 0]})),
         (4, 7, 7), "multiply-adds"),
        (((4, 4, 3, 3, PAD1), (4, 4, 1, 1, {"auto_pad": "SAME_UPPER"})), (4, 5, 5), "auto_pad"),
        (((4, 4, 3, 3, PAD1), (4, 4, 1, 1, STRIDE2)), (4, 5, 5), "strides"),
    ],
    ids=["misaligned", "costlier", "auto-pad", "stride"],
)  # fmt: skip
def test_sum_that_may_not_merge_is_left_with_a_reason(convs, shape, reason):
    g = _graph(*convs)
    g.node("Add", ["c0", "c1"], ["y"])
    model = g.model({"x": ["N", *shape]}, {"y": None}, check=False)

    result = fold_onnx(model)

    (merge,) = result.report.merges
    assert merge.into is None and reason in merge.reason
    assert result.model is model


@pytest.mark.parametrize("use", ["consumer", "graph output"])
def test_branch_used_elsewhere_is_not_merged(use):
    g = _graph((4, 4, 3, 3, PAD1), (4, 4, 1, 1, {}))
    g.node("Add", ["c0", "c1"], ["y"])
    if use == "consumer":
        g.node("Relu", ["c1"], ["r"])
    shape = ["N", 4, 5, 5]
    model = g.model({"x": shape}, {"y": shape, "r" if use == "consumer" else "c1": shape})

    result = fold_onnx(model)

    (merge,) = result.report.merges
    assert merge.into is None and ("consumers" if use == "consumer" else use) in merge.reason


def test_residual_add_is_not_a_candidate():
    g = GraphBuilder()
    g.node("Relu", ["x"], ["r"])
    g.node("Conv", ["r", g.weight("w", 4, 4, 3, 3)], ["c"], pads=[1, 1, 1, 1])
    g.node("Add", ["c", "x"], ["y"])
    model = g.model({"x": ["N", 4, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = fold_onnx(model)

    assert result.report.merges == [] and result.model is model


def _export_torchscript(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    # the dynamo exporter (bnfold.export_onnx) needs 30-60 s for MobileOne-S0 on the 2-core
    # test machine; the TorchScript one keeps every BN without constant folding and takes a
    # few seconds. docs/BENCHMARKS.md has the same counts through bnfold.export_onnx.
    buffer = io.BytesIO()
    torch.onnx.export(
        module, (x,), buffer, dynamo=False, do_constant_folding=False, input_names=["x"]
    )
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["mobileone_s0", "repvgg_a0"])
def test_timm_reparameterizable_models_end_as_timm_reparameterizes_them(name):
    timm = pytest.importorskip("timm")
    # distinct statistics: the TorchScript exporter shares equal initializers (fresh BNs all
    # have mean 0) through Identity nodes, which are not constants to fold_onnx
    model = randomize_bn(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, 32, 32)  # 1x1 after the last stage: convs cost little
    original = _export_torchscript(model, x)
    reference = _export_torchscript(timm.utils.reparameterize_model(model, inplace=True), x)

    result = fold_onnx(original)

    counts = _count(result.model)
    assert counts["BatchNormalization"] == 0
    assert counts["Conv"] == _count(reference)["Conv"] < _count(original)["Conv"]
    assert all(m.into for m in result.report.merges)
    check = bnfold.verify_onnx(original, result.model, batch_sizes=(1,))
    assert check.ok, check.summary()
