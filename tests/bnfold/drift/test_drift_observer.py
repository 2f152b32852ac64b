"""observer_graph: each BN input's moments as outputs, in eval and batch-statistics form."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.drift import ChannelMoments, ObserverSession, observer_graph


def _conv_bn(opset: int, channels: int = 4) -> onnx.ModelProto:
    """x[N,3,6,6] -> Conv -> BN -> y; the BN input 'c' is also an output, for reference."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "s"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "t"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "m"),
        numpy_helper.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"], name="bn"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", channels, 6, 6])
        for n in ("y", "c")
    ]
    graph = helper.make_graph(nodes, "conv_bn", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("opset", [13, 17, 18, 20])  # ReduceMean's axes: attribute, then input
def test_observer_outputs_the_moments_of_the_bn_input(opset):
    model = _conv_bn(opset)
    x = np.random.default_rng(1).standard_normal((5, 3, 6, 6)).astype(np.float32)
    c = ort.InferenceSession(model.SerializeToString()).run(["c"], {"x": x})[0]
    observer = observer_graph(model)
    onnx.checker.check_model(observer.model)
    assert [s.name for s in observer.sites] == ["bn"]
    mean, var, count = ObserverSession(observer).moments({"x": x})["bn"]
    want = ChannelMoments.of_values(c)
    assert count == want.count == 5 * 36
    np.testing.assert_allclose(mean, want.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, want.var, rtol=1e-5)
    np.testing.assert_allclose(
        observer.sites[0].var, numpy_helper.to_array(model.graph.initializer[4])
    )


def test_observer_leaves_the_callers_graph_alone():
    model = _conv_bn(17)
    before = model.SerializeToString()
    observer_graph(model, batch_stats=True)
    assert model.SerializeToString() == before


def test_observer_skips_a_bn_whose_statistics_are_not_constants():
    model = _conv_bn(17)
    # the mean comes from a graph input: nothing to compare with or rewrite
    model.graph.initializer.pop(3)
    model.graph.input.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, [4]))
    observer = observer_graph(model)
    assert observer.sites == []
    assert observer.skipped == [{"node": "bn", "reason": "running statistics are not constants"}]


def test_observer_of_digits_matches_torch_hooks(digits_model, digits_split, digits_onnx):
    x = digits_split.test_x[:32]
    session = ObserverSession(observer_graph(digits_onnx))
    moments = session.moments({"x": x.numpy()})
    seen = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0]))
        for n, m in digits_model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        digits_model(x)
    for h in handles:
        h.remove()
    assert list(moments) == list(seen) == ["features.1", "features.4", "features.8"]
    for name, value in seen.items():
        want = ChannelMoments.of_values(value.numpy())
        np.testing.assert_allclose(moments[name][0], want.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(moments[name][1], want.var, rtol=1e-4, atol=1e-6)


def test_batch_statistics_observer_normalizes_by_the_batch(digits_model, digits_split, digits_onnx):
    """The second BN's input equals torch's with every BN in train mode."""
    x = digits_split.test_x[:16]
    moments = ObserverSession(observer_graph(digits_onnx, batch_stats=True)).moments(
        {"x": (1 - x).numpy()}
    )
    import copy

    train_bn = copy.deepcopy(digits_model)
    seen = {}
    for n, m in train_bn.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
            m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0]))
    with torch.no_grad():
        train_bn(1 - x)
    for name in ("features.4", "features.8"):
        want = ChannelMoments.of_values(seen[name].numpy())
        np.testing.assert_allclose(moments[name][0], want.mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(moments[name][1], want.var, rtol=1e-4, atol=1e-6)
    assert bnfold.drift_score  # the torch entry point is exported lazily
