"""Backward folds: Conv / ConvTranspose / Linear -> BN, merged into the producer."""

import pytest
import torch
from torch import nn

from bnfold import Action
from tests.bnfold.bn_helpers import count_bn_modules, fold_and_check, randomize_bn

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2, "depthwise"])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_backward_conv_bn_exact(dim, bias, groups, transposed):
    cin, cout = (4, 4) if groups == "depthwise" else (4, 6)
    g = cin if groups == "depthwise" else groups
    layer = (CONVT if transposed else CONV)[dim](cin, cout, 3, padding=1, groups=g, bias=bias)
    model = randomize_bn(nn.Sequential(layer, BN[dim](cout), nn.ReLU()))
    x = torch.randn(2, cin, *([5] * dim))
    result = fold_and_check(model, x)
    assert [e.action for e in result.report.entries] == [Action.FOLDED_BACKWARD]
    assert count_bn_modules(result.module) == 0


@pytest.mark.parametrize("bias", [True, False])
def test_fold_backward_linear_bn_2d(bias):
    model = randomize_bn(nn.Sequential(nn.Linear(8, 5, bias=bias), nn.BatchNorm1d(5)))
    result = fold_and_check(model, torch.randn(4, 8))
    assert result.report.counts()["folded_backward"] == 1


def test_linear_bn_on_3d_input_is_not_folded_into_the_linear():
    # BatchNorm1d on [N, C, L] normalizes C; the Linear's features are L. C == L == 6 on
    # purpose: a type-based fuser would fold the wrong axis.
    model = randomize_bn(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)))
    result = fold_and_check(model, torch.randn(3, 6, 5))
    (entry,) = result.report.entries
    assert entry.action is Action.KEPT
    assert "last dim" in entry.reason


def test_fold_backward_chain_conv_bn_bn():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    result = fold_and_check(model, torch.randn(2, 3, 8, 8))
    assert result.report.counts()["folded_backward"] == 2
    assert count_bn_modules(result.module) == 0


def test_grouped_conv_transpose_scales_output_channel_axis():
    # groups=3, 2 output channels per group: output channel o lives at weight[g*in_g:, o % 2]
    layer = nn.ConvTranspose2d(6, 6, 3, stride=2, groups=3)
    bn = nn.BatchNorm2d(6)
    model = randomize_bn(nn.Sequential(layer, bn))
    fold_and_check(model, torch.randn(2, 6, 4, 4))


def test_producer_with_other_user_keeps_bn():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(self.bn(y)) + y

    result = fold_and_check(randomize_bn(Branch()), torch.randn(2, 3, 4, 4))
    (entry,) = result.report.entries
    assert entry.action is Action.KEPT and "also used by" in entry.reason


class SeqLinearBN(nn.Module):
    """Linear on [N, L, F], then the features moved to dim 1 for BatchNorm1d."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.linear = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.linear(x)
        if self.how == "transpose":
            y = y.transpose(1, 2)
        elif self.how == "permute":
            y = y.permute(0, 2, 1)
        else:  # moves the sequence axis, not the features, to dim 1
            y = y.transpose(0, 1)
        return self.bn(y)


@pytest.mark.parametrize("how", ["transpose", "permute"])
def test_fold_backward_linear_nd_through_permute(how):
    result = fold_and_check(randomize_bn(SeqLinearBN(how)), torch.randn(3, 4, 5))
    assert result.report.entries[0].action is Action.FOLDED_BACKWARD


def test_permute_that_does_not_bring_features_to_dim1_is_kept():
    model = randomize_bn(SeqLinearBN("wrong"))
    model.bn = nn.BatchNorm1d(3)
    result = fold_and_check(randomize_bn(model), torch.randn(3, 6, 5))
    assert result.report.entries[0].action is Action.KEPT
