"""Half precision: folding must not make the model less accurate than it was."""

import pytest
import torch
from torch import nn

import bnfold
from tests.bnfold.bn_helpers import randomize_bn


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.LeakyReLU(), nn.BatchNorm1d(4), nn.Linear(4, 3),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fold_is_no_worse_than_unfolded(dtype):
    model = randomize_bn(_net()).to(dtype)
    x = torch.randn(4, 3, 6, 6).to(dtype)
    result = bnfold.fold(model, (x,))
    report = bnfold.verify(model, result.module, (x,), rtol=1.0, float64_reference=True)
    for out in report.outputs:
        assert out.candidate_vs_f64 <= out.reference_vs_f64
    assert next(result.module.parameters()).dtype == dtype
    assert any(str(dtype) in note for note in result.report.notes)
