"""Re-estimate BatchNorm running statistics from calibration data.

For a model whose statistics are stale, or were gathered on shifted data. Each BN module's
input is observed on every calibration batch, with the network normalizing by batch statistics
as in training (so each BN sees the inputs it would see while its statistics are gathered). The
population estimate of the BN paper replaces the moving averages:

    running_mean = mean over batches of the batch means
    running_var  = m / (m - 1) * mean over batches of the (biased) batch variances

where m is the number of elements per channel in one batch. The caller's model is unchanged;
a recalibrated copy, in eval mode, is returned.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bnfold.drift.torch_score import tracked_batch_norms

__all__ = ["recalibrate"]


class _Moments:
    """Running sums of per-channel batch means and biased batch variances, in float64."""

    def __init__(self) -> None:
        self.batches = 0
        self.mean_sum: Tensor | None = None
        self.var_sum: Tensor | None = None
        self.m: int | None = None

    def observe(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        x64 = x.detach().to(torch.float64)
        var, mean = torch.var_mean(x64, dim=dims, correction=0)
        m = x.numel() // x.shape[1]
        if self.m is not None and m != self.m:
            raise ValueError(
                "calibration batches must have equal sizes "
                f"(got {m} and {self.m} elements per channel)"
            )
        self.m = m
        self.mean_sum = mean if self.mean_sum is None else self.mean_sum + mean
        self.var_sum = var if self.var_sum is None else self.var_sum + var
        self.batches += 1

    def population(self) -> tuple[Tensor, Tensor]:
        mean = self.mean_sum / self.batches
        var = self.var_sum / self.batches
        if self.m > 1:
            var = var * self.m / (self.m - 1)
        return mean, var


def recalibrate(
    model: nn.Module, batches: Iterable[Any], *, align_input: bool = False
) -> nn.Module:
    """Return a copy of `model` whose BN running statistics are re-estimated on `batches`
    (each a tensor or a tuple of positional inputs). BNs without running statistics are
    left alone.

    `align_input`: also try a per-channel gain and bias of the first input, fitted to the
    first BN's running statistics (`bnfold.drift.alignment`: it undoes an inverted input,
    which re-estimation alone cannot), and Wiener filters and a learned denoiser for the white
    noise the first BN's variances show (`bnfold.drift.denoising`), each re-estimated behind;
    the repair that moves the later BNs' statistics least is returned, an `InputAligned` or
    `InputDenoised` wrapper when it is one of them. The result's `input_alignment` and
    `input_denoising` attributes say what was fitted, kept or not, and why."""
    if align_input:
        from bnfold.drift.torch_alignment import recalibrate_aligned

        return recalibrate_aligned(model, list(batches), _reestimate)
    return _reestimate(model, batches)


def _reestimate(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    work = copy.deepcopy(model)
    bns = [m for _name, m in tracked_batch_norms(work)]
    if not bns:
        return work.eval()
    moments = {id(m): _Moments() for m in bns}
    handles = [
        m.register_forward_pre_hook(lambda mod, args: moments[id(mod)].observe(args[0]))
        for m in bns
    ]
    work.eval()
    for m in bns:
        m.train()  # batch statistics, as during training; other layers (dropout) stay in eval
    seen = 0
    try:
        with torch.no_grad():
            for batch in batches:
                work(*(batch if isinstance(batch, tuple | list) else (batch,)))
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("recalibrate needs at least one calibration batch")
    for m in bns:
        stats = moments[id(m)]
        if stats.batches == 0:
            continue  # not on the path of these inputs: keep what it had
        mean, var = stats.population()
        for what, value in (("mean", mean), ("variance", var)):
            if not torch.isfinite(value.to(m.running_var.dtype)).all():
                raise ValueError(
                    f"a BatchNorm's re-estimated {what} reaches {value.abs().max().item():.3g}, "
                    f"beyond what {m.running_var.dtype} holds: the calibration inputs are far "
                    "outside the model's range"
                )
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.fill_(stats.batches)
    return work.eval()
