"""Per-channel moments and the drift score, as pure functions of arrays (float64).

A BatchNorm's running statistics describe a Gaussian per channel, N(mu_r, var_r). A window of
live inputs gives another, N(mu_w, var_w), pooled over samples and positions. The 2-Wasserstein
distance between two 1-D Gaussians has a closed form,

    W2 = sqrt((mu_w - mu_r)^2 + (sigma_w - sigma_r)^2),

and divided by the running standard deviation sqrt(var_r + eps) it is unitless: 0 for the
training distribution, 1 when the window's mean moved by one training standard deviation. A
site's score is that distance averaged over its channels; a model's score is the median over
its sites, so one site with an odd channel cannot decide alone.

Windows are combined from per-request moments with Chan et al.'s parallel update (count, mean,
sum of squared deviations), so no request's activations are kept.

BN re-estimation uses the population estimate of the BN paper, as ``bnfold.recalibrate`` does:
the mean of the batch means, and the mean of the batch variances made unbiased by m / (m - 1),
m being the values per channel in one batch (per batch, so unequal batches are allowed; with
equal batches it is exactly the BN paper's formula). How far a re-estimation moved the
statistics (``statistics_change``, which input alignment decides by) is the same W2 distance,
from the old running statistics to the new.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ChannelMoments",
    "population_statistics",
    "robust_mean",
    "site_score",
    "statistics_change",
    "w2_standardized",
]


@dataclass(frozen=True)
class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations (M2) of some values, float64."""

    count: int
    mean: np.ndarray  # [C]
    m2: np.ndarray  # [C]

    @classmethod
    def of(cls, mean: np.ndarray, var: np.ndarray, count: int) -> ChannelMoments:
        """From a batch's mean and biased variance over ``count`` values per channel."""
        mean = np.asarray(mean, np.float64).reshape(-1)
        return cls(int(count), mean, np.asarray(var, np.float64).reshape(-1) * count)

    @classmethod
    def of_values(cls, x: np.ndarray) -> ChannelMoments:
        """From raw values [N, C, ...]: channels on axis 1."""
        x = np.asarray(x, np.float64)
        x = x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 0, 2).reshape(x.shape[1], -1)
        mean = x.mean(axis=1)
        return cls(x.shape[1], mean, ((x - mean[:, None]) ** 2).sum(axis=1))

    @property
    def var(self) -> np.ndarray:
        """Biased (population) variance of everything seen."""
        return self.m2 / max(self.count, 1)

    def __add__(self, other: ChannelMoments) -> ChannelMoments:
        if self.mean.shape != other.mean.shape:
            raise ValueError(f"channel counts differ: {self.mean.shape} and {other.mean.shape}")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return ChannelMoments(n, mean, m2)

    @staticmethod
    def pool(parts: Iterable[ChannelMoments]) -> ChannelMoments | None:
        total = None
        for part in parts:
            total = part if total is None else total + part
        return total


def w2_standardized(
    mean_w: np.ndarray, var_w: np.ndarray, mean_r: np.ndarray, var_r: np.ndarray, eps: float
) -> np.ndarray:
    """Per channel: W2(N(mean_w, var_w), N(mean_r, var_r)) / sqrt(var_r + eps)."""
    mean_w, var_w = np.asarray(mean_w, np.float64), np.asarray(var_w, np.float64)
    mean_r, var_r = np.asarray(mean_r, np.float64), np.asarray(var_r, np.float64)
    sigma_w = np.sqrt(np.maximum(var_w, 0.0))
    sigma_r = np.sqrt(np.maximum(var_r, 0.0))
    w2 = np.sqrt((mean_w - mean_r) ** 2 + (sigma_w - sigma_r) ** 2)
    return w2 / np.sqrt(np.maximum(var_r, 0.0) + eps)


def site_score(window: ChannelMoments, mean_r: np.ndarray, var_r: np.ndarray, eps: float) -> float:
    """One BN site: the standardized W2 distance averaged over channels."""
    return float(np.mean(w2_standardized(window.mean, window.var, mean_r, var_r, eps)))


def robust_mean(scores: Sequence[float]) -> float:
    """The model's score from its sites' scores: the median (0 with no sites)."""
    return float(np.median(np.asarray(scores, np.float64))) if len(scores) else 0.0


def population_statistics(
    batch_means: Sequence[np.ndarray], batch_vars: Sequence[np.ndarray], counts: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(running_mean, running_var) from per-batch means, biased variances and values per
    channel: mean of batch means; mean of batch variances each unbiased by m / (m - 1)."""
    if not batch_means:
        raise ValueError("the population estimate needs at least one batch")
    if min(counts) < 2:
        raise ValueError(
            f"a batch with {min(counts)} value per channel has no variance: use batches of at "
            "least 2 samples"
        )
    means = np.stack([np.asarray(m, np.float64).reshape(-1) for m in batch_means])
    variances = np.stack(
        [
            np.asarray(v, np.float64).reshape(-1) * (m / (m - 1))
            for v, m in zip(batch_vars, counts, strict=True)
        ]
    )
    return means.mean(axis=0), variances.mean(axis=0)


def statistics_change(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]],
) -> float:
    """How far a re-estimation moved the BN statistics: per site (old mean, old var, new mean,
    new var, eps) the standardized W2 distance from old to new averaged over channels, then
    averaged over the sites after the first (over all of them with one site)."""
    pairs = list(pairs)[1:] or list(pairs)
    return float(
        np.mean([np.mean(w2_standardized(mn, vn, mo, vo, eps)) for mo, vo, mn, vn, eps in pairs])
    )
