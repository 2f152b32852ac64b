"""DriftDetector: a value object out, drifting only over a full window above the threshold."""

import numpy as np
import pytest

from bnfold.drift import ChannelMoments, DriftDetector, SiteReference


def _detector(threshold=0.5, window=8):
    refs = [SiteReference(f"bn{i}", np.zeros(3), np.ones(3), 1e-5) for i in range(3)]
    return DriftDetector(refs, threshold, window)


def _moments(shift):
    return ChannelMoments.of(np.full(3, shift), np.ones(3), 16)


def test_detector_scores_the_median_site_and_names_every_site():
    detector = _detector()
    result = detector.score({"bn0": _moments(0.0), "bn1": _moments(1.0), "bn2": _moments(9.0)}, 8)
    assert result.score == pytest.approx(1.0, rel=1e-4)
    assert result.drifting
    assert [s.name for s in result.sites] == ["bn0", "bn1", "bn2"]
    d = result.to_dict()
    assert set(d) == {"score", "threshold", "drifting", "samples", "window", "sites"}
    assert d["sites"][2] == {"name": "bn2", "score": pytest.approx(9.0, rel=1e-4)}


def test_detector_does_not_call_drift_before_the_window_is_full():
    result = _detector(window=32).score({f"bn{i}": _moments(2.0) for i in range(3)}, 31)
    assert result.score > result.threshold
    assert not result.drifting


def test_detector_without_samples_scores_zero():
    result = _detector().score({}, 0)
    assert result.score == 0.0 and not result.drifting and result.samples == 0


def test_detector_needs_a_site():
    with pytest.raises(ValueError, match="no BatchNorm"):
        DriftDetector([])
