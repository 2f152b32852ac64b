"""equalize, bias_correct and ranges on small graphs, checked through onnxruntime."""

import numpy as np
import pytest
from optimize_graphs import conv_act_conv

from bnfold.optimizer.bias_correct import correct_biases
from bnfold.optimizer.bn_stats import ChannelStats
from bnfold.optimizer.dfq import quantize_weight_per_channel
from bnfold.optimizer.equalize import equalize
from bnfold.optimizer.graph import GraphIndex, copy_model
from bnfold.optimizer.ranges import TensorRange, propagate_ranges
from bnfold.optimizer.timing import make_session


def _run(model, x):
    return make_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize("depthwise", [False, True])
def test_equalize_relu_pair_is_exact(depthwise):
    model = conv_act_conv("Relu", depthwise)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    before = _run(model, x)
    stats = {"h": ChannelStats(np.ones(6), np.full(6, 2.0))}
    result = equalize(model, stats)
    assert result.pairs == ["conv1"]
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-4, atol=1e-4)
    w1 = GraphIndex(model.graph).weight("w1")
    assert not np.allclose(stats["h"].std, 2.0)  # the statistics follow the scaling
    r1 = np.abs(w1.reshape(6, -1)).max(1)
    w2 = GraphIndex(model.graph).weight("w2")
    r2 = np.abs((w2 if depthwise else np.moveaxis(w2, 1, 0)).reshape(6, -1)).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-5)


def test_equalize_skips_relu6_with_a_reason():
    model = conv_act_conv("Clip")
    original = copy_model(model)
    result = equalize(model, {})
    assert not result.modified and result.pairs == []
    assert any("Clip" in reason for reason in result.skipped)
    assert model == original


@pytest.mark.parametrize("int8", ["vnni", "none"])
def test_bias_correction_removes_the_expected_shift(int8, monkeypatch):
    # the shift of the weights as they will be quantized here: 8-bit with VNNI, 7-bit without
    # (reduce_range); both kinds of CPU simulated, so the test is the same on every machine
    from bnfold.optimizer import quantize

    monkeypatch.setattr(quantize, "cpu_features", lambda: {"int8": int8})
    model = conv_act_conv("Relu")
    mean = np.array([0.5, 1.0, 0.0, 2.0, 0.3, 0.1])
    index = GraphIndex(model.graph)
    w2 = index.weight("w2")
    result = correct_biases(model, {"a": TensorRange(0.0, 5.0, mean)}, exclude={"conv1"})
    assert result.corrected == 1
    bias = GraphIndex(model.graph).weight(model.graph.node[2].input[2])
    quantized = quantize_weight_per_channel(w2, qmax=quantize.weight_qmax())
    expected = -((quantized - w2).sum(axis=(2, 3)) @ mean)
    np.testing.assert_allclose(bias, expected, rtol=1e-5, atol=1e-7)


def test_ranges_follow_the_bn_statistics():
    model = conv_act_conv("Relu")
    beta, gamma = np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)
    feeds = [{"x": np.random.default_rng(1).standard_normal((8, 3, 8, 8)).astype(np.float32)}]
    ranges, replaced = propagate_ranges(model, {"h": ChannelStats(beta, gamma)}, feeds, repeats=16)
    assert replaced == ["h"]
    np.testing.assert_allclose(ranges["h"].channel_mean, beta, atol=0.25)
    assert ranges["a"].rmin == 0.0  # after ReLU
    # the extreme channel: beta 1, gamma 2, a quantile 1e-5 from the end (4.3 sigma)
    assert 1 + 2 * 3.0 < ranges["h"].rmax < 1 + 2 * 5.5
    assert {"x", "y"} <= set(ranges)


def test_weight_range_follows_the_cpu_as_onnxruntime_quantizes(monkeypatch):
    # bias correction predicts the weight error of the quantizer: 7-bit weights (reduce_range)
    # on a CPU without VNNI, 8-bit elsewhere; a CPU is simulated by its detected features
    from bnfold.optimizer import quantize

    monkeypatch.setattr(quantize, "cpu_features", lambda: {"int8": "none"})
    assert quantize.reduced_range() and quantize.weight_qmax() == 64
    monkeypatch.setattr(quantize, "cpu_features", lambda: {"int8": "vnni"})
    assert not quantize.reduced_range() and quantize.weight_qmax() == 127


def _types_and_search(model, tmp_path):
    """The op types MinMax INT8 quantizes in `model`, and the mixed search over them (timed
    at batch 1, two rounds, no accuracy budget)."""
    from bnfold.optimizer.mixed import _quantized_types, search_mixed
    from bnfold.optimizer.quantize import calibrate, quantize

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(2)]
    cache = tmp_path / "minmax.json"
    types = _quantized_types(model, calibrate(model, feeds, "minmax", cache))
    search = search_mixed(
        model,
        lambda exclude: quantize(model, cache, exclude=exclude),
        lambda m: (True, {}),
        {"batch=1": feeds[0]},
        threads=1,
        rounds=2,
    )
    return types, search


def test_mixed_search_tries_grouped_convs_as_their_own_type(tmp_path):
    """Dense Convs are never excluded (that is the fp32 graph); grouped ones are a trial."""
    from bnfold.optimizer.mixed import GROUPED

    model = conv_act_conv("Relu", depthwise=True)
    types, search = _types_and_search(model, tmp_path)
    assert types[GROUPED] == ["conv2"] and types["Conv"] == ["conv1"]
    tried = [t["fp32"] for t in search.trials if "fp32" in t]
    assert GROUPED in tried and "Conv" not in tried
    excluded = search.exclude
    assert excluded in ([], ["conv2"])  # kept or not, by the measurement


def test_mixed_search_tries_a_one_input_type_with_the_convs_that_feed_it(tmp_path):
    """Conv -> HardSwish -> Conv: HardSwish alone in fp32, and with conv1 (which onnxruntime
    fuses with it in fp32); a two-input type gets no such trial."""
    from bnfold.optimizer.mixed import _trials

    model = conv_act_conv("HardSwish")
    types, search = _types_and_search(model, tmp_path)
    assert types["HardSwish"] == ["act"]
    trials = dict(_trials(model, types))
    assert trials["HardSwish"] == ["act"]
    assert trials["HardSwish with the Convs before it"] == ["act", "conv1"]
    assert not any(label.startswith("Conv") for label in trials)
    tried = [t["fp32"] for t in search.trials if "fp32" in t]
    assert tried == ["HardSwish", "HardSwish with the Convs before it"]
    assert len(search.exclude) == len(set(search.exclude))  # no node excluded twice
    assert set(search.exclude) in (set(), {"act"}, {"act", "conv1"})


def test_output_sensitivity_ranks_a_node_by_its_error_at_the_outputs(tmp_path):
    """Calibrated on inputs 100x larger than those it then sees, every input quantization is
    100x coarser than it needs to be, most of all conv1's (x's 3x3 neighbourhoods quantize to
    few levels; conv2's input passed a ReLU, half of it exact zeros). The graph with one node
    in INT8 is the fp32 graph with that node's inputs through the INT8 graph's Q/DQ nodes,
    nothing else."""
    from bnfold.optimizer.mixed import _alone_in_int8, output_sensitivity
    from bnfold.optimizer.quantize import calibrate

    model = conv_act_conv("Relu")
    rng = np.random.default_rng(1)
    calibration = [{"x": 100 * rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    int8 = calibrate(model, calibration, "minmax", tmp_path / "minmax.json")
    feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    ranked = output_sensitivity(model, int8, feed, ["conv1", "conv2", "not_a_node"])
    assert [name for _e, name in ranked] == ["conv1", "conv2"]
    assert ranked[0][0] > ranked[1][0] > 0.1
    assert ranked == sorted(ranked, reverse=True)
    alone = _alone_in_int8(model, int8, "conv1")
    feeding = {n.output[0]: n for n in alone.graph.node}
    conv1, conv2 = (next(n for n in alone.graph.node if n.name == c) for c in ("conv1", "conv2"))
    assert all(feeding[v].op_type == "DequantizeLinear" for v in conv1.input)  # x, w1, b1
    assert list(conv2.input) == ["a", "w2"]  # as in the fp32 graph
    assert len(alone.graph.node) == len(model.graph.node) + 4  # Q + DQ of x, DQ of w1, b1


def test_mixed_accuracy_step_keeps_only_exclusions_that_lower_the_error(tmp_path, monkeypatch):
    """Step 2 with a budget never met: nodes go to fp32 most sensitive first, one per round
    here, and each stays only where the measured error fell."""
    from bnfold.optimizer import mixed
    from bnfold.optimizer.accuracy import compare
    from bnfold.optimizer.quantize import calibrate, quantize

    monkeypatch.setattr(mixed, "STEP", 1)
    model = conv_act_conv("Relu")
    rng = np.random.default_rng(1)
    cache = tmp_path / "minmax.json"
    calibrate(
        model, [{"x": 100 * rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}], "minmax", cache
    )
    feed = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    ref = make_session(model).run(None, feed)

    def evaluate(m):
        return False, compare(ref, make_session(m).run(None, feed))

    search = mixed.search_mixed(
        model,
        lambda exclude: quantize(model, cache, exclude=exclude),
        evaluate,
        {"batch=2": feed},
        threads=1,
        rounds=2,
        accuracy_feed=feed,
    )
    steps = [t for t in search.trials if "fp32_for_accuracy" in t]
    assert steps and steps[0]["fp32_for_accuracy"] == ["conv1"]  # the most sensitive first
    kept = [n for t in steps if t["kept"] for n in t["fp32_for_accuracy"]]
    assert kept and [n for n in search.exclude if n in ("conv1", "conv2")] == kept
    errors = [evaluate(quantize(model, cache))[1]["rel_l2"]] + [
        t["rel_l2"] for t in steps if t["kept"]
    ]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)
    assert all(t["kept"] for t in steps[:-1])  # a round that did not help ends the step


def test_an_unfolded_bn_scale_is_quantized_per_channel_without_warnings(tmp_path, caplog):
    """A BN left in the graph (one before a zero-padded conv) has a rank-1 scale: channel
    axis 0, where onnxruntime's default for normalizations (1) is refused with a warning per
    call and the scale quantized per tensor."""
    import logging

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bnfold.optimizer.quantize import calibrate

    rng = np.random.default_rng(0)
    params = {
        "s": rng.uniform(0.01, 3, 4),
        "t": rng.standard_normal(4),
        "m": rng.standard_normal(4),
        "v": rng.uniform(0.5, 2, 4),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("BatchNormalization", ["r", "s", "t", "m", "v"], ["y"], name="bn"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in params.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = [{"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)} for _ in range(2)]
    with caplog.at_level(logging.WARNING):
        q = calibrate(model, feeds, "minmax", tmp_path / "cache.json")
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    onnx.checker.check_model(q)
    inits = {t.name: t for t in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    (bn,) = [n for n in q.graph.node if n.op_type == "BatchNormalization"]
    scale_dq = producer[bn.input[1]]
    assert scale_dq.op_type == "DequantizeLinear"
    assert [a.i for a in scale_dq.attribute if a.name == "axis"] == [0]
    assert list(inits[scale_dq.input[1]].dims) == [4]  # one scale per channel
