"""drift_score on the digits CNN: real data, clean vs shifted, same numbers as the observer."""

import numpy as np

import bnfold
from bnfold.drift import (
    DEFAULT_THRESHOLD,
    ChannelMoments,
    DriftDetector,
    ObserverSession,
    SiteReference,
    observer_graph,
)


def test_clean_digits_do_not_drift_and_inverted_ones_do(digits_model, digits_split):
    x = digits_split.test_x
    clean = bnfold.drift_score(digits_model, [x[:32]])
    inverted = bnfold.drift_score(digits_model, [1 - x[:32]])
    assert not clean.drifting and clean.score < DEFAULT_THRESHOLD
    assert inverted.drifting and inverted.score > 2 * DEFAULT_THRESHOLD
    assert [s.name for s in clean.sites] == ["features.1", "features.4", "features.8"]
    assert clean.samples == clean.window == 32


def test_drift_score_pools_batches_and_restores_training_mode(digits_model, digits_split):
    x = digits_split.test_x[:32]
    digits_model.train()
    try:
        split = bnfold.drift_score(digits_model, [x[:10], (x[10:],)])
        assert digits_model.training
    finally:
        digits_model.eval()
    whole = bnfold.drift_score(digits_model, [x])
    assert split.samples == 32
    assert abs(split.score - whole.score) < 1e-9


def test_drift_score_equals_the_observer_graph_score(digits_model, digits_split, digits_onnx):
    x = (digits_split.test_x[:32] * 0.5).numpy()
    observer = observer_graph(digits_onnx)
    moments = ObserverSession(observer).moments({"x": x})
    detector = DriftDetector([SiteReference(s.name, s.mean, s.var, s.eps) for s in observer.sites])
    served = detector.score({k: ChannelMoments.of(*v) for k, v in moments.items()}, 32)
    import torch

    library = bnfold.drift_score(digits_model, [torch.from_numpy(x)])
    assert abs(served.score - library.score) < 1e-5
    np.testing.assert_allclose(
        [s.score for s in served.sites], [s.score for s in library.sites], rtol=1e-4
    )
