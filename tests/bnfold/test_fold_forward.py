"""Forward folds: BN -> (Dropout/Identity/Flatten) -> Linear / Conv, merged into the consumer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold import Action
from tests.bnfold.bn_helpers import count_bn_modules, fold_and_check, randomize_bn


def mlp_bn_after_activation():
    return nn.Sequential(
        nn.Linear(12, 10), nn.LeakyReLU(), nn.BatchNorm1d(10),
        nn.Linear(10, 8), nn.LeakyReLU(), nn.BatchNorm1d(8),
        nn.Linear(8, 3),
    )  # fmt: skip


def test_fold_forward_bn_after_activation_into_next_linear():
    result = fold_and_check(randomize_bn(mlp_bn_after_activation()), torch.randn(4, 12))
    assert result.report.counts()["folded_forward"] == 2
    assert count_bn_modules(result.module) == 0


@pytest.mark.parametrize("between", [nn.Dropout(0.3), nn.Identity()])
def test_fold_forward_through_eval_identity(between):
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(6), between, nn.Linear(6, 2)))
    result = fold_and_check(model, torch.randn(4, 6))
    assert result.report.entries[0].action is Action.FOLDED_FORWARD


class FlattenHead(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.bn = nn.BatchNorm2d(3)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3 * 4 * 5, 7)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        if self.how == "module":
            y = self.flatten(y)
        elif self.how == "function":
            y = torch.flatten(y, 1)
        else:
            y = y.view(y.size(0), -1)
        return self.fc(y)


@pytest.mark.parametrize("how", ["module", "function", "view"])
def test_fold_forward_bn2d_flatten_linear_maps_channel_blocks(how):
    result = fold_and_check(randomize_bn(FlattenHead(how)), torch.randn(2, 3, 4, 5))
    assert result.report.entries[0].action is Action.FOLDED_FORWARD


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_fold_forward_into_conv_when_exact(groups, padding_mode):
    padding = 0 if padding_mode == "zeros" else 1
    conv = nn.Conv2d(4, 6, 3, padding=padding, padding_mode=padding_mode, groups=groups)
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), conv))
    result = fold_and_check(model, torch.randn(2, 4, 7, 7))
    assert result.report.entries[0].action is Action.FOLDED_FORWARD


class PadThenConv(nn.Module):
    """BN -> a padding (a module, or F.pad when `pad` is a tuple) -> Conv2d."""

    def __init__(self, pad, mode: str = "constant", zero_shift: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(4, affine=not zero_shift)
        self.pad, self.mode = pad, mode
        self.conv = nn.Conv2d(4, 6, 3)

    def forward(self, x):
        y = self.bn(torch.relu(x))
        if isinstance(self.pad, tuple):
            y = F.pad(y, self.pad, mode=self.mode)
        else:
            y = self.pad(y)
        return self.conv(y)


def _pad_then_conv(pad, zero_shift: bool = False, **kwargs) -> nn.Module:
    model = PadThenConv(pad, zero_shift=zero_shift, **kwargs)
    if zero_shift:  # running_mean 0 and no affine bias: t == 0
        model.eval()
        with torch.no_grad():
            model.bn.running_var.uniform_(0.5, 2.0)
        return model
    return randomize_bn(model)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _pad_then_conv(nn.ReflectionPad2d(1)),
        lambda: _pad_then_conv(nn.ReplicationPad2d((1, 2, 0, 1))),
        lambda: _pad_then_conv(nn.CircularPad2d(1)),
        lambda: _pad_then_conv((1, 1, 2, 0), mode="reflect"),
        lambda: _pad_then_conv((1, 1, 1, 1), mode="replicate"),
        lambda: _pad_then_conv(nn.ConstantPad2d(-1, 3.0)),  # a crop
        lambda: _pad_then_conv(nn.ZeroPad2d(1), zero_shift=True),
    ],
    ids=["reflect", "replicate", "circular", "F.pad reflect", "F.pad replicate", "crop", "zero"],
)
def test_fold_forward_through_a_padding_that_copies_channel_values(make):
    result = fold_and_check(make(), torch.randn(2, 4, 7, 7))
    assert result.report.entries[0].action is Action.FOLDED_FORWARD


@pytest.mark.parametrize(
    "pad,why",
    [
        (nn.ZeroPad2d(1), "inexact at the borders"),
        (nn.ConstantPad2d(1, 0.5), "pads with 0.5"),
        ((0, 0, 0, 0, 1, 0), "batch or channel axis"),  # F.pad: one more channel in front
    ],
)
def test_a_padding_that_is_not_exact_keeps_bn(pad, why):
    model = _pad_then_conv(pad)
    if isinstance(pad, tuple):
        model.conv = nn.Conv2d(5, 6, 3)
    result = fold_and_check(model, torch.randn(2, 4, 7, 7))
    (entry,) = result.report.entries
    assert entry.action is Action.KEPT
    assert why in entry.reason


def test_zero_padded_conv_consumer_keeps_bn():
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1)))
    result = fold_and_check(model, torch.randn(2, 4, 6, 6))
    (entry,) = result.report.entries
    assert entry.action is Action.KEPT
    assert "pads with zeros" in entry.reason


def test_zero_padded_conv_consumer_folds_when_shift_is_zero():
    bn = nn.BatchNorm2d(4, affine=False)  # running_mean 0 -> t == 0: the border stays exact
    model = nn.Sequential(nn.ReLU(), bn, nn.Conv2d(4, 4, 3, padding=1)).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
    result = fold_and_check(model, torch.randn(2, 4, 6, 6))
    assert result.report.entries[0].action is Action.FOLDED_FORWARD


def test_bn_1d_on_sequence_then_linear_on_last_dim_is_kept():
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3)))
    result = fold_and_check(model, torch.randn(2, 5, 5))
    assert result.report.entries[0].action is Action.KEPT


def test_transposed_conv_consumer_is_kept():
    model = randomize_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ConvTranspose2d(3, 2, 3)))
    result = fold_and_check(model, torch.randn(2, 3, 4, 4))
    assert "transposed" in result.report.entries[0].reason
