"""What must not happen: shared modules, shared tensors and the user's model are safe."""

import copy

import torch
from torch import nn

import bnfold
from bnfold import Action
from tests.bnfold.bn_helpers import fold_and_check, randomize_bn


class ReusedConv(nn.Module):
    """One conv called on a BN path and on a plain path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


class BNTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x))


class TiedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 4)
        self.l2 = nn.Linear(4, 4)
        self.l2.weight = self.l1.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.l1(x)) + self.l2(x)


def test_reused_conv_gets_folded_copy_and_plain_path_is_unchanged():
    result = fold_and_check(randomize_bn(ReusedConv()), torch.randn(2, 3, 5, 5))
    (entry,) = result.report.entries
    assert entry.action is Action.FOLDED_BACKWARD
    assert "called 2 times" in entry.reason


def test_bn_applied_twice_folds_each_call():
    result = fold_and_check(randomize_bn(BNTwice()), torch.randn(2, 3, 5, 5))
    assert [e.action for e in result.report.entries] == [Action.FOLDED_BACKWARD] * 2
    assert {e.name for e in result.report.entries} == {"bn", "bn#2"}


def test_tied_weights_stay_exact_and_are_reported():
    model = randomize_bn(TiedLinear())
    result = fold_and_check(model, torch.randn(4, 4))
    assert "shared weights" in result.report.entries[0].reason
    assert model.l1.weight is model.l2.weight  # the user's tie is untouched


def test_fold_leaves_the_users_model_unchanged():
    model = randomize_bn(ReusedConv()).train()
    before = copy.deepcopy(model.state_dict())
    result = bnfold.fold(model, (torch.randn(2, 3, 5, 5),))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any("train mode" in n for n in result.report.notes)
    assert not result.module.training


class Untraceable(nn.Module):
    """Data-dependent control flow at the top; traceable children."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4 * 4 * 4), nn.Linear(64, 2))

    def forward(self, x):
        y = self.block(x)
        if y.sum() > 0:  # depends on the values: symbolic tracing cannot follow it
            y = y * 2
        return self.head(y)


def test_untraceable_model_falls_back_to_children():
    model = randomize_bn(Untraceable())
    result = fold_and_check(model, torch.randn(2, 3, 6, 6))
    assert any("could not be captured" in n for n in result.report.notes)
    assert result.report.counts()["kept"] == 0
    assert type(result.module) is Untraceable


def test_report_is_json_serializable():
    import json

    result = fold_and_check(randomize_bn(BNTwice()), torch.randn(2, 3, 5, 5))
    data = json.loads(json.dumps(result.report.to_dict()))
    assert data["counts"]["total"] == 2
    assert data["entries"][0]["action"] == "folded_backward"


def test_fold_with_inputs_the_model_cannot_run_is_a_clear_error():
    import pytest

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="does not run on the example inputs"):
        bnfold.fold(model, (torch.randn(2, 5, 8, 8),))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bnfold.fold("resnet", (torch.randn(1),))


def test_fold_accepts_a_single_tensor_or_a_list():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    for inputs in (x, [x]):
        assert bnfold.fold(model, inputs).report.counts()["folded_backward"] == 1
