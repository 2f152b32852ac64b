"""fold_onnx as a pass: fixpoint, idempotence, subgraphs, constants, external data."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import GraphBuilder, assert_same_outputs, bn_arrays, op_types, run

from bnfold.onnx.external_data import ExternalDataError
from bnfold.onnx.fold import fold_onnx
from bnfold.report import Action

RNG = np.random.default_rng(11)


def _conv_bn_model() -> onnx.ModelProto:
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 3, 3)], ["c"], pads=[1, 1, 1, 1])
    g.bn("c", "y", 4)
    g.node("Relu", ["y"], ["out"])
    return g.model({"x": ["N", 3, 6, 6]}, {"out": ["N", 4, 6, 6]})


def test_second_run_changes_nothing():
    first = fold_onnx(_conv_bn_model())
    second = fold_onnx(first.model)

    assert first.modified and not second.modified
    assert second.model is first.model
    assert second.report.entries == []


def test_forward_fold_makes_the_next_backward_fold_possible():
    # Relu -> BN1 -> Conv(no pad) -> BN2: BN1 folds forward into the Conv first; BN2 then
    # folds backward into the same (already rewritten) Conv.
    g = GraphBuilder()
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "b1", 3)
    g.node("Conv", ["b1", g.weight("w", 4, 3, 1, 1)], ["c"])
    g.bn("c", "y", 4)
    model = g.model({"x": ["N", 3, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = fold_onnx(model)

    assert op_types(result.model) == ["Relu", "Conv"]
    assert {e.action for e in result.report.entries} == {
        Action.FOLDED_FORWARD,
        Action.FOLDED_BACKWARD,
    }
    assert_same_outputs(model, result.model, {"x": RNG.standard_normal((2, 3, 5, 5), np.float32)})


def test_bn_parameters_from_constant_nodes_fold():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    params = bn_arrays(4, RNG)
    for key, value in params.items():
        g.node("Constant", [], [key], value=numpy_helper.from_array(value))
    g.node("BatchNormalization", ["c", *params], ["y"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    assert op_types(result.model) == ["Conv"]  # the orphaned Constant nodes are gone too
    assert_same_outputs(model, result.model, {"x": RNG.standard_normal((2, 3, 4, 4), np.float32)})


def test_bn_statistics_that_are_graph_inputs_stay():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    params = bn_arrays(4, RNG)
    names = [g.init(k, v) for k, v in params.items() if k != "mean"]
    g.node("BatchNormalization", ["c", names[0], names[1], "mean", names[2]], ["y"])
    mean_info = helper.make_tensor_value_info("mean", TensorProto.FLOAT, [4])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]}, graph_inputs_extra=[mean_info])

    result = fold_onnx(model)

    assert not result.modified
    assert "mean 'mean' is not a constant" in result.report.entries[0].reason


def _if_model() -> onnx.ModelProto:
    """An If whose then-branch runs Conv -> BN on the outer x; else-branch is Relu(x)."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "w")
    params = bn_arrays(3, rng)
    inits = [numpy_helper.from_array(v, f"bn_{k}") for k, v in params.items()]
    out = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["N", 3, 4, 4])
    then_graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv_then"),
            helper.make_node(
                "BatchNormalization", ["c", *(i.name for i in inits)], ["branch_out"], name="bn"
            ),
        ],
        "then",
        [],
        [out],
        [w, *inits],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["branch_out"], name="relu_else")], "else", [], [out]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "main",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_bn_inside_an_if_branch_is_folded():
    model = _if_model()

    result = fold_onnx(model)

    assert result.modified and result.nodes_before == 4 and result.nodes_after == 3
    then_nodes = [n.op_type for n in result.model.graph.node[0].attribute[0].g.node]
    assert "BatchNormalization" not in then_nodes
    onnx.checker.check_model(result.model, full_check=True)
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(model, result.model, {"cond": np.array(cond), "x": x})


def _save_external(tmp_path, model: onnx.ModelProto) -> onnx.ModelProto:
    path = tmp_path / "model.onnx"
    model = onnx.ModelProto.FromString(model.SerializeToString())  # save_model edits its input
    onnx.save_model(
        model, path, save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    return onnx.load(path, load_external_data=False)


def test_external_data_is_refused_without_base_dir(tmp_path):
    model = _save_external(tmp_path, _conv_bn_model())

    with pytest.raises(ExternalDataError, match="base_dir"):
        fold_onnx(model)


def test_external_data_is_read_from_base_dir(tmp_path):
    original = _conv_bn_model()
    model = _save_external(tmp_path, original)

    result = fold_onnx(model, base_dir=tmp_path)

    assert op_types(result.model) == ["Conv", "Relu"]
    assert_same_outputs(
        original, result.model, {"x": RNG.standard_normal((1, 3, 6, 6), np.float32)}
    )


def _relocate(model: onnx.ModelProto, location: str) -> onnx.ModelProto:
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    return model


@pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin", "/etc/passwd"])
def test_external_data_outside_base_dir_is_refused(tmp_path, location):
    base = tmp_path / "base"
    base.mkdir()
    model = _relocate(_save_external(tmp_path, _conv_bn_model()), location)

    with pytest.raises(ExternalDataError, match="absolute|'..'"):
        fold_onnx(model, base_dir=base)


def test_external_data_symlink_escaping_base_dir_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    model = _relocate(_save_external(tmp_path, _conv_bn_model()), "link.bin")
    os.symlink(tmp_path / "weights.bin", base / "link.bin")

    with pytest.raises(ExternalDataError, match="outside"):
        fold_onnx(model, base_dir=base)


def test_folded_model_runs_like_the_original_at_several_batches():
    model = _conv_bn_model()
    result = fold_onnx(model)
    for batch in (1, 2, 5):
        x = RNG.standard_normal((batch, 3, 6, 6)).astype(np.float32)
        assert run(result.model, {"x": x})[0].shape == (batch, 4, 6, 6)
        assert_same_outputs(model, result.model, {"x": x})


def test_bn_in_a_branch_is_not_folded_into_a_conv_of_the_enclosing_graph():
    rng = np.random.default_rng(6)
    params = bn_arrays(3, rng)
    inits = [numpy_helper.from_array(v, f"bn_{k}") for k, v in params.items()]
    out = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["N", 3, 4, 4])
    then_graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["c", *(i.name for i in inits)], ["branch_out"])],
        "then",
        [],
        [out],
        inits,
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["c"], ["branch_out"])], "else", [], [out]
    )
    w = numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph),
        ],
        "main",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8

    result = fold_onnx(model)

    assert not result.modified
    assert "enclosing graph" in result.report.entries[0].reason


def test_bn_inside_a_loop_body_is_folded():
    rng = np.random.default_rng(8)
    w = numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32) * 0.5, "w")
    inits = [numpy_helper.from_array(v, f"bn_{k}") for k, v in bn_arrays(3, rng).items()]
    shape = ["N", 3, 4, 4]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Conv", ["h_in", "w"], ["c"]),
            helper.make_node("BatchNormalization", ["c", *(i.name for i in inits)], ["h_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, shape),
        ],
        [w, *inits],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
        "main",
        [
            helper.make_tensor_value_info("trips", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)

    result = fold_onnx(model)

    body_ops = [n.op_type for n in result.model.graph.node[0].attribute[0].g.node]
    assert body_ops == ["Identity", "Conv"]
    assert result.model.graph.node[0].attribute[0].g.output[1].name == "h_out"
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    assert_same_outputs(model, result.model, {"trips": np.array(3, np.int64), "x": x})
