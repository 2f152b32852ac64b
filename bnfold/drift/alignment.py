"""Input alignment: the per-channel affine map of the input that the first BN says undoes a shift.

Re-estimating BN statistics (AdaBN) can follow a shift that rescales or moves each channel of a
BN's input, but not one that flips its sign: a fully inverted image (x -> 1 - x) has the same
variances as the original, its means move, and the re-estimated first BN normalizes an inverted
feature map that the layers after it have never seen (digits CNN: 27% -> 14%,
docs/BENCHMARKS.md). The first BN's running statistics say what its input looked like in
training; the map of the input that brings the shifted data's first-BN moments back to them is
found here, with no labels, and put in front of the graph before the statistics are
re-estimated (after Mummadi et al. 2021, who learn an input transformation at test time; here
it is a per-channel gain and bias, fitted in closed form).

When the path from the graph input to the first BN is affine (a Conv, with or without bias, or
input normalization), the first BN's input for the transformed input g*x + h is

    a(g, h) = R + sum_c g_c P_c + sum_c h_c Q_c

with R = f(0), P_c = f(x restricted to channel c) - R and Q_c = f(ones in channel c) - R; so its
per-channel mean is theta . mu_k and its variance theta' S_k theta, with theta = (g, h, 1) and
mu_k, S_k the mean and covariance of the basis (P, Q, R) in channel k. The loss is the drift
score's own distance, squared: per channel ((mean - running_mean)^2 + (std - running_std)^2) /
(running_var + eps), averaged over channels. It is minimized from g = +1 and from g = -1 (the
sign is what re-estimation cannot fix), by Levenberg-Marquardt on the residuals; no graph runs.

This module is the math only: arrays in, fits out, with ``run(x) -> [N, K, L]`` (the first BN's
input for the input x) given by the caller. ``input_alignment`` (ONNX: an onnxruntime session
cut at the site, the map as Mul/Add in front) and ``torch_alignment`` (a hook on the first BN,
the map as a wrapping module) find the site and apply the map.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AffineFit",
    "BasisMoments",
    "alignment_loss",
    "basis_outputs",
    "choose_repair",
    "fit_and_check",
    "fit_input_affine",
    "show",
]

STEPS = 200
MAX_CHANNELS = 16  # input channels fitted; beyond, alignment is skipped
MAX_FIT_SAMPLES = 256
MAX_FIT_VALUES = 1 << 20  # values per channel of the first BN's input: enough batches seen
CHECK_SAMPLES = 4  # the affine model of the path is checked on this many
MIN_IMPROVEMENT = 0.5  # kept when the fitted loss is at most this fraction of the identity's
AFFINE_RTOL = 1e-3


class BasisMoments:
    """Per output channel k: running sums of the basis z = (P_1..P_C, Q_1..Q_C, R), float64."""

    def __init__(self, max_columns: int = 1 << 16) -> None:
        self.count = 0
        self.sum: np.ndarray | None = None  # [K, B]
        self.outer: np.ndarray | None = None  # [K, B, B]
        # a batch's (sample, position) pairs beyond this are subsampled, the same pairs for
        # every basis member: a 224x224 image's first BN sees 12,544 positions per sample
        self.max_columns = max_columns
        self._rng = np.random.default_rng(0)

    def observe(self, basis: np.ndarray) -> None:
        """basis: [B, N, K, L] (basis member, sample, channel, position)."""
        members, n, k, length = basis.shape
        z = np.asarray(basis).transpose(2, 0, 1, 3).reshape(k, members, n * length)
        if n * length > self.max_columns:
            z = z[:, :, np.sort(self._rng.choice(n * length, self.max_columns, replace=False))]
        z = z.astype(np.float64)  # [K, B, columns]
        s, o = z.sum(axis=2), np.einsum("kin,kjn->kij", z, z)
        self.sum = s if self.sum is None else self.sum + s
        self.outer = o if self.outer is None else self.outer + o
        self.count += z.shape[2]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        mu = self.sum / self.count
        cov = self.outer / self.count - np.einsum("ki,kj->kij", mu, mu)
        return mu, cov


@dataclass(frozen=True)
class AffineFit:
    gain: np.ndarray  # [C]
    bias: np.ndarray  # [C]
    loss_identity: float  # the distance with the input as it is (g = 1, h = 0)
    loss: float  # the distance after the fit

    def to_dict(self) -> dict:
        return {
            "gain": [float(v) for v in self.gain],
            "bias": [float(v) for v in self.bias],
            "loss_identity": self.loss_identity,
            "loss": self.loss,
        }


def alignment_loss(
    theta: np.ndarray, mu: np.ndarray, cov: np.ndarray, mean_r: np.ndarray, var_r: np.ndarray
) -> float:
    """The loss at theta (all 2C + 1 entries; var_r already holds eps)."""
    r, _jac = _residuals(theta, mu, cov, mean_r, var_r)
    return float(r @ r) / len(mean_r)


def _starts(channels: int) -> list[np.ndarray]:
    """Gain +1 and -1 on every channel: a negative flips them all. Each start costs the
    caller a re-estimation of the whole graph, so mixed sign patterns are not tried."""
    return [
        np.concatenate([sign * np.ones(channels), np.zeros(channels), [1.0]])
        for sign in (1.0, -1.0)
    ]


def _residuals(theta, mu, cov, mean_r, var_r) -> tuple[np.ndarray, np.ndarray]:
    """r [2K] with loss = |r|^2 / K, and its Jacobian [2K, 2C + 1]."""
    scale = np.sqrt(var_r)
    var = np.maximum(np.einsum("i,kij,j->k", theta, cov, theta), 1e-24)
    std = np.sqrt(var)
    r = np.concatenate([(mu @ theta - mean_r) / scale, (std - scale) / scale])
    jac = np.concatenate([mu / scale[:, None], (cov @ theta) / (std * scale)[:, None]])
    return r, jac


def _levenberg_marquardt(theta, mu, cov, mean_r, var_r) -> tuple[np.ndarray, float]:
    """Least squares on the residuals, the entry that multiplies R held at 1."""
    free = len(theta) - 1
    damping = 1e-3
    r, jac = _residuals(theta, mu, cov, mean_r, var_r)
    cost = float(r @ r)
    for _ in range(STEPS):
        j = jac[:, :free]
        normal = j.T @ j
        step = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-12), -j.T @ r)
        trial = theta.copy()
        trial[:free] += step
        r_new, jac_new = _residuals(trial, mu, cov, mean_r, var_r)
        cost_new = float(r_new @ r_new)
        if cost_new < cost:
            converged = cost - cost_new <= 1e-12 * max(cost, 1e-30)
            theta, r, jac, cost = trial, r_new, jac_new, cost_new
            damping = max(damping / 3, 1e-9)
            if converged:
                break
        else:
            damping *= 4
            if damping > 1e9:
                break
    return theta, alignment_loss(theta, mu, cov, mean_r, var_r)


def fit_input_affine(
    moments: BasisMoments, mean_r: np.ndarray, var_r: np.ndarray, eps: float
) -> list[AffineFit]:
    """The gain and bias per input channel that bring the first BN's moments closest to its
    running statistics (see the module docstring): one fit from gain +1 and one from gain -1,
    best first. Means and variances of one site may not tell the signs apart (an inverted image
    differs from the original in its first BN's moments only through the borders); the caller
    decides between them on the sites after it (``reestimation.statistics_change``)."""
    mu, cov = moments.mean_cov()
    channels = (mu.shape[1] - 1) // 2
    mean_r = np.asarray(mean_r, np.float64).reshape(-1)
    var_r = np.asarray(var_r, np.float64).reshape(-1) + eps
    identity = np.concatenate([np.ones(channels), np.zeros(channels), [1.0]])
    loss_identity = alignment_loss(identity, mu, cov, mean_r, var_r)
    fits = [_levenberg_marquardt(start, mu, cov, mean_r, var_r) for start in _starts(channels)]
    return [
        AffineFit(theta[:channels], theta[channels:-1], loss_identity, loss)
        for theta, loss in sorted(fits, key=lambda fit: fit[1])
    ]


Run = Callable[[np.ndarray], np.ndarray]  # input [N, C, ...] -> the first BN's input [N, K, L]


def basis_outputs(run: Run, x: np.ndarray) -> np.ndarray:
    """[2C + 1, N, K, L]: P_1..P_C, Q_1..Q_C, R for the samples x [N, C, ...]. Q_c (the
    response to channel c set to 1) and R (to 0) are the same for every sample: run on one
    and broadcast: C runs of the N samples and C + 1 of one, not 2C + 1 of N."""
    channels = x.shape[1]
    one = np.zeros_like(x[:1])
    zero = run(one)
    members = []
    for c in range(channels):
        only = np.zeros_like(x)
        only[:, c] = x[:, c]
        members.append(run(only) - zero)
    shape = members[0].shape
    for c in range(channels):
        only = one.copy()
        only[:, c] = 1
        members.append(np.broadcast_to(run(only) - zero, shape))
    return np.stack([*members, np.broadcast_to(zero, shape)])


def show(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def describe(site: str, fit: AffineFit) -> str:
    """What the map ``fit`` does to the first BN ``site``, for a report's reason."""
    return (
        f"{site!r}'s distance from its running statistics {fit.loss_identity:.3g} -> "
        f"{fit.loss:.3g} with the input mapped to {show(fit.gain)} * x + {show(fit.bias)} per "
        "channel"
    )


def fit_and_check(
    run: Run,
    samples: Iterable[np.ndarray],
    mean_r: np.ndarray,
    var_r: np.ndarray,
    eps: float,
    site: str,
) -> tuple[list[AffineFit], list[str]]:
    """The fits worth trying (best first) and why the others are not: each fit's affine model
    of the path is checked against ``run`` itself on the fitted input (a path that is not
    affine, an activation before the BN, is caught here), and kept only when it at least
    halves the distance (``MIN_IMPROVEMENT``)."""
    moments, seen, check = BasisMoments(), 0, None
    for x in samples:
        if moments.count >= MAX_FIT_VALUES or seen >= MAX_FIT_SAMPLES:
            break
        x = x[: MAX_FIT_SAMPLES - seen]
        check = x[:CHECK_SAMPLES] if check is None else check
        moments.observe(basis_outputs(run, x))
        seen += len(x)
    if check is None:
        return [], ["no samples"]
    basis = basis_outputs(run, check).astype(np.float64)
    shape = (1, -1) + (1,) * (check.ndim - 2)
    kept, rejected = [], []
    for fit in fit_input_affine(moments, mean_r, var_r, eps):
        theta = np.concatenate([fit.gain, fit.bias, [1.0]])
        predicted = np.tensordot(theta, basis, axes=1)
        mapped = check * fit.gain.reshape(shape).astype(check.dtype)
        actual = run(mapped + fit.bias.reshape(shape).astype(check.dtype))
        error = float(np.max(np.abs(actual - predicted)) / (np.max(np.abs(predicted)) + 1e-12))
        if error > AFFINE_RTOL:
            rejected.append(
                f"the path from the input to {site!r} is not affine (the map with gain "
                f"{show(fit.gain)} is predicted off by {error:.2g} relative)"
            )
        elif not fit.loss <= MIN_IMPROVEMENT * fit.loss_identity:
            rejected.append(
                f"gain {show(fit.gain)} takes {site!r}'s distance only from "
                f"{fit.loss_identity:.3g} to {fit.loss:.3g}"
            )
        else:
            kept.append(fit)
    return kept, rejected


def choose_repair(
    report: dict, plain_change: float, trials: list[tuple[float, AffineFit]]
) -> int | None:
    """Of re-estimation alone (``plain_change``) and behind each fitted map (``trials``: its
    statistics change and fit), the index of the map kept, or None for re-estimation alone:
    the repair under which the later BNs' statistics moved least. ``report`` (the alignment's
    ``to_dict()``) is updated with the figures and the decision."""
    index = min(range(len(trials)), key=lambda i: trials[i][0])
    change, fit = trials[index]
    report.update(fit.to_dict())
    report["statistics_change"] = {
        "plain": plain_change,
        "aligned": change,
        "candidates": [{"gain": [float(v) for v in f.gain], "change": c} for c, f in trials],
    }
    if not change < plain_change:
        report["applied"] = False
        report["reason"] = (
            f"re-estimation behind the map moved the statistics more ({change:.3g}) than "
            f"without it ({plain_change:.3g}): not applied"
        )
        return None
    report["reason"] = (
        f"{describe(report['site'], fit)}; re-estimation behind it moved the statistics "
        f"{change:.3g}, against {plain_change:.3g} without it: applied"
    )
    return index
