"""verify: catches wrong candidates, exposes border errors, compares against float64."""

import copy

import torch
from torch import nn

import bnfold
from bnfold.numerics import bn_scale_shift, fold_bn_into_consumer
from tests.bnfold.bn_helpers import randomize_bn


def test_verify_identical_models_ok_with_generated_cases():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    report = bnfold.verify(model, copy.deepcopy(model), (torch.randn(2, 3, 6, 6),))
    assert report.ok
    assert [c.name for c in report.cases] == ["given", "batch=1", "batch=3", "constant"]
    assert report.max_abs_err == 0.0


def test_verify_flags_a_perturbed_candidate():
    model = randomize_bn(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)))
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad[0].weight[0, 0] += 1e-2
    report = bnfold.verify(model, bad, (torch.randn(3, 5),))
    assert not report.ok
    assert report.outputs[0].max_abs_err > 1e-3


def test_constant_input_exposes_a_naive_fold_into_a_zero_padded_conv():
    bn, conv = nn.BatchNorm2d(2), nn.Conv2d(2, 2, 3, padding=1)
    reference = randomize_bn(nn.Sequential(bn, conv))
    s, t = bn_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
    naive = copy.deepcopy(conv)
    w, b = fold_bn_into_consumer(conv.weight, conv.bias, s, t)
    naive.weight.data, naive.bias.data = w, b
    report = bnfold.verify(reference, naive, (torch.randn(2, 2, 5, 5),))
    constant = next(c for c in report.cases if c.name == "constant")
    assert not constant.ok and not report.ok


def test_verify_against_float64_reports_both_errors():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    folded = bnfold.fold(model, (torch.randn(2, 3, 6, 6),)).module
    report = bnfold.verify(model, folded, (torch.randn(2, 3, 6, 6),), float64_reference=True)
    out = report.outputs[0]
    assert report.ok
    assert out.reference_vs_f64 is not None and out.candidate_vs_f64 is not None
    assert 0 < out.candidate_vs_f64 < 1e-4


def test_verify_restores_training_flags():
    model = randomize_bn(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))).train()
    stats = model[1].running_mean.clone()
    bnfold.verify(model, copy.deepcopy(model), (torch.randn(3, 5),))
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, stats)  # eval mode: statistics untouched


def test_verify_names_nested_outputs():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)

        def forward(self, x):
            return {"logits": self.a(x), "aux": (self.b(x),)}

    model = TwoHeads().eval()
    report = bnfold.verify(model, model, (torch.randn(2, 3),))
    assert sorted(o.name for o in report.outputs) == ["output['aux'][0]", "output['logits']"]
