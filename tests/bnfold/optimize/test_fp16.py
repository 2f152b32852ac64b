"""The fp16 candidate for CUDA (bnfold/optimizer/fp16.py), checked through onnxruntime's CPU
provider: fp32 edges, fp16-sensitive operators and overflowing folded weights kept in fp32,
non-finite outputs refused, and top-1 agreement with fp32 within a 99.5% budget."""

from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.optimizer.accuracy import compare
from bnfold.optimizer.budget import Budget
from bnfold.optimizer.fp16 import FP16_MAX, to_fp16
from bnfold.optimizer.graph import name_nodes
from bnfold.optimizer.timing import make_session


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def tiny_variance_conv_bn() -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BN whose channel 0 has running variance 1e-12 -> y.

    Folded, channel 0's weights are w / sqrt(1e-12 + 1e-5) ~ 316 w: scaled by 1e3 here they
    pass 65504."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((4, 3, 3, 3)) * 1e3).astype(np.float32)
    var = np.array([1e-12, 1.0, 0.5, 2.0], np.float32)
    mean = np.zeros(4, np.float32)
    scale, shift = np.ones(4, np.float32), np.zeros(4, np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [(w, "w"), (scale, "s"), (shift, "t"), (mean, "m"), (var, "v")]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"], name="bn"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])
    return _model(nodes, [x], [y], inits)


def test_a_tiny_variance_bn_folds_beyond_fp16_and_that_conv_stays_fp32():
    folded = name_nodes(bnfold.fold_onnx(tiny_variance_conv_bn()).model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    peak = max(np.abs(numpy_helper.to_array(t)).max() for t in folded.graph.initializer)
    assert peak > FP16_MAX  # the premise: the fold itself overflows fp16
    conv = folded.graph.node[0].name

    result = to_fp16(folded)
    assert result.overflow_nodes == [conv]
    assert "beyond fp16's 65504" in result.kept_fp32[conv]
    assert result.to_dict()["overflow_nodes_kept_fp32"] == [conv]
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float32)
    want = make_session(folded).run(None, {"x": x})
    got = make_session(result.model).run(None, {"x": x})
    accuracy = compare(want, got)
    assert np.isfinite(got[0]).all() and accuracy["rel_l2"] < 1e-2
    assert Budget(min_top1_agreement=None, max_rel_l2=1e-2).check(accuracy)[0]

    # without the guard the converter clamps those weights to 65504: finite, wrong outputs,
    # which the budget refuses with the error it measured
    from onnxruntime.transformers.float16 import convert_float_to_float16

    naive = convert_float_to_float16(folded, keep_io_types=True)
    bad = compare(want, make_session(naive).run(None, {"x": x}))
    met, reasons = Budget().check(bad)
    assert not met and "relative L2 error" in reasons[0], reasons


def test_a_large_constant_node_is_kept_in_fp32_with_its_consumer():
    big = numpy_helper.from_array(np.full((2, 2), 1e5, np.float32), "value")
    nodes = [
        helper.make_node("Constant", [], ["w"], value=big, name="const"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [],
    )
    result = to_fp16(model)
    assert set(result.overflow_nodes) == {"const", "mm"}
    out = make_session(result.model).run(None, {"x": np.full((1, 2), 1e-2, np.float32)})[0]
    np.testing.assert_allclose(out, [[2e3, 2e3]], rtol=1e-3)


def test_fp16_sensitive_operators_stay_fp32_and_the_edges_stay_fp32():
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 3, "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Exp", ["h"], ["e"], name="exp"),
        helper.make_node("Softmax", ["e"], ["y"], axis=-1, name="softmax"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w],
    )
    result = to_fp16(model)
    assert set(result.kept_fp32) == {"exp", "softmax"} and result.overflow_nodes == []
    converted = result.model
    graph_io = [*converted.graph.input, *converted.graph.output]
    assert all(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in graph_io)
    assert any(t.data_type == TensorProto.FLOAT16 for t in converted.graph.initializer)
    # the MatMul computes in fp16; Exp reads fp32 through a Cast (exp(12) would be inf in fp16)
    by_output = {o: n for n in converted.graph.node for o in n.output}
    exp = next(n for n in converted.graph.node if n.name == "exp")
    feeder = by_output[exp.input[0]]
    assert feeder.op_type == "Cast" and feeder.attribute[0].i == TensorProto.FLOAT
    x = np.full((2, 4), 4.0, np.float32)  # exp(12) = 162755 > 65504
    out = make_session(converted).run(None, {"x": x})[0]
    want = make_session(model).run(None, {"x": x})[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=1e-2)


def test_the_cuda_fp16_candidate_agrees_on_top1_within_a_995_budget(cnn):
    budget = bnfold.Budget(min_top1_agreement=0.995)
    result = bnfold.optimize(cnn, torch.randn(2, 3, 16, 16), target="cuda", budget=budget)
    fp16 = next(c for c in result.candidates if c.name == "fp16")
    assert fp16.accuracy["samples"] >= 64
    assert fp16.accuracy["top1_agreement"] >= 0.995 and fp16.budget_met, fp16.budget_reasons
    assert "kept_fp32" in result.report.to_dict()["steps"]["fp16"]


def test_budget_refuses_non_finite_outputs_whatever_the_limits():
    accuracy = {"rel_l2": math.nan, "max_abs_err": math.inf, "top1_agreement": 1.0}
    met, reasons = Budget(min_top1_agreement=0.5).check(accuracy)
    assert not met and "not finite" in reasons[0]
