"""reduce_mean_as_global_pool on small graphs, checked through onnxruntime."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.optimizer.graph import copy_model
from bnfold.optimizer.pooling import reduce_mean_as_global_pool
from bnfold.optimizer.timing import make_session


def _reduce_mean_graph(axes, *, keepdims=1, opset=18, rank=4) -> onnx.ModelProto:
    """x -> Relu -> ReduceMean(axes): the pooled shape the squeeze-excitation blocks take."""
    shape = [2, 3, 5, 7][:rank]
    attrs = {"keepdims": keepdims}
    inputs, initializers = ["r"], []
    if opset >= 18:
        initializers.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        inputs.append("axes")
    else:
        attrs["axes"] = axes
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceMean", inputs, ["y"], name="mean", **attrs),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # onnxruntime 1.31 reads up to 13
    return model


def _run(model, rank=4):
    x = np.random.default_rng(0).standard_normal([2, 3, 5, 7][:rank]).astype(np.float32)
    return make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    ("axes", "opset"), [([2, 3], 18), ([-1, -2], 18), ([3, 2], 13), ([-2, 3], 13)]
)
def test_spatial_reduce_mean_becomes_global_average_pool(axes, opset):
    model = _reduce_mean_graph(axes, opset=opset)
    before = _run(model)
    result = reduce_mean_as_global_pool(model)
    assert result.modified and result.rewritten == ["mean"]
    node = model.graph.node[1]
    assert node.op_type == "GlobalAveragePool" and list(node.input) == ["r"]
    assert not node.attribute
    assert not model.graph.initializer  # the axes, read by no node now
    np.testing.assert_allclose(_run(model), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"axes": [2, 3], "keepdims": 0}, "keepdims=0"),
        ({"axes": [1, 2, 3]}, "not the spatial dims of a 4-D input"),
        ({"axes": [1]}, "not the spatial dims of a 4-D input"),
        ({"axes": [1, 2], "rank": 3}, "not the spatial dims of a 4-D input"),
    ],
)
def test_other_reduce_means_stay_with_a_reason(kwargs, reason):
    model = _reduce_mean_graph(**kwargs)
    original = copy_model(model)
    result = reduce_mean_as_global_pool(model)
    assert not result.modified and result.skipped == {reason: 1}
    assert model == original


def test_reduce_mean_without_axes_stays():
    model = _reduce_mean_graph([2, 3], opset=13)
    del model.graph.node[1].attribute[:]  # no axes: the mean over every dim
    result = reduce_mean_as_global_pool(model)
    assert result.skipped == {"no axes: reduces every dim": 1}
    assert model.graph.node[1].op_type == "ReduceMean"


def test_axes_from_a_computed_tensor_stay():
    model = _reduce_mean_graph([2, 3])
    model.graph.node.insert(0, helper.make_node("Identity", ["axes"], ["axes2"], name="id"))
    model.graph.node[2].input[1] = "axes2"
    result = reduce_mean_as_global_pool(model)
    assert result.skipped == {"axes not a constant": 1}
