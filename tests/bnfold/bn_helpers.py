"""Shared helpers for the bnfold tests: BN statistics that are not the identity, and one
assertion that a fold is exact and complete. (A module, not conftest.py: test folders below
this one have conftest files of their own, and a module named conftest is ambiguous.)"""

from __future__ import annotations

import torch
from torch import nn

import bnfold


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (in place), then eval()."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        stats = [getattr(m, k, None) for k in ("running_mean", "running_var")]
        if all(isinstance(t, torch.Tensor) for t in stats):
            n = stats[0].numel()
            with torch.no_grad():
                stats[0].copy_(torch.rand(n, generator=gen) * 2 - 1)
                stats[1].copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                for name, lo, hi in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5)):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor):
                        t.copy_(torch.rand(n, generator=gen) * (hi - lo) + lo)
    return model.eval()


def fold_and_check(model: nn.Module, *inputs: torch.Tensor, rtol=1e-5, atol=1e-6):
    """Fold, then verify the folded module against the eval original on the inputs plus the
    generated sets (batch sizes, constant input). Returns the FoldResult."""
    result = bnfold.fold(model, inputs)
    check = bnfold.verify(model, result.module, inputs, rtol=rtol, atol=atol)
    assert check.ok, check.summary() + "\n" + result.report.summary()
    assert not result.module.training
    return result


def count_bn_modules(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
