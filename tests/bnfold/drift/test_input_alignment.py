"""Input alignment: the per-channel input map fitted to the first BN's statistics, and
recalibrate_onnx(align_input=True) choosing between it and re-estimation alone."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import bnfold
from bnfold.drift import recalibrate_onnx
from bnfold.drift.alignment import (
    AffineFit,
    BasisMoments,
    _residuals,
    alignment_loss,
    choose_repair,
    describe,
    fit_input_affine,
)
from bnfold.drift.input_alignment import align_input_onnx


def _accuracy(graph: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"x": x})[0].argmax(1) == y).mean())


def _batches(x: np.ndarray, size: int = 32) -> list[dict[str, np.ndarray]]:
    return [{"x": x[i : i + size]} for i in range(0, len(x), size)]


def test_residual_jacobian_matches_finite_differences():
    """Levenberg-Marquardt steps on this Jacobian; the loss is the residuals' mean square."""
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((5, 16, 4, 9))  # 2 input channels: P1 P2 Q1 Q2 R
    moments = BasisMoments()
    moments.observe(basis)
    mu, cov = moments.mean_cov()
    mean_r, var_r = rng.standard_normal(4), rng.uniform(0.5, 2, 4)
    theta = np.array([0.7, -1.2, 0.3, 0.1, 1.0])
    r, jac = _residuals(theta, mu, cov, mean_r, var_r)
    loss = alignment_loss(theta, mu, cov, mean_r, var_r)
    assert loss == pytest.approx(float(r @ r) / 4)
    for i in range(4):
        step = np.zeros(5)
        step[i] = 1e-6
        up = _residuals(theta + step, mu, cov, mean_r, var_r)[0]
        down = _residuals(theta - step, mu, cov, mean_r, var_r)[0]
        np.testing.assert_allclose(jac[:, i], (up - down) / 2e-6, rtol=1e-4, atol=1e-8)
    assert loss > 0


def test_fit_recovers_a_known_inversion_of_a_linear_map():
    """a = w * (1 - x) + 0.5 per channel: the statistics of w * x + 0.5 are recovered by
    gain -1, bias 1 (the sign a re-estimation cannot undo). One channel's moments cannot tell
    it from gain +1, bias 1 - 2 mean(x): both fits come back, each matching exactly."""
    rng = np.random.default_rng(1)
    x = rng.beta(0.5, 3, (256, 1, 1, 20))  # skewed, as ink on paper: 1 - x differs from x
    w = rng.uniform(0.5, 2, 6).reshape(1, 6, 1)
    f = lambda v: w * v[:, 0] + 0.5  # noqa: E731 - [N, K, L]
    trained = f(x)
    mean_r, var_r = trained.mean(axis=(0, 2)), trained.var(axis=(0, 2))
    shifted = 1 - x
    zero = f(np.zeros_like(shifted))
    basis = np.stack([f(shifted) - zero, f(np.ones_like(shifted)) - zero, zero])
    moments = BasisMoments()
    moments.observe(basis)
    fits = fit_input_affine(moments, mean_r, var_r, eps=1e-5)
    assert len(fits) == 2 and fits[0].loss <= fits[1].loss
    inverted = next(f for f in fits if f.gain[0] < 0)
    assert inverted.gain[0] == pytest.approx(-1, abs=0.02)
    assert inverted.bias[0] == pytest.approx(1, abs=0.02)
    assert inverted.loss < 1e-3 < inverted.loss_identity


def test_the_report_names_the_map_kept_not_the_best_fit():
    best = AffineFit(np.array([0.8]), np.array([0.1]), 0.04, 1e-5)
    other = AffineFit(np.array([-0.8]), np.array([0.9]), 0.04, 2e-5)
    report = {"applied": True, "site": "bn1", "reason": describe("bn1", best), **best.to_dict()}
    # re-estimation behind the second start moved the later statistics less: it is kept
    assert choose_repair(report, 0.012, [(0.0100, best), (0.0099, other)]) == 1
    assert report["gain"] == [-0.8] and report["bias"] == [0.9]
    assert report["reason"].startswith(describe("bn1", other)), report["reason"]
    assert "[0.8]" not in report["reason"]


def test_inverted_digits_are_aligned_and_repaired(digits_split, digits_onnx):
    x_test, y_test = (1 - digits_split.test_x).numpy(), digits_split.test_y.numpy()
    shifted = (1 - digits_split.train_x[:64]).numpy()
    alignment = align_input_onnx(digits_onnx, _batches(shifted))
    assert alignment.applied, alignment.reason
    assert alignment.fit.gain[0] < -0.5 and alignment.site == "features.1"
    plain = recalibrate_onnx(digits_onnx, _batches(shifted))
    aligned = recalibrate_onnx(digits_onnx, _batches(shifted), align_input=True)
    report = aligned.report()["input_alignment"]
    assert report["applied"], report
    changes = report["statistics_change"]
    assert changes["aligned"] < changes["plain"]
    folded = bnfold.fold_onnx(aligned.model).model
    assert _accuracy(bnfold.fold_onnx(plain.model).model, x_test, y_test) < 0.3
    assert _accuracy(folded, x_test, y_test) > 0.95
    # the served graph is the aligned, recalibrated original folded: verified exactly
    assert bnfold.verify_onnx(aligned.model, folded, input_shapes={"x": [4, 1, 8, 8]}).ok
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    # a second recalibration composes: the first map stays, the names do not clash
    again = recalibrate_onnx(aligned.model, _batches(shifted), align_input=True)
    onnx.checker.check_model(again.model)
    assert _accuracy(bnfold.fold_onnx(again.model).model, x_test, y_test) > 0.95


def test_clean_data_keeps_the_accuracy(digits_split, digits_onnx):
    x, y = digits_split.test_x.numpy(), digits_split.test_y.numpy()
    clean = digits_split.train_x[:64].numpy()
    result = recalibrate_onnx(digits_onnx, _batches(clean), align_input=True)
    report = result.report()["input_alignment"]
    if report["applied"]:  # a map close to the identity, if any
        assert abs(report["gain"][0] - 1) < 0.1 and abs(report["bias"][0]) < 0.1
    folded = bnfold.fold_onnx(result.model).model
    assert _accuracy(folded, x, y) >= _accuracy(digits_onnx, x, y) - 0.01


def test_a_path_that_is_not_affine_is_reported_and_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 3)
    )
    with torch.no_grad():
        model[2].running_mean.uniform_(0.2, 0.5)
        model[2].running_var.uniform_(0.1, 0.3)
    graph = bnfold.export_onnx(model.eval(), (torch.rand(2, 1, 4, 4),), dynamic_batch=True)
    data = (1 - np.random.default_rng(0).uniform(0, 1, (32, 1, 4, 4))).astype(np.float32)
    name = graph.graph.input[0].name
    alignment = align_input_onnx(graph, [{name: data}])
    assert not alignment.applied
    assert "is not affine" in alignment.reason, alignment.reason
    assert alignment.model is graph


def test_a_graph_with_two_inputs_is_skipped_with_the_reason():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

        def forward(self, a, b):
            return self.bn(self.conv(a + b))

    graph = bnfold.export_onnx(Two().eval(), (torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)))
    names = [i.name for i in graph.graph.input]
    feeds = [{n: np.ones((2, 1, 4, 4), np.float32) for n in names}]
    alignment = align_input_onnx(graph, feeds)
    assert not alignment.applied and "2 inputs" in alignment.reason


def test_torch_recalibrate_aligns_like_the_onnx_side(digits_model, digits_split, digits_onnx):
    """bnfold.recalibrate(align_input=True): the same numerics as recalibrate_onnx, the map
    as a wrapping module; the caller's model is unchanged."""
    from bnfold.drift.torch_alignment import InputAligned

    shifted = 1 - digits_split.train_x[:64]
    batches = [shifted[i : i + 32] for i in range(0, 64, 32)]
    repaired = bnfold.recalibrate(digits_model, batches, align_input=True)
    assert isinstance(repaired, InputAligned) and repaired.input_alignment["applied"]
    onnx_side = recalibrate_onnx(
        digits_onnx, [{"x": b.numpy()} for b in batches], align_input=True
    ).input_alignment
    np.testing.assert_allclose(repaired.input_alignment["gain"], onnx_side["gain"], atol=1e-3)
    np.testing.assert_allclose(repaired.input_alignment["bias"], onnx_side["bias"], atol=1e-3)
    x, y = 1 - digits_split.test_x, digits_split.test_y
    with torch.no_grad():
        assert (repaired(x).argmax(1) == y).float().mean() > 0.95
        plain = bnfold.recalibrate(digits_model, batches)
        assert (plain(x).argmax(1) == y).float().mean() < 0.3
    assert not hasattr(digits_model, "input_alignment")
    # clean data: nothing that costs accuracy
    clean = digits_split.train_x[:64]
    kept = bnfold.recalibrate(digits_model, [clean[:32], clean[32:]], align_input=True)
    with torch.no_grad():
        clean_accuracy = (kept(digits_split.test_x).argmax(1) == y).float().mean()
    assert clean_accuracy >= 0.975
    assert "reason" in kept.input_alignment
