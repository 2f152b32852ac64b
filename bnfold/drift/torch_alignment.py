"""Input alignment for torch modules: ``bnfold.recalibrate(model, batches, align_input=True)``.

The torch counterpart of ``input_alignment`` and ``recalibrate_onnx(align_input=True)``, with
the same numerics (``alignment``): the first BN the forward pass reaches is the site; its input
for the basis inputs is caught by a pre-hook (which stops the pass there); the fits that pass
the affine check and halve the distance become ``InputAligned`` wrappers, and a denoising
filter (``denoising``) an ``InputDenoised`` one, each re-estimated like the plain model; the
repair whose later BNs' statistics moved least is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bnfold.drift.alignment import MAX_CHANNELS, choose_repair, describe, fit_and_check
from bnfold.drift.denoising import Denoiser, fit_denoiser, keep_filter
from bnfold.drift.statistics import statistics_change
from bnfold.drift.torch_score import tracked_batch_norms

__all__ = ["InputAligned", "InputDenoised", "recalibrate_aligned"]


class InputAligned(nn.Module):
    """``model(gain * x + bias, *rest)``: the input map in front of the model (per channel of
    the first input). ``input_alignment`` is the report of the fit that made it."""

    def __init__(self, model: nn.Module, gain: np.ndarray, bias: np.ndarray, report: dict):
        super().__init__()
        self.model = model
        self.register_buffer("gain", torch.as_tensor(gain))
        self.register_buffer("bias", torch.as_tensor(bias))
        self.input_alignment = report

    def forward(self, x: Tensor, *rest: Any, **kwargs: Any) -> Any:
        return self.model(x * self.gain + self.bias, *rest, **kwargs)


class InputDenoised(nn.Module):
    """``model(filter(x), *rest)``: a denoising filter (``denoising``) in front of the model,
    its convs padded by reflection, as ``input_alignment`` puts it in front of an ONNX graph."""

    def __init__(self, model: nn.Module, found: Denoiser):
        super().__init__()
        self.model = model
        for i, (weight, bias) in enumerate(found.layers):
            self.register_buffer(f"weight{i}", torch.as_tensor(weight, dtype=torch.float32))
            self.register_buffer(f"bias{i}", torch.as_tensor(bias, dtype=torch.float32))
        self.layers = len(found.layers)
        self.residual = found.residual

    def forward(self, x: Tensor, *rest: Any, **kwargs: Any) -> Any:
        y = x
        for i in range(self.layers):
            weight, bias = getattr(self, f"weight{i}"), getattr(self, f"bias{i}")
            padded = nn.functional.pad(y, (weight.shape[-1] // 2,) * 4, mode="reflect")
            y = nn.functional.conv2d(padded, weight, bias, groups=y.shape[1] // weight.shape[1])
            if i < self.layers - 1:
                y = torch.relu(y)
        return self.model(x + y if self.residual else y, *rest, **kwargs)


class _Reached(Exception):
    """Raised by the pre-hook: the pass has what it came for."""


def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for _name, m in tracked_batch_norms(model)]


def _as_args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)


def _first_bn(model: nn.Module, args: tuple) -> nn.Module | None:
    reached: list[nn.Module] = []

    def hook(module, _args):
        reached.append(module)
        raise _Reached

    handles = [m.register_forward_pre_hook(hook) for m in _bns(model)]
    try:
        with torch.no_grad():
            model.eval()(*args)
    except _Reached:
        pass
    finally:
        for h in handles:
            h.remove()
    return reached[0] if reached else None


def _site_run(model: nn.Module, bn: nn.Module, rest: tuple) -> Callable[[np.ndarray], np.ndarray]:
    """run(x) -> the BN's input [N, K, L] for first input x (the other inputs as given)."""

    def run(x: np.ndarray) -> np.ndarray:
        seen: list[Tensor] = []

        def hook(_module, args):
            seen.append(args[0])
            raise _Reached

        handle = bn.register_forward_pre_hook(hook)
        try:
            with torch.no_grad():
                model.eval()(torch.from_numpy(x), *rest)
        except _Reached:
            pass
        finally:
            handle.remove()
        y = seen[0].detach().to(torch.float32).numpy()
        return y.reshape(y.shape[0], y.shape[1], -1)

    return run


def recalibrate_aligned(
    model: nn.Module, batches: Sequence[Any], recalibrate: Callable
) -> nn.Module:
    """``recalibrate(model, batches)``, or behind a fitted input map or denoising filter when
    that moves the later BNs' statistics less; the returned module's ``input_alignment`` and
    ``input_denoising`` say which and why."""
    plain = recalibrate(model, batches)
    args = _as_args(batches[0]) if batches else ()
    x0 = args[0] if args else None
    report: dict[str, Any] = {"applied": False, "site": None}
    denoise_report: dict[str, Any] = {"applied": False, "site": None}
    bn = _first_bn(model, args) if torch.is_tensor(x0) and x0.dim() >= 2 else None
    if bn is None:
        report["reason"] = "no BatchNorm with running statistics reached by a [N, C, ...] input"
    elif x0.shape[1] > MAX_CHANNELS:
        report["reason"] = f"the input has {x0.shape[1]} channels; a repair in front fits <= 16"
    if bn is None or x0.shape[1] > MAX_CHANNELS:
        denoise_report["reason"] = report["reason"]
        plain.input_alignment, plain.input_denoising = report, denoise_report
        return plain
    site = next(name for name, m in model.named_modules() if m is bn)
    report["site"] = denoise_report["site"] = site
    run = _site_run(model, bn, args[1:])
    running_var = bn.running_var.double().numpy()
    kept, rejected = fit_and_check(
        run, _samples(batches), bn.running_mean.double().numpy(), running_var, float(bn.eps), site
    )
    filters, denoise_report["reason"] = fit_denoiser(run, _samples(batches), running_var)
    chosen, change, what = plain, None, "re-estimation alone"
    if kept or filters:
        change = _change(model, plain)
    if not kept:
        report["reason"] = "; ".join(rejected) + ": not applied"
    else:
        best = kept[0]
        report.update(applied=True, **best.to_dict())
        report["reason"] = describe(site, best)
        shape = (1, -1) + (1,) * (x0.dim() - 2)
        trials = [
            recalibrate(
                InputAligned(
                    model,
                    fit.gain.reshape(shape).astype(np.float32),
                    fit.bias.reshape(shape).astype(np.float32),
                    report,
                ),
                batches,
            )
            for fit in kept
        ]
        changes = [_change(model, t.model) for t in trials]
        index = choose_repair(report, change, list(zip(changes, kept, strict=True)))
        if index is not None:
            chosen, change, what = trials[index], changes[index], "the input map"
    if filters:
        trials = [recalibrate(InputDenoised(model, f), batches) for f in filters]
        changes = [_change(model, t.model) for t in trials]
        index = keep_filter(denoise_report, filters, changes, change, what, report)
        if index is not None:
            chosen = trials[index]
    chosen.input_alignment, chosen.input_denoising = report, denoise_report
    return chosen


def _samples(batches: Sequence[Any]):
    return (_as_args(b)[0].detach().cpu().numpy() for b in batches)


def _change(before: nn.Module, after: nn.Module) -> float:
    """``statistics.statistics_change`` over the BNs in module order."""
    return statistics_change(
        [
            (
                a.running_mean.double().numpy(),
                a.running_var.double().numpy(),
                b.running_mean.double().numpy(),
                b.running_var.double().numpy(),
                float(a.eps),
            )
            for a, b in zip(_bns(before), _bns(after), strict=True)
        ]
    )
