"""Sequential affine layers composed into one when that is exact and cheaper."""

import torch
from torch import nn

from tests.bnfold.bn_helpers import fold_and_check, randomize_bn


def _compositions(result):
    return result.report.compositions


def test_linear_dropout_bn_linear_composes_when_cheaper():
    # BN cannot fold backward (Dropout between), folds forward; the two Linears then compose
    model = randomize_bn(
        nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.2), nn.BatchNorm1d(64), nn.Linear(64, 8))
    )
    result = fold_and_check(model, torch.randn(4, 8))
    (c,) = _compositions(result)
    assert c.into and (c.macs_before, c.macs_after) == (8 * 64 + 64 * 8, 8 * 8)
    linears = [m for m in result.module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1


def test_linear_pair_that_would_cost_more_is_left():
    model = nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 64)).eval()
    result = fold_and_check(model, torch.randn(4, 64))
    (c,) = _compositions(result)
    assert c.into is None and "multiply-adds" in c.reason


def test_conv1x1_then_conv_composes():
    model = nn.Sequential(nn.Conv2d(4, 32, 1, bias=False), nn.Conv2d(32, 4, 3, padding=1)).eval()
    result = fold_and_check(model, torch.randn(2, 4, 7, 7))
    (c,) = _compositions(result)
    assert c.into is not None


def test_conv1x1_with_bias_before_zero_padded_conv_is_left():
    model = nn.Sequential(nn.Conv2d(4, 32, 1), nn.Conv2d(32, 4, 3, padding=1)).eval()
    result = fold_and_check(model, torch.randn(2, 4, 7, 7))
    (c,) = _compositions(result)
    assert c.into is None and "borders" in c.reason


def test_conv1x1_with_bias_before_unpadded_conv_composes():
    model = nn.Sequential(nn.Conv2d(4, 32, 1), nn.Conv2d(32, 4, 3)).eval()
    result = fold_and_check(model, torch.randn(2, 4, 7, 7))
    assert _compositions(result)[0].into is not None


def test_nonlinearity_between_is_not_a_candidate():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    result = fold_and_check(model, torch.randn(4, 8))
    assert _compositions(result) == []


def test_first_layer_with_other_user_is_left():
    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 64), nn.Linear(64, 8)

        def forward(self, x):
            y = self.a(x)
            return self.b(y), y

    result = fold_and_check(Fork().eval(), torch.randn(4, 8))
    (c,) = _compositions(result)
    assert c.into is None and "other users" in c.reason
