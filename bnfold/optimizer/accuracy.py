"""A candidate's outputs against the eval-mode original's, on the same inputs.

Arrays only: relative L2 over all outputs, mean per-sample cosine, top-1 agreement on outputs
that look like class scores ([N, classes], classes > 1), and accuracy against labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["compare"]


def _is_scores(y: np.ndarray) -> bool:
    return y.ndim == 2 and y.shape[1] > 1


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: np.ndarray | None = None,
) -> dict:
    """Metrics of `candidate` (outputs concatenated over the batch) against `reference`.

    Top-1 and label accuracy use the first output; relative L2 and cosine use all of them.
    """
    ref = [np.asarray(r, np.float64) for r in reference]
    out = [np.asarray(c, np.float64) for c in candidate]
    err = sum(float(np.sum((c - r) ** 2)) for c, r in zip(out, ref, strict=True))
    norm = sum(float(np.sum(r**2)) for r in ref)
    rel_l2 = float(np.sqrt(err / norm)) if norm > 0 else float(np.sqrt(err))
    flat_r = np.concatenate([r.reshape(len(r), -1) for r in ref], axis=1)
    flat_c = np.concatenate([c.reshape(len(c), -1) for c in out], axis=1)
    denom = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_c, axis=1)
    cosine = float(np.mean(np.sum(flat_r * flat_c, axis=1) / np.maximum(denom, 1e-30)))
    result = {
        "samples": int(len(ref[0])),
        "rel_l2": rel_l2,
        "cosine": cosine,
        "max_abs_err": max(float(np.max(np.abs(c - r))) for c, r in zip(out, ref, strict=True)),
        "top1_agreement": None,
    }
    if _is_scores(ref[0]):
        result["top1_agreement"] = float(np.mean(ref[0].argmax(1) == out[0].argmax(1)))
        if labels is not None:
            labels = np.asarray(labels).reshape(-1)
            ref_acc = float(np.mean(ref[0].argmax(1) == labels))
            acc = float(np.mean(out[0].argmax(1) == labels))
            result.update(
                reference_accuracy=ref_acc,
                accuracy=acc,
                accuracy_drop_points=100.0 * (ref_acc - acc),
            )
    return result
