"""The drift detector: fitted on a model's BN running statistics, scores windows of inputs.

It knows nothing of where the windows come from (torch hooks, an ONNX observer session, a
service's sampled requests): it takes per-site ``ChannelMoments`` and returns a ``DriftResult``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from bnfold.drift.statistics import ChannelMoments, robust_mean, site_score

__all__ = ["DEFAULT_THRESHOLD", "DEFAULT_WINDOW", "DriftDetector", "DriftResult", "SiteReference"]

# measured on the digits CNN (bench/drift.py, docs/BENCHMARKS.md "Drift"): 300 windows of 32
# clean held-out digits score median 0.027, at most 0.049; every shift that cost the model more
# than 2 points of accuracy scored 0.16 or more. 0.1 is twice the clean maximum. 32 samples are
# what Schneider et al. (2020) found enough to re-estimate BN statistics, and what a window
# needs for the clean scores to stay that tight.
DEFAULT_WINDOW = 32
DEFAULT_THRESHOLD = 0.1


@dataclass(frozen=True)
class SiteReference:
    """One BN site's training statistics."""

    name: str
    mean: np.ndarray  # running mean [C]
    var: np.ndarray  # running variance [C]
    eps: float


@dataclass(frozen=True)
class SiteScore:
    name: str
    score: float


@dataclass(frozen=True)
class DriftResult:
    score: float  # median over sites of each site's channel-averaged standardized W2
    threshold: float
    drifting: bool  # score > threshold over a full window
    samples: int  # samples in the window scored
    window: int  # samples a full window holds
    sites: tuple[SiteScore, ...]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["sites"] = [asdict(s) for s in self.sites]
        return out


class DriftDetector:
    def __init__(
        self,
        references: list[SiteReference],
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if not references:
            raise ValueError("no BatchNorm site with running statistics to compare with")
        self.references = references
        self.threshold = float(threshold)
        self.window = int(window)

    @property
    def site_names(self) -> list[str]:
        return [r.name for r in self.references]

    def score(self, moments: Mapping[str, ChannelMoments], samples: int) -> DriftResult:
        """Score a window: ``moments`` by site name (sites it lacks score 0 and are left out
        of the median); ``samples`` is how many samples the moments pooled."""
        sites, scored = [], []
        for ref in self.references:
            window = moments.get(ref.name)
            value = 0.0 if window is None else site_score(window, ref.mean, ref.var, ref.eps)
            sites.append(SiteScore(ref.name, value))
            if window is not None:
                scored.append(value)
        score = robust_mean(scored)
        drifting = samples >= self.window and score > self.threshold
        return DriftResult(score, self.threshold, drifting, samples, self.window, tuple(sites))
