"""Constants behind constant-only nodes: BN parameters and weights computed from initializers
alone (Identity, Transpose, Reshape, Cast, Concat, DequantizeLinear, ...) fold like bare
initializers; graph inputs and what is computed from them still do not."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx_graphs import GraphBuilder, assert_same_outputs, bn_arrays, op_types

import bnfold.onnx.constants as constants
from bnfold.onnx.constants import ConstantEvaluator
from bnfold.onnx.fold import fold_onnx
from bnfold.report import Action

RNG = np.random.default_rng(17)


def _torch_export(module: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """The legacy exporter without constant folding: deduplicated tensors behind Identity."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(), (example,), buffer, dynamo=False, do_constant_folding=False
        )
    return onnx.load_from_string(buffer.getvalue())


def _randomize_bn_statistics(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.running_mean.normal_(0.0, 0.2, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)


def _kept(result) -> list:
    return [e for e in result.report.entries if e.action is Action.KEPT]


@pytest.mark.parametrize("trained", [False, True], ids=["untrained", "random_statistics"])
def test_torchvision_resnet_export_folds_every_bn(trained):
    # untrained BN (gamma 1, beta 0, mean 0, var 1): the exporter shares one initializer among
    # all BNs of a width and feeds each through an Identity
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    if trained:
        _randomize_bn_statistics(net)
    model = _torch_export(net, torch.randn(1, 3, 32, 32))
    assert op_types(model).count("BatchNormalization") == 20
    assert "Identity" in op_types(model)

    result = fold_onnx(model)

    assert _kept(result) == []
    assert len(result.report.entries) == 20
    assert {"BatchNormalization", "Identity"}.isdisjoint(op_types(result.model))
    onnx.checker.check_model(result.model, full_check=True)
    used = {name for node in result.model.graph.node for name in node.input}
    assert all(init.name in used for init in result.model.graph.initializer)
    name = model.graph.input[0].name
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert_same_outputs(model, result.model, {name: x}, tol=1e-4)
    assert not fold_onnx(result.model).modified


def test_linear_without_bias_then_batchnorm1d_export_folds():
    # Linear(bias=False) exports as MatMul(x, Transpose(W)) -> BN
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 6, bias=False), torch.nn.BatchNorm1d(6))
    _randomize_bn_statistics(net)
    model = _torch_export(net, torch.randn(4, 8))
    assert "Transpose" in op_types(model)

    result = fold_onnx(model)

    assert [e.action for e in result.report.entries] == [Action.FOLDED_BACKWARD]
    assert op_types(result.model) == ["MatMul", "Add"]  # the dead Transpose went too
    onnx.checker.check_model(result.model, full_check=True)
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    assert_same_outputs(model, result.model, {model.graph.input[0].name: x})


def _constant_behind(g: GraphBuilder, kind: str, name: str, array: np.ndarray) -> str:
    """`array` as the output `name` of a constant-only subgraph of `kind`."""
    if kind == "identity":
        g.node("Identity", [g.init(f"{name}_stored", array)], [name])
    elif kind == "transpose":
        perm = list(reversed(range(array.ndim)))
        stored = g.init(f"{name}_stored", np.ascontiguousarray(array.transpose(perm)))
        g.node("Transpose", [stored], [name], perm=perm)
    elif kind == "reshape":
        shape = g.init(f"{name}_shape", np.array(array.shape, np.int64))
        g.node("Reshape", [g.init(f"{name}_stored", array.reshape(-1)), shape], [name])
    elif kind == "unsqueeze_squeeze":
        axes = g.init(f"{name}_axes", np.array([0], np.int64))
        g.node("Unsqueeze", [g.init(f"{name}_stored", array), axes], [f"{name}_4d"])
        g.node("Squeeze", [f"{name}_4d", axes], [name])
    elif kind == "cast":  # stored as float16: the graph reads the float16-rounded values
        g.node("Cast", [g.init(f"{name}_stored", array.astype(np.float16))], [name], to=1)
    elif kind == "concat":
        half = array.shape[0] // 2
        parts = [g.init(f"{name}_{i}", p) for i, p in enumerate((array[:half], array[half:]))]
        g.node("Concat", parts, [name], axis=0)
    elif kind == "dequantize":  # per-output-channel int8
        flat = np.abs(array.reshape(array.shape[0], -1)).max(axis=1)
        scale = (np.maximum(flat, 1e-3) / 127).astype(np.float32)
        shape = (-1,) + (1,) * (array.ndim - 1)
        q = np.clip(np.round(array / scale.reshape(shape)), -127, 127).astype(np.int8)
        zero = np.zeros(array.shape[0], np.int8)
        inputs = [
            g.init(f"{name}_q", q),
            g.init(f"{name}_scale", scale),
            g.init(f"{name}_zp", zero),
        ]
        g.node("DequantizeLinear", inputs, [name], axis=0)
    else:
        raise ValueError(kind)
    return name


KINDS = ["identity", "transpose", "reshape", "unsqueeze_squeeze", "cast", "concat", "dequantize"]


@pytest.mark.parametrize("kind", KINDS)
def test_conv_weight_and_bn_parameters_behind_constant_nodes_fold(kind):
    g = GraphBuilder()
    weight = (g.rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    bias = g.rng.standard_normal(4).astype(np.float32)
    w = _constant_behind(g, kind, "w", weight)
    b = _constant_behind(g, "identity" if kind == "dequantize" else kind, "b", bias)
    g.node("Conv", ["x", w, b], ["c"])
    params = bn_arrays(4, g.rng)
    names = [_constant_behind(g, kind, f"bn_{k}", v) for k, v in params.items() if k != "B"]
    g.node("BatchNormalization", ["c", names[0], g.init("bn_B", params["B"]), *names[1:]], ["y"])
    model = g.model({"x": ["N", 3, 6, 6]}, {"y": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    assert [e.action for e in result.report.entries] == [Action.FOLDED_BACKWARD]
    assert op_types(result.model) == ["Conv"]  # the constant-only nodes went with the BN
    assert len(result.model.graph.initializer) == 2
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, {"x": RNG.standard_normal((2, 3, 6, 6), np.float32)})


@pytest.mark.parametrize("kind", ["identity", "cast", "dequantize"])
def test_forward_fold_into_a_conv_whose_weight_is_behind_constant_nodes(kind):
    g = GraphBuilder()
    g.node("Relu", ["x"], ["r"])
    g.bn("r", "n", 3)
    weight = (g.rng.standard_normal((4, 3, 1, 1)) * 0.3).astype(np.float32)
    g.node("Conv", ["n", _constant_behind(g, kind, "w", weight)], ["y"])
    model = g.model({"x": ["N", 3, 5, 5]}, {"y": ["N", 4, 5, 5]})

    result = fold_onnx(model)

    assert [e.action for e in result.report.entries] == [Action.FOLDED_FORWARD]
    assert op_types(result.model) == ["Relu", "Conv"]
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, {"x": RNG.standard_normal((2, 3, 5, 5), np.float32)})


def test_a_shared_weight_stays_intact_for_the_consumer_that_does_not_fold():
    # one initializer reaches two convs through two Identity nodes; only conv a has a BN
    g = GraphBuilder()
    shared = g.weight("w_shared", 4, 3, 1, 1)
    g.node("Identity", [shared], ["w_a"])
    g.node("Identity", [shared], ["w_b"])
    g.node("Conv", ["x", "w_a"], ["a"])
    g.bn("a", "ya", 4)
    g.node("Conv", ["x", "w_b"], ["yb"])
    g.node("Conv", ["x", shared], ["yc"])  # and a third reads it directly
    model = g.model(
        {"x": ["N", 3, 4, 4]}, {"ya": ["N", 4, 4, 4], "yb": ["N", 4, 4, 4], "yc": ["N", 4, 4, 4]}
    )

    result = fold_onnx(model)

    assert [e.action for e in result.report.entries] == [Action.FOLDED_BACKWARD]
    graph = result.model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    np.testing.assert_array_equal(
        inits["w_shared"], numpy_helper.to_array(model.graph.initializer[0])
    )
    convs = {n.output[0]: n for n in graph.node if n.op_type == "Conv"}
    assert convs["ya"].input[1] not in ("w_a", "w_shared")  # a new initializer
    assert convs["yb"].input[1] == "w_b" and convs["yc"].input[1] == "w_shared"
    assert [n.op_type for n in graph.node].count("Identity") == 1  # w_a's went, w_b's stays
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, {"x": RNG.standard_normal((2, 3, 4, 4), np.float32)})


def test_shared_bn_parameters_stay_for_the_bn_that_is_kept():
    # two BNs read one set of parameters through Identity nodes; the second has no affine
    # neighbour and stays, reading the parameters it always read
    g = GraphBuilder()
    params = {k: g.init(f"p_{k}", v) for k, v in bn_arrays(4, g.rng).items()}
    for bn in ("1", "2"):
        for k, name in params.items():
            g.node("Identity", [name], [f"bn{bn}_{k}"])
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    g.node("BatchNormalization", ["c", *(f"bn1_{k}" for k in params)], ["y1"])
    g.node("Relu", ["y1"], ["r"])
    g.node("BatchNormalization", ["r", *(f"bn2_{k}" for k in params)], ["y2"])
    g.node("Relu", ["y2"], ["out"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"out": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    actions = [e.action for e in result.report.entries]
    assert len(actions) == 2 and set(actions) == {Action.FOLDED_BACKWARD, Action.KEPT}
    assert op_types(result.model).count("Identity") == 4  # the kept BN's
    assert {i.name for i in result.model.graph.initializer} >= set(params.values())
    onnx.checker.check_model(result.model, full_check=True)
    assert_same_outputs(model, result.model, {"x": RNG.standard_normal((2, 3, 4, 4), np.float32)})


def test_bn_scale_behind_an_identity_of_a_graph_input_stays():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    params = bn_arrays(4, RNG)
    g.node("Identity", ["gamma"], ["scale"])
    names = [g.init(k, v) for k, v in params.items() if k != "scale"]
    g.node("BatchNormalization", ["c", "scale", *names], ["y"])
    gamma = helper.make_tensor_value_info("gamma", TensorProto.FLOAT, [4])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]}, graph_inputs_extra=[gamma])

    result = fold_onnx(model)

    assert not result.modified
    assert "scale 'scale' is not a constant: 'gamma' is a graph input" in _kept(result)[0].reason


def test_an_initializer_shadowed_by_a_graph_input_is_no_constant_behind_an_identity():
    # IR 3: every initializer is a graph input too, only a default the caller may override
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    names = [g.init(k, v) for k, v in bn_arrays(4, RNG).items()]
    g.node("Identity", ["scale"], ["scale_read"])
    g.node("BatchNormalization", ["c", "scale_read", *names[1:]], ["y"])
    shadows = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in g.inits]
    model = g.model(
        {"x": [2, 3, 4, 4]}, {"y": [2, 4, 4, 4]}, opset=8, graph_inputs_extra=shadows, check=False
    )
    model.ir_version = 3
    onnx.checker.check_model(model)

    result = fold_onnx(model)

    assert not result.modified
    reason = _kept(result)[0].reason
    assert "scale 'scale_read' is not a constant: 'scale' is a graph input" in reason


def test_bn_scale_from_a_random_op_stays():
    g = GraphBuilder()
    g.node("Conv", ["x", g.weight("w", 4, 3, 1, 1)], ["c"])
    g.node("RandomUniform", [], ["scale"], shape=[4], dtype=1, seed=1.0)
    names = [g.init(k, v) for k, v in bn_arrays(4, RNG).items() if k != "scale"]
    g.node("BatchNormalization", ["c", "scale", *names], ["y"])
    model = g.model({"x": ["N", 3, 4, 4]}, {"y": ["N", 4, 4, 4]})

    result = fold_onnx(model)

    assert not result.modified
    assert "RandomUniform" in _kept(result)[0].reason and "random" in _kept(result)[0].reason


# --- the evaluator alone --------------------------------------------------------------------


def _ir_graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], out: str) -> ir.Graph:
    graph = helper.make_graph(
        nodes,
        "g",
        [],
        [helper.make_tensor_value_info(out, TensorProto.UNDEFINED, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(model).graph


def _output(graph: ir.Graph) -> ir.Value:
    return graph.outputs[0]


def test_evaluation_keeps_the_graphs_dtype():
    values = np.array([1.0001, 2.0e-8, 65504.0, 3.14159], np.float32)
    graph = _ir_graph([helper.make_node("Cast", ["a"], ["h"], to=10)], {"a": values}, "h")

    result = ConstantEvaluator().evaluate(_output(graph))

    assert result.dtype == np.float16
    np.testing.assert_array_equal(result, values.astype(np.float16))


def test_a_result_too_large_is_refused_before_anything_runs(monkeypatch):
    # Expand of a scalar to 2**40 floats: its size comes from shape inference, nothing runs
    nodes = [helper.make_node("Expand", ["one", "shape"], ["big"])]
    inits = {"one": np.ones(1, np.float32), "shape": np.array([2**20, 2**20], np.int64)}
    graph = _ir_graph(nodes, inits, "big")
    monkeypatch.setattr(constants, "ReferenceEvaluator", None)  # calling it would fail

    reason = ConstantEvaluator().evaluate(_output(graph))

    assert isinstance(reason, str) and "exceed the limit" in reason


def test_a_large_intermediate_is_refused_too(monkeypatch):
    # the result is one float, but the Expand before it would be 2**32 of them
    nodes = [
        helper.make_node("Expand", ["one", "shape"], ["big"]),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
    ]
    inits = {"one": np.ones(1, np.float32), "shape": np.array([2**16, 2**16], np.int64)}
    graph = _ir_graph(nodes, inits, "total")
    monkeypatch.setattr(constants, "ReferenceEvaluator", None)

    reason = ConstantEvaluator().evaluate(_output(graph))

    assert isinstance(reason, str) and "exceed the limit" in reason


def test_a_remembered_constant_is_evaluated_again_after_its_cone_changes():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = _ir_graph(
        [helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0])], {"a": a, "b": 2 * a}, "t"
    )
    evaluator = ConstantEvaluator()
    np.testing.assert_array_equal(evaluator.evaluate(_output(graph)), a.T)

    graph.node(0).replace_input_with(0, graph.initializers["b"])

    np.testing.assert_array_equal(evaluator.evaluate(_output(graph)), 2 * a.T)


def test_each_constant_is_evaluated_once(monkeypatch):
    calls = []
    real = constants.ReferenceEvaluator

    def counting(model):
        calls.append(model)
        return real(model)

    monkeypatch.setattr(constants, "ReferenceEvaluator", counting)
    graph = _ir_graph(
        [helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0])],
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3)},
        "t",
    )
    evaluator = ConstantEvaluator()

    first = evaluator.evaluate(_output(graph))
    second = evaluator.evaluate(_output(graph))

    assert len(calls) == 1 and second is first
    np.testing.assert_array_equal(first, np.arange(6, dtype=np.float32).reshape(2, 3).T)


def _weight_standardized_conv(g: GraphBuilder, bn_output_is_graph_output: bool = False):
    """What the exporter writes for a large ScaledStdConv2d: BN over Reshape(W), its mean
    computed by a ReduceMean of the same Reshape, then the normalised weight reshaped back."""
    w = g.weight("w", 6, 3, 3, 3)
    g.node("Reshape", [w, g.init("flat", np.array([1, 6, 27]))], ["wr"])
    g.node("ReduceMean", ["wr", g.init("axes", np.array([0, 2]))], ["mean"], keepdims=0)
    params = bn_arrays(6, g.rng)
    names = [g.init(k, params[k]) for k in ("scale", "B")]
    g.node("BatchNormalization", ["wr", *names, "mean", g.init("var", params["var"])], ["ws"])
    g.node("Reshape", ["ws", g.init("back", np.array([6, 3, 3, 3]))], ["w_std"])
    g.node("Conv", ["x", "w_std"], ["y"])
    outputs = {"y": ["N", 6, 3, 3]}
    if bn_output_is_graph_output:
        outputs["ws"] = [1, 6, 27]
    return g.model({"x": ["N", 3, 5, 5]}, outputs, opset=18)


def test_bn_over_a_constant_weight_is_computed_once():
    model = _weight_standardized_conv(GraphBuilder(seed=8))

    result = fold_onnx(model)

    (entry,) = result.report.entries
    assert entry.action is Action.PRECOMPUTED, entry.reason
    assert op_types(result.model) == ["Reshape", "Conv"]  # BN and its ReduceMean are gone
    assert "w" not in {i.name for i in result.model.graph.initializer}
    onnx.checker.check_model(result.model, full_check=True)
    for batch in (1, 3):
        x = RNG.standard_normal((batch, 3, 5, 5)).astype(np.float32)
        assert_same_outputs(model, result.model, {"x": x})


def test_bn_over_a_constant_that_is_a_graph_output_stays():
    model = _weight_standardized_conv(GraphBuilder(seed=8), bn_output_is_graph_output=True)

    result = fold_onnx(model)

    assert not result.modified
    assert "graph output" in result.report.entries[0].reason
