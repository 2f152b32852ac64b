"""Every kind of BatchNorm users meet, decided by what eval mode computes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold import Action
from tests.bnfold.bn_helpers import fold_and_check, randomize_bn


class MyBN(nn.BatchNorm2d):
    """A user subclass that does not override forward."""


class FunctionalBN(nn.Module):
    def __init__(self, training: bool):
        super().__init__()
        self.training_flag = training
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return F.batch_norm(
            self.conv(x), self.mean, self.var, self.gamma, self.beta,
            training=self.training_flag, eps=1e-3,
        )  # fmt: skip


def conv_then(bn: nn.Module) -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), bn))


@pytest.mark.parametrize(
    "bn",
    [
        nn.BatchNorm2d(4),
        MyBN(4),
        nn.BatchNorm2d(4, affine=False),
        nn.BatchNorm2d(4, momentum=None),
        nn.SyncBatchNorm(4),
    ],
    ids=["BatchNorm2d", "subclass", "affine_false", "momentum_none", "SyncBatchNorm"],
)
def test_bn_kinds_fold(bn):
    result = fold_and_check(conv_then(bn), torch.randn(2, 3, 6, 6))
    assert result.report.entries[0].action is Action.FOLDED_BACKWARD


def test_frozen_batchnorm_folds():
    from torchvision.ops.misc import FrozenBatchNorm2d

    result = fold_and_check(conv_then(FrozenBatchNorm2d(4)), torch.randn(2, 3, 6, 6))
    (entry,) = result.report.entries
    assert entry.kind == "FrozenBatchNorm2d" and entry.action is Action.FOLDED_BACKWARD


def test_timm_batchnorm_act_folds_and_keeps_activation():
    from timm.layers import BatchNormAct2d

    model = conv_then(BatchNormAct2d(4, act_layer=nn.ReLU))
    result = fold_and_check(model, torch.randn(2, 3, 6, 6))
    assert result.report.entries[0].action is Action.FOLDED_BACKWARD
    assert result.report.entries[0].kind == "F.batch_norm"


def test_functional_batch_norm_eval_folds():
    result = fold_and_check(FunctionalBN(training=False).eval(), torch.randn(2, 3, 6, 6))
    assert result.report.entries[0].action is Action.FOLDED_BACKWARD


def test_functional_batch_norm_training_true_is_kept():
    model = FunctionalBN(training=True).eval()
    result = fold_and_check(model, torch.randn(4, 3, 6, 6))
    (entry,) = result.report.entries
    assert entry.action is Action.KEPT and "training=True" in entry.reason


def test_bn_without_running_stats_is_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    result = fold_and_check(model, torch.randn(4, 3, 6, 6))
    (entry,) = result.report.entries
    assert entry.action is Action.KEPT and "batch statistics" in entry.reason


@pytest.mark.parametrize("dim", [1, 3])
def test_bn_1d_and_3d(dim):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dim](2, 3, 3)
    bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dim](3)
    result = fold_and_check(randomize_bn(nn.Sequential(conv, bn)), torch.randn(2, 2, *[5] * dim))
    assert result.report.entries[0].action is Action.FOLDED_BACKWARD


def test_weight_standardization_bn_on_constant_weight_is_precomputed():
    from timm.layers import ScaledStdConv2d

    model = nn.Sequential(ScaledStdConv2d(3, 4, 3), nn.ReLU()).eval()
    result = fold_and_check(model, torch.randn(2, 3, 6, 6))
    (entry,) = result.report.entries
    assert entry.action is Action.PRECOMPUTED
    # the standardized weight is now a buffer: no batch_norm runs in the forward pass
    assert "batch_norm" not in result.module.code


class Opaque(nn.Module):
    """A module the tracer must not enter (as timm marks some), with Conv -> BN inside."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


def test_bn_inside_a_module_kept_as_one_call_is_folded(monkeypatch):
    from timm.layers import _fx as timm_fx

    monkeypatch.setattr(timm_fx, "_leaf_modules", timm_fx._leaf_modules | {Opaque})
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Opaque()))
    result = fold_and_check(model, torch.randn(2, 3, 5, 5))
    assert [e.name for e in result.report.folded] == ["1", "2.bn"]
