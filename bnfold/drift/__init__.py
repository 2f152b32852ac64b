"""BN statistics as a covariate-shift monitor, and BN re-estimation on ONNX graphs.

- ``statistics``: per-channel moments, the standardized W2 score, the population estimate
- ``detector``: ``DriftDetector`` fitted on running statistics -> ``DriftResult``
- ``observer``: the ONNX observer graph exposing each BatchNormalization input's moments
- ``reestimation``: ``recalibrate_onnx``, new statistics written into the BN nodes
- ``alignment``: the input map fitted to the first BN's statistics (the math), applied by
  ``input_alignment`` (ONNX) and ``torch_alignment`` (``bnfold.recalibrate(align_input=True)``)
- ``torch_score``: ``drift_score(model, batches)`` for torch models (imports torch)

Nothing here knows of HTTP; the service's monitor (``service/drift/``) uses these.
"""

from importlib import import_module

from bnfold.drift.detector import (
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    DriftDetector,
    DriftResult,
    SiteReference,
)
from bnfold.drift.statistics import ChannelMoments

_LAZY = {
    "drift_score": "bnfold.drift.torch_score",
    "observer_graph": "bnfold.drift.observer",
    "ObserverSession": "bnfold.drift.observer",
    "recalibrate_onnx": "bnfold.drift.reestimation",
}

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_WINDOW",
    "ChannelMoments",
    "DriftDetector",
    "DriftResult",
    "SiteReference",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold.drift' has no attribute {name!r}")
