"""``drift_score(model, batches)``: how far inputs are from a torch model's BN statistics.

Forward pre-hooks on every BN with running statistics gather the moments of its input over all
``batches`` (in float64, the model in eval mode: as it serves), and the detector scores them
against the running statistics: the same numbers the service's monitor reports for a window
of the same samples.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from bnfold.drift.detector import (
    DEFAULT_THRESHOLD,
    DriftDetector,
    DriftResult,
    SiteReference,
)
from bnfold.drift.statistics import ChannelMoments

__all__ = ["drift_score", "references_of", "tracked_batch_norms"]


def tracked_batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of each BN with running statistics, in module order."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def references_of(model: nn.Module) -> list[SiteReference]:
    """Each BN's running statistics, by module name."""
    return [
        SiteReference(
            name,
            m.running_mean.detach().to(torch.float64).numpy().copy(),
            m.running_var.detach().to(torch.float64).numpy().copy(),
            float(m.eps),
        )
        for name, m in tracked_batch_norms(model)
    ]


def drift_score(
    model: nn.Module, batches: Iterable[Any], threshold: float = DEFAULT_THRESHOLD
) -> DriftResult:
    """Score the inputs in ``batches`` (tensors, or tuples of positional inputs) as one window
    against ``model``'s BN running statistics. The model is run in eval mode and left as it was."""
    bns = tracked_batch_norms(model)
    detector = DriftDetector(references_of(model), threshold)
    seen: dict[str, ChannelMoments] = {}

    def hook(name: str):
        def observe(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().to(torch.float64)
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dim=dims, correction=0)
            part = ChannelMoments.of(mean.numpy(), var.numpy(), x.numel() // x.shape[1])
            seen[name] = part if name not in seen else seen[name] + part

        return observe

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in bns]
    was_training = model.training
    samples = 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                args = batch if isinstance(batch, tuple | list) else (batch,)
                model(*args)
                samples += int(args[0].shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    result = detector.score(seen, samples)
    # a window is as long as what was given: "drifting" means above threshold
    return DriftResult(
        result.score,
        result.threshold,
        result.score > result.threshold,
        samples,
        samples,
        result.sites,
    )
