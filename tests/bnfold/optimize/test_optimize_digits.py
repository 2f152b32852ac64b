"""Real data: the digits CNN's held-out accuracy, fp32 against data-free and calibrated INT8."""

import pytest

import bnfold
from bnfold.optimizer.timing import make_session


@pytest.fixture(scope="module")
def digits_setup():
    from models import digits

    return digits.build(), digits.load_split()


def _test_accuracy(model, split) -> float:
    predicted = _run(model, split.test_x.numpy()).argmax(1)
    return float((predicted == split.test_y.numpy()).mean())


def test_digits_int8_accuracy(digits_setup, fast_pipeline):
    model, split = digits_setup
    free = bnfold.optimize(model, split.train_x[:8])
    fp32 = _test_accuracy(free.candidates[0].model, split)
    assert fp32 > 0.97
    data_free = next(c for c in free.candidates if c.name == "int8_data_free")
    # trained: the BN statistics describe the activations (observed std / |gamma| about 1)
    check = free.report.steps["bn_statistics"]["observed_std_over_gamma"]
    assert 0.8 < check["median"] < 1.2
    assert 100 * (fp32 - _test_accuracy(data_free.model, split)) <= 1.0
    calibration = [split.train_x[i : i + 64] for i in range(0, 512, 64)]
    calibrated = bnfold.optimize(model, calibration=calibration, labels=split.train_y[:512])
    for c in calibrated.candidates:
        if c.name in ("int8_minmax", "int8_percentile", "int8_entropy"):
            assert 100 * (fp32 - _test_accuracy(c.model, split)) <= 0.5, c.name
            assert c.accuracy["accuracy_drop_points"] <= 1.0


@pytest.mark.parametrize("name", ["digits_resnet", "digits_mobilenet"])
def test_trained_residual_and_depthwise_nets_keep_their_classes_in_int8(name, fast_pipeline):
    """Trained, the deeper digits models (residual adds; depthwise convs, ReLU6 and linear
    bottlenecks) keep 99% of fp32's classes on the real held-out digits in every calibrated
    INT8 candidate, which random-weight models cannot show (docs/BENCHMARKS.md)."""
    from models import digits

    model, split = digits.build(name), digits.load_split()
    calibration = [split.train_x[i : i + 64] for i in range(0, 512, 64)]
    result = bnfold.optimize(model, calibration=calibration, labels=split.train_y[:512])
    x = split.test_x.numpy()
    fp32 = _run(result.candidates[0].model, x).argmax(1)
    assert (fp32 == split.test_y.numpy()).mean() > 0.97
    int8 = [c for c in result.candidates if c.precision == "int8"]
    assert {"int8_data_free", "int8_minmax", "int8_percentile"} <= {c.name for c in int8}
    for c in int8:
        assert (_run(c.model, x).argmax(1) == fp32).mean() >= 0.99, c.name
        assert c.accuracy["accuracy_drop_points"] <= 1.0, c.name


def _run(model, x):
    session = make_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]
