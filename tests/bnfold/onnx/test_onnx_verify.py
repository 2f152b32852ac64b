"""verify_onnx: generated inputs, tolerance rule, per-output errors, clear errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx_graphs import GraphBuilder

from bnfold.onnx.fold import fold_onnx
from bnfold.onnx.verify import verify_onnx


def _model(spatial: list = (5, 5), seed: int = 0) -> onnx.ModelProto:
    g = GraphBuilder(seed=seed)
    g.node("Conv", ["x", g.weight("w", 4, 3, 3, 3)], ["c"], pads=[1, 1, 1, 1])
    g.bn("c", "y", 4)
    g.node("ReduceMean", ["y"], ["m"], axes=[2, 3], keepdims=0)
    return g.model({"x": ["N", 3, *spatial]}, {"y": ["N", 4, *spatial], "m": ["N", 4]}, opset=15)


def test_folded_graph_verifies_on_generated_inputs():
    model = _model()
    report = verify_onnx(model, fold_onnx(model).model)

    assert report.ok, report.summary()
    assert [c.name for c in report.cases] == ["random_batch1", "random_batch3", "constant_batch1"]
    assert [o.name for o in report.outputs] == ["y", "m"]
    assert 0 < report.max_abs_err < 1e-4


def test_different_weights_fail_by_the_tolerance_rule():
    report = verify_onnx(_model(seed=0), _model(seed=1))

    assert not report.ok
    for case in report.cases:
        for o in case.outputs:
            assert case.ok is False or o.max_abs_err <= report.atol + report.rtol * o.max_abs_ref
    assert any(o.max_abs_err > report.atol + report.rtol * o.max_abs_ref for o in report.outputs)


def test_given_inputs_make_one_case():
    model = _model()
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)

    report = verify_onnx(model, model, {"x": x})

    assert report.ok and [c.name for c in report.cases] == ["given"]
    assert report.max_abs_err < 1e-5  # the candidate runs with ORT optimizations on


def test_symbolic_spatial_dims_need_input_shapes():
    model = _model(spatial=["H", "W"])
    folded = fold_onnx(model).model

    with pytest.raises(ValueError, match="input_shapes"):
        verify_onnx(model, folded)
    report = verify_onnx(model, folded, input_shapes={"x": [1, 3, 6, 7]})
    assert report.ok and report.cases[0].outputs[0].max_abs_ref > 0


def test_graphs_with_different_outputs_are_reported():
    model = _model()
    other = onnx.ModelProto.FromString(model.SerializeToString())
    other.graph.output.pop()

    report = verify_onnx(model, other)

    assert not report.ok and "different outputs" in report.error
