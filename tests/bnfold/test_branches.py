"""Structural reparameterization: sums of parallel branches merged into one conv."""

import pytest
import torch
from torch import nn

import bnfold
from bnfold import Action
from tests.bnfold.bn_helpers import fold_and_check, randomize_bn


def conv_bn(cin, cout, k, stride=1, padding=0, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class RepVGGBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.kxk = conv_bn(cin, cout, 3, stride, 1, groups)
        self.k1 = conv_bn(cin, cout, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def forward(self, x):
        out = self.kxk(x) + self.k1(x)
        if self.identity is not None:
            out += self.identity(x)
        return torch.relu(out)


class MobileOneBlock(nn.Module):
    """k over-parameterized 3x3 branches, a 1x1 scale branch, an identity BN."""

    def __init__(self, c, k=3, groups=1, scale=True):
        super().__init__()
        self.branches = nn.ModuleList(conv_bn(c, c, 3, 1, 1, groups) for _ in range(k))
        self.scale = conv_bn(c, c, 1, 1, 0, groups) if scale else None
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.scale(x) if self.scale is not None else 0
        for b in self.branches:
            out += b(x)
        return torch.relu(out + self.identity(x))


class ACBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.square = conv_bn(cin, cout, (3, 3), stride, (1, 1))
        self.hor = conv_bn(cin, cout, (1, 3), stride, (0, 1))
        self.ver = conv_bn(cin, cout, (3, 1), stride, (1, 0))

    def forward(self, x):
        return self.square(x) + self.hor(x) + self.ver(x)


def _conv_calls(module):
    return [n for n in module.graph.nodes if n.op == "call_module"
            and isinstance(module.get_submodule(n.target), nn.Conv2d)]  # fmt: skip


@pytest.mark.parametrize(
    "net, shape",
    [
        (nn.Sequential(RepVGGBlock(4, 6, stride=2), RepVGGBlock(6, 6), RepVGGBlock(6, 6, groups=2)),
         (2, 4, 9, 9)),
        (nn.Sequential(MobileOneBlock(6), MobileOneBlock(6, k=2, groups=6, scale=False)),
         (2, 6, 7, 7)),
        (nn.Sequential(ACBlock(3, 5), nn.ReLU(), ACBlock(5, 8, stride=2)), (2, 3, 10, 11)),
    ],
    ids=["repvgg", "mobileone", "acnet"],
)  # fmt: skip
def test_branch_sums_merge_into_one_conv_exactly(net, shape):
    model = randomize_bn(net)
    result = fold_and_check(model, torch.randn(*shape))
    blocks = sum(isinstance(m, RepVGGBlock | MobileOneBlock | ACBlock) for m in model)
    assert len(_conv_calls(result.module)) == blocks
    assert all(m.into for m in result.report.merges) and len(result.report.merges) == blocks
    assert result.report.counts()["kept"] == 0
    for m in result.report.merges:
        assert m.macs_after <= m.macs_before


def test_identity_bn_is_reported_as_merged():
    result = fold_and_check(randomize_bn(RepVGGBlock(4, 4)), torch.randn(2, 4, 6, 6))
    merged = [e for e in result.report.entries if e.action is Action.MERGED]
    assert [e.name for e in merged] == ["identity"]
    assert merged[0].targets == [result.report.merges[0].into]


def test_merge_can_be_switched_off():
    model = randomize_bn(RepVGGBlock(4, 4))
    result = bnfold.fold(model, (torch.randn(2, 4, 6, 6),), merge_branches=False)
    assert not result.report.merges
    assert len(_conv_calls(result.module)) == 2


class Misaligned(nn.Module):
    """Stride 2 on an even size: a 3x3/pad 1 and a 2x2/pad 0 branch have the same output size
    but read different windows."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, 2, 1)
        self.b = nn.Conv2d(3, 4, 2, 2, 0)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_misaligned_padding_is_not_merged():
    result = fold_and_check(Misaligned().eval(), torch.randn(2, 3, 8, 8))
    (merge,) = result.report.merges
    assert merge.into is None and "line up" in merge.reason


class CrossOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.Conv2d(4, 4, (1, 5), padding=(0, 2))
        self.v = nn.Conv2d(4, 4, (5, 1), padding=(2, 0))

    def forward(self, x):
        return self.h(x) + self.v(x)


def test_merge_that_costs_more_is_not_done():
    result = fold_and_check(CrossOnly().eval(), torch.randn(2, 4, 7, 7))
    (merge,) = result.report.merges
    assert merge.into is None and merge.macs_after > merge.macs_before


class SharedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.b(x)
        return self.a(x) + y, y


def test_branch_with_other_user_is_not_merged():
    result = fold_and_check(SharedBranch().eval(), torch.randn(2, 3, 5, 5))
    (merge,) = result.report.merges
    assert merge.into is None and "other users" in merge.reason


def test_residual_add_is_not_a_candidate():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(torch.relu(x))) + x

    result = fold_and_check(Residual().eval(), torch.randn(2, 3, 5, 5))
    assert result.report.merges == []


class BNAfterSum(nn.Module):
    """RepViT's token mixer: BN(dwconv3x3(x) + dwconv1x1(x) + x)."""

    def __init__(self, c=4):
        super().__init__()
        self.k3 = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.k1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.k3(x) + self.k1(x) + x)


def test_bn_after_a_merged_sum_folds_into_the_merged_conv():
    result = fold_and_check(randomize_bn(BNAfterSum()), torch.randn(2, 4, 6, 6))
    (merge,) = result.report.merges
    (entry,) = result.report.entries
    assert entry.action is Action.FOLDED_BACKWARD and entry.targets == [merge.into]
    assert len(_conv_calls(result.module)) == 1
