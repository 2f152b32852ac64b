"""recalibrate_onnx: the numerics of bnfold.recalibrate, written into the BN nodes."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.drift import recalibrate_onnx


def _stats(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_recalibrate_onnx_equals_torch_recalibrate(digits_model, digits_split, digits_onnx):
    shifted = 1 - digits_split.train_x[:96]
    batches = [shifted[i : i + 32] for i in range(0, 96, 32)]
    result = recalibrate_onnx(digits_onnx, [{"x": b.numpy()} for b in batches])
    torch_model = bnfold.recalibrate(digits_model, batches)
    stats = _stats(result.model)
    for name, m in torch_model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            np.testing.assert_allclose(
                stats[f"{name}.running_mean"], m.running_mean.numpy(), rtol=1e-5, atol=1e-6
            )
            np.testing.assert_allclose(
                stats[f"{name}.running_var"], m.running_var.numpy(), rtol=1e-5, atol=1e-6
            )
    assert (result.batches, result.samples) == (3, 96)
    assert [s["name"] for s in result.report()["sites"]] == [
        "features.1",
        "features.4",
        "features.8",
    ]
    # the caller's graph keeps its statistics
    before = _stats(digits_onnx)["features.1.running_mean"]
    np.testing.assert_array_equal(before, digits_model.features[1].running_mean.numpy())


def test_recalibrated_graph_folds_and_restores_accuracy(digits_split, digits_onnx):
    import onnxruntime as ort

    def accuracy(graph, x):
        session = ort.InferenceSession(graph.SerializeToString())
        logits = session.run(None, {"x": x.numpy()})[0]
        return float((logits.argmax(1) == digits_split.test_y.numpy()).mean())

    def shift(x):  # a quarter inverted: bench/drift.py's moderate inversion
        return 0.75 * x + 0.25 * (1 - x)

    shifted_test = shift(digits_split.test_x)
    shifted_train = shift(digits_split.train_x[:128]).numpy()
    before = accuracy(digits_onnx, shifted_test)
    result = recalibrate_onnx(
        digits_onnx, [{"x": shifted_train[i : i + 32]} for i in range(0, 128, 32)]
    )
    folded = bnfold.fold_onnx(result.model).model
    after = accuracy(folded, shifted_test)
    assert before < 0.5 < 0.95 < after  # the shift costs most of the accuracy; AdaBN restores it


def _bn1d(shared: bool) -> onnx.ModelProto:
    """x[N,2] -> BN -> BN (the two share their variance initializer when ``shared``)."""
    inits = [
        numpy_helper.from_array(np.ones(2, np.float32), "s"),
        numpy_helper.from_array(np.zeros(2, np.float32), "t"),
        numpy_helper.from_array(np.zeros(2, np.float32), "m1"),
        numpy_helper.from_array(np.zeros(2, np.float32), "m2"),
        numpy_helper.from_array(np.ones(2, np.float32), "v"),
    ]
    v2 = "v" if shared else "v2"
    if not shared:
        inits.append(numpy_helper.from_array(np.ones(2, np.float32), "v2"))
    nodes = [
        helper.make_node("BatchNormalization", ["x", "s", "t", "m1", "v"], ["h"], name="bn1"),
        helper.make_node("BatchNormalization", ["h", "s", "t", "m2", v2], ["y"], name="bn2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    model = helper.make_model(
        helper.make_graph(nodes, "bn1d", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    return model


def test_recalibrate_onnx_gives_a_shared_statistic_its_own_copy():
    rng = np.random.default_rng(0)
    batches = [{"x": (rng.standard_normal((16, 2)) * 3 + 5).astype(np.float32)} for _ in range(4)]
    result = recalibrate_onnx(_bn1d(shared=True), batches)
    bn1, bn2 = result.model.graph.node
    assert bn1.input[4] != bn2.input[4]
    stats = _stats(result.model)
    assert stats[bn1.input[4]].mean() > 4  # the input's variance, about 9
    np.testing.assert_allclose(stats[bn2.input[4]], 1.0, atol=0.1)  # already normalized


def test_recalibrate_onnx_refuses_batches_without_variance():
    with pytest.raises(ValueError, match="bn1.*no variance"):
        recalibrate_onnx(_bn1d(shared=False), [{"x": np.ones((1, 2), np.float32)}])
    with pytest.raises(ValueError, match="at least one"):
        recalibrate_onnx(_bn1d(shared=False), [])


def test_statistics_a_float32_bn_cannot_hold_are_refused(digits_model, digits_split, digits_onnx):
    """Inputs of 1e30 give variances of 1e60: refused by name, not written as inf."""
    huge = (digits_split.train_x[:32] * 1e30).numpy()
    with pytest.raises(ValueError, match=r"BatchNorm 'features.1': the re-estimated variance"):
        recalibrate_onnx(digits_onnx, [{"x": huge}])
    with pytest.raises(ValueError, match=r"beyond what torch.float32 holds"):
        bnfold.recalibrate(digits_model, [torch.from_numpy(huge)])
