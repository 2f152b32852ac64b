"""recalibrate: the population estimate recovers known statistics."""

import torch
from torch import nn

import bnfold


def _batches(mean, std, n_batches=200, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, mean.numel(), generator=g) * std + mean for _ in range(n_batches)]


def test_recalibrate_recovers_true_statistics_of_known_distribution():
    mean = torch.tensor([3.0, -2.0, 0.5, 10.0])
    std = torch.tensor([0.5, 2.0, 1.0, 4.0])
    model = nn.Sequential(nn.BatchNorm1d(4)).eval()  # stale: mean 0, var 1
    calibrated = bnfold.recalibrate(model, _batches(mean, std))
    bn = calibrated[0]
    # 3200 samples: the standard error of the mean is std/56, of the variance ~ var/40
    torch.testing.assert_close(bn.running_mean, mean, atol=float(std.max()) * 0.1, rtol=0)
    torch.testing.assert_close(bn.running_var, std**2, rtol=0.1, atol=0)
    assert torch.equal(model[0].running_mean, torch.zeros(4))  # caller's model unchanged
    assert not calibrated.training


def test_recalibrate_uses_unbiased_within_batch_variance():
    # two batches of two samples each: batch variances (biased) 1 and 4; m = 2
    batches = [torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [4.0]])]
    bn = bnfold.recalibrate(nn.BatchNorm1d(1), batches)
    torch.testing.assert_close(bn.running_mean, torch.tensor([1.5]))
    torch.testing.assert_close(bn.running_var, torch.tensor([(1.0 + 4.0) / 2 * 2 / 1]))
    assert int(bn.num_batches_tracked) == 2


def test_recalibrate_sees_inputs_normalized_by_batch_statistics_upstream():
    # the second BN sees the first BN's output; with batch statistics that output has
    # mean 0 / var ~1 per channel, whatever the stale first-BN statistics say
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model[0].running_mean.fill_(100.0)
    mean, std = torch.tensor([5.0, -5.0]), torch.tensor([2.0, 3.0])
    calibrated = bnfold.recalibrate(model, _batches(mean, std, n_batches=50, batch=64))
    torch.testing.assert_close(calibrated[1].running_mean, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(calibrated[1].running_var, torch.ones(2), atol=0.05, rtol=0)


def test_recalibrate_without_batches_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="at least one"):
        bnfold.recalibrate(nn.Sequential(nn.BatchNorm1d(2)), [])
