"""Branch sums written with in-place adds, and BN branches that read x through identities."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnfold import Action
from tests.bnfold.bn_helpers import fold_and_check, randomize_bn


def conv_bn(c, k, groups=1):
    return nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c))  # fmt: skip


class GhostSum(nn.Module):
    """timm's RepGhostModule: cheap_operation(x1) + fusion_bn(fusion_conv(x1)), fusion_conv an
    nn.Identity, x1 the output of an in-place ReLU."""

    def __init__(self, c=4, between: nn.Module | None = None):
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c),
                                     nn.ReLU(inplace=True))  # fmt: skip
        self.cheap = conv_bn(c, 3, groups=c)
        self.fusion_conv = between if between is not None else nn.Identity()
        self.fusion_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x1 = self.primary(x)
        return self.cheap(x1) + self.fusion_bn(self.fusion_conv(x1))


class GhostResidual(nn.Module):
    """RepGhostBottleneck: the ghost sum inside a residual add (`x += shortcut`)."""

    def __init__(self, c=4):
        super().__init__()
        self.ghost = GhostSum(c)
        self.shortcut = conv_bn(c, 3, groups=c)

    def forward(self, x):
        out = self.ghost(x)
        out += self.shortcut(x)
        return out


class IdentityBeforeConv(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.id = nn.Identity()
        self.conv = conv_bn(c, 3)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x = torch.relu(x)
        return self.conv(self.id(x)) + self.bn(x.contiguous())


class InplaceAdds(nn.Module):
    """A RepVGG block summed in each in-place (and method) spelling."""

    def __init__(self, how: str, c=4):
        super().__init__()
        self.how = how
        self.k3, self.k1, self.bn = conv_bn(c, 3), conv_bn(c, 1), nn.BatchNorm2d(c)

    def forward(self, x):
        x = torch.relu(x)
        out = self.k3(x)
        if self.how == "iadd":
            out += self.k1(x)
            out += self.bn(x)
        elif self.how == "add_":  # the result is dropped: `out` itself holds the sum
            out.add_(self.k1(x))
            out.add_(self.bn(x))
        elif self.how == "add_method":
            out = out.add(self.k1(x)).add(self.bn(x))
        else:
            out = torch.add(torch.add(out, self.k1(x)), F.dropout(self.bn(x), 0.5, False))
        return torch.relu(out)


# (id, module factory, input shape): also folded in ONNX by test_fold_parity
CASES = [
    ("ghost_identity", GhostSum, (2, 4, 6, 6)),
    ("ghost_dropout", lambda: GhostSum(between=nn.Dropout(0.2)), (2, 4, 6, 6)),
    ("ghost_residual", GhostResidual, (2, 4, 6, 6)),
    ("identity_before_conv", IdentityBeforeConv, (2, 4, 6, 6)),
    *(
        (f"sum_{how}", lambda how=how: InplaceAdds(how), (2, 4, 6, 6))
        for how in ("iadd", "add_", "add_method", "torch_add")
    ),  # fmt: skip
]


@pytest.mark.parametrize("make, shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_sum_with_identity_fed_bn_or_inplace_adds_merges_exactly(make, shape):
    model = randomize_bn(make())
    result = fold_and_check(model, torch.randn(*shape))
    report = result.report
    assert report.counts()["kept"] == 0, report.summary()
    assert len(report.merges) == 1 and report.merges[0].into, report.summary()
    merged = [e for e in report.entries if e.action is Action.MERGED]
    assert len(merged) == 1 and merged[0].targets == [report.merges[0].into]
    # no identity is left over from the branches: one conv per merged sum, nothing else
    assert not any(isinstance(m, nn.Identity | nn.Dropout) for m in result.module.modules())


def test_ghost_sum_in_residual_merges_the_inner_sum_only():
    result = fold_and_check(randomize_bn(GhostResidual()), torch.randn(2, 4, 6, 6))
    (merge,) = result.report.merges
    assert merge.branches == ["ghost.fusion_bn", "ghost.cheap.0"]


class WrittenBetween(nn.Module):
    """x is written in place (an in-place ReLU whose result is dropped) after one branch read
    it and before the BN branch does: the BN branch reads other values than the conv did."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = conv_bn(c, 3)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        x = x * 1.0
        a = self.conv(x)
        self.act(x)
        return a + self.bn(x)


def test_input_written_in_place_between_branches_is_not_merged():
    result = fold_and_check(randomize_bn(WrittenBetween()), torch.randn(2, 4, 6, 6))
    (merge,) = result.report.merges
    assert merge.into is None and "modified in place" in merge.reason


class SumIntoInput(nn.Module):
    """`x.add_(conv(x))` writes the sum into x's tensor, which `kept` still refers to. (fx
    traces `x += y` as `x + y`, so only the method spelling writes in the graph.)"""

    def __init__(self, c=4):
        super().__init__()
        self.conv = conv_bn(c, 3)
        self.id = nn.Identity()

    def forward(self, x):
        x = x * 1.0
        kept = self.id(x)
        x.add_(self.conv(x))
        return torch.relu(x), kept


def test_sum_written_in_place_into_its_input_is_not_merged():
    result = fold_and_check(randomize_bn(SumIntoInput()), torch.randn(2, 4, 6, 6))
    (merge,) = result.report.merges
    assert merge.into is None and "written in place" in merge.reason


def test_later_readers_of_an_inplace_add_read_the_sum():
    from bnfold.capture import trace

    gm = trace(InplaceAdds("add_").eval(), (torch.randn(2, 4, 6, 6),))
    relu_out = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.relu][-1]
    assert relu_out.args[0].op == "call_method" and relu_out.args[0].target == "add_"
