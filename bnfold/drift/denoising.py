"""Input denoising: the noise level the first BN says was added, and the filter that undoes most
of it.

Additive white noise of variance s2 on every input value adds, in channel k of the first BN's
input, s2 * g_k to the variance (g_k: the sum of the squared weights of the path from the
input to that channel, averaged over positions, zero-padded borders included), and nothing to
the mean. Re-estimating the statistics (AdaBN) rescales the noisier features but keeps the
noise (digits CNN, noise of std 0.2: 89.6% -> 91.6%, against 98.9% clean). The first BN's
running statistics say what the variances were in training, so

    observed_var_k - running_var_k = s2 * g_k      (least squares over k)

gives s2 with no labels, and how well that fits (the residual) says whether the shift *is*
additive white noise. When it is, the input is filtered with the linear minimum-mean-square
error (Wiener) filter of each value from its size x size neighbourhood over all channels:
with S_y the covariance of the shifted input's patches and S_x = S_y - s2 I (clipped to be
positive semi-definite: the clean patches' covariance), the filtered value is
mu + (S_x (S_x + s2 I)^-1)[centre] (patch - mu). That filter minimizes the error of the
pixels, not of what the network makes of them: it also smooths the edges the network was
trained on, so it is built at ``STRENGTHS`` fractions of the estimated s2 (s2 itself and
less). A linear filter keeps most of the harm (digits: 92.3-93.9%), so a small non-linear
denoiser learned from the noisy samples and s2 alone joins them (``learned_denoising``:
95-96%). The statistics are re-estimated behind each, and ``recalibrate_onnx`` keeps the one
whose later BNs' statistics moved least, when that beats the other repairs (measured: it does
on noise, not on the other shifts; docs/BENCHMARKS.md "Drift").

This module is the math only: ``run(x) -> [N, K, L]`` (the first BN's input for the input x)
comes from the caller, as in ``alignment``; ``input_alignment`` (ONNX: Pad and Conv in front)
and ``torch_alignment`` (a wrapping module) apply the filter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bnfold.drift.learned_denoising import train_denoiser

__all__ = [
    "Denoiser",
    "NoiseFit",
    "WienerFilter",
    "fit_denoiser",
    "fit_noise",
    "keep_filter",
    "wiener_filter",
]

SIZE = 3  # the filter's neighbourhood (measured: 5 and 7 no better on the digits, 3 cheapest)
MIN_GROWTH = 0.1  # the noise must add at least this fraction to the first BN's variance
MAX_RESIDUAL = 0.25  # and explain its change to within this (RMS, relative)
STRENGTHS = (1.0, 0.7, 0.5)  # fractions of the estimated noise variance the filters assume
MAX_SAMPLES = 256
MAX_PATCHES = 1 << 16

Run = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class NoiseFit:
    sigma2: float  # the noise variance per input value
    growth: float  # s2 * mean(g) / mean(running_var): what the noise adds to the variance
    residual: float  # RMS of what s2 * g leaves of the variance change, relative to the change

    def to_dict(self) -> dict:
        return {
            "noise_std": float(np.sqrt(max(self.sigma2, 0.0))),
            "variance_growth": self.growth,
            "fit_residual": self.residual,
        }


class Denoiser(Protocol):
    """What goes in front: reflect-padded convs (``layers``: weight [O, I / groups, k, k], bias
    [O]; groups = the channels coming in / I), ReLU between them, the input added back when
    ``residual``."""

    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    residual: bool

    @property
    def label(self) -> str: ...

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class WienerFilter:
    weight: np.ndarray  # [C, C, size, size]: output channel, input channel, kernel
    bias: np.ndarray  # [C]
    noise: NoiseFit
    strength: float  # the fraction of the noise variance the filter assumes
    residual: bool = False

    @property
    def size(self) -> int:
        return int(self.weight.shape[-1])

    @property
    def layers(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        return ((self.weight, self.bias),)

    @property
    def label(self) -> str:
        return f"wiener {self.strength}"

    def to_dict(self) -> dict:
        return {
            **self.noise.to_dict(),
            "filter": "wiener",
            "filter_size": self.size,
            "strength": self.strength,
            "macs_per_pixel": int(self.weight.size),
        }


def fit_noise(observed_var: np.ndarray, running_var: np.ndarray, gain: np.ndarray) -> NoiseFit:
    """s2 from ``observed_var - running_var = s2 * gain`` (per channel, least squares)."""
    change = np.asarray(observed_var, np.float64) - np.asarray(running_var, np.float64)
    gain = np.asarray(gain, np.float64)
    sigma2 = float(change @ gain / max(float(gain @ gain), 1e-300))
    left = change - sigma2 * gain
    residual = float(np.sqrt(np.mean(left**2)) / (np.sqrt(np.mean(change**2)) + 1e-300))
    growth = sigma2 * float(np.mean(gain)) / max(float(np.mean(running_var)), 1e-300)
    return NoiseFit(sigma2, growth, residual)


def _noise_gain(run: Run, like: np.ndarray) -> np.ndarray:
    """g_k: the variance that unit white noise on the input adds in channel k."""
    z = np.random.default_rng(0).standard_normal(like.shape).astype(like.dtype)
    response = (run(z) - run(np.zeros_like(like))).astype(np.float64)  # [N, K, L]
    return np.mean(response**2, axis=(0, 2))


def _variance(run: Run, samples: list[np.ndarray]) -> np.ndarray:
    """The per-channel variance of the first BN's input over every sample and position."""
    count, total, squares = 0, 0.0, 0.0
    for x in samples:
        y = run(x).astype(np.float64)
        count += y.shape[0] * y.shape[2]
        total = total + y.sum(axis=(0, 2))
        squares = squares + (y**2).sum(axis=(0, 2))
    mean = total / count
    return squares / count - mean**2


def _patches(x: np.ndarray, size: int) -> np.ndarray:
    """[N * H * W, C * size * size]: every value's neighbourhood, borders reflected."""
    r = size // 2
    padded = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(2, 3))
    n, c, h, w = x.shape
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * size * size)


def wiener_filter(samples: np.ndarray, sigma2: float, size: int = SIZE) -> tuple:
    """(weight [C, C, size, size], bias [C]) of the Wiener filter for noise of variance sigma2
    on the inputs `samples` [N, C, H, W]."""
    patches = _patches(samples.astype(np.float64), size)
    if len(patches) > MAX_PATCHES:
        keep = np.random.default_rng(0).choice(len(patches), MAX_PATCHES, replace=False)
        patches = patches[np.sort(keep)]
    mu = patches.mean(axis=0)
    cov_y = np.cov(patches, rowvar=False)
    dims = len(mu)
    values, vectors = np.linalg.eigh(cov_y - sigma2 * np.eye(dims))
    cov_x = (vectors * np.clip(values, 0.0, None)) @ vectors.T
    gain = np.linalg.solve(cov_x + sigma2 * np.eye(dims), cov_x).T  # S_x (S_x + s2 I)^-1
    channels, centre = samples.shape[1], (size * size) // 2
    rows = gain[[c * size * size + centre for c in range(channels)]]  # [C, C * size * size]
    weight = rows.reshape(channels, channels, size, size)
    bias = mu[[c * size * size + centre for c in range(channels)]] - rows @ mu
    return weight, bias


def fit_denoiser(
    run: Run, samples: Iterable[np.ndarray], running_var: np.ndarray
) -> tuple[list[Denoiser], str]:
    """The filters to try (a Wiener filter per ``STRENGTHS`` and the learned denoiser of
    ``learned_denoising``; none when the shift is not additive white noise), and why.
    ``samples``: batches of [N, C, H, W] inputs."""
    batches, seen = [], 0
    for x in samples:
        if seen >= MAX_SAMPLES:
            break
        batches.append(x[: MAX_SAMPLES - seen])
        seen += len(batches[-1])
    if not batches or batches[0].ndim != 4:
        return [], "the input is not an [N, C, H, W] image"
    if min(batches[0].shape[2:]) <= SIZE // 2:
        return [], f"the input is smaller than the {SIZE}x{SIZE} filter"
    noise = fit_noise(_variance(run, batches), running_var, _noise_gain(run, batches[0]))
    figures = (
        f"the first BN's variances changed as white noise of std "
        f"{np.sqrt(max(noise.sigma2, 0.0)):.3g} predicts to within {noise.residual:.2f} and "
        f"grew by {noise.growth:.2f} of the running variance"
    )
    if noise.growth < MIN_GROWTH or noise.residual > MAX_RESIDUAL:
        return [], (
            f"{figures}: not additive noise (needs growth >= {MIN_GROWTH} and fit within "
            f"{MAX_RESIDUAL}), not applied"
        )
    data = np.concatenate(batches)
    filters: list[Denoiser] = [
        WienerFilter(*wiener_filter(data, strength * noise.sigma2), noise, strength)
        for strength in STRENGTHS
    ]
    return [*filters, train_denoiser(data, noise)], figures


def keep_filter(
    report: dict,
    filters: list[Denoiser],
    changes: list[float],
    best: float,
    best_what: str,
    alignment: dict,
) -> int | None:
    """Of the filters (re-estimation behind each moved the statistics ``changes``), the index
    of the one kept, or None when none beats the best other repair (``best``,
    ``best_what``); ``report`` (the denoising's ``to_dict()``) is updated with the figures,
    the chosen filter's and the decision, and ``alignment`` (the input map's report) says it
    was not applied when it was the repair the filter beat."""
    index = min(range(len(changes)), key=changes.__getitem__)
    report.update(filters[index].to_dict())
    report["statistics_change"] = {
        "denoised": changes[index],
        "best_other": best,
        "other": best_what,
        "filters": {f.label: c for f, c in zip(filters, changes, strict=True)},
    }
    kept = changes[index] < best
    report["applied"] = kept
    report["reason"] = (
        f"{report['reason']}; re-estimation behind the {filters[index].label} filter moved "
        f"the statistics {changes[index]:.3g}, against "
        f"{best:.3g} for {best_what}: " + ("applied" if kept else "not applied")
    )
    if kept and alignment.get("applied"):
        alignment["applied"] = False
        alignment["reason"] += "; the denoising filter moved them less: not applied"
    return index if kept else None
