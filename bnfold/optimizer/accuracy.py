"""A candidate's outputs against the eval-mode original's, on the same inputs.

Arrays only: relative L2 over all outputs, mean per-sample cosine, top-1 agreement on outputs
that look like class scores ([N, classes], classes > 1), and accuracy against labels.

Top-1 agreement is only as telling as the reference's top-1 is varied: a trained ImageNet
network gives one class for 63 of 64 Gaussian-noise images, and there a candidate that always
answers that class agrees on 98% of them. `logit_stats` says how varied the reference is;
`compare` reports the share of its most common class, which `Budget.check` reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["class_indices", "compare", "flipped_gaps", "logit_stats"]


def _is_scores(y: np.ndarray) -> bool:
    return y.ndim == 2 and y.shape[1] > 1


def class_indices(labels, classes: int | None, what: str = "labels") -> np.ndarray:
    """`labels` as int64 class indices; a ValueError naming `what` unless they are a 1-D
    integer array of values in 0..classes-1 (>= 0 where `classes` is None)."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(
            f"{what} must be a 1-D array of class indices, got {array.dtype} {array.shape}"
        )
    # checked before the cast: a uint64 past int64's range would wrap to a negative index
    if array.size and (array.min() < 0 or (classes is not None and array.max() >= classes)):
        within = ">= 0" if classes is None else f"0..{classes - 1} (the model scores {classes})"
        raise ValueError(
            f"{what} must be class indices {within}, got values from {array.min()} to {array.max()}"
        )
    return array.astype(np.int64)


def logit_stats(scores: np.ndarray) -> dict:
    """How much class scores [N, classes] depend on the input: the number of distinct top-1
    classes, the share of the most common one, the median gap between the two best scores
    (a top-1 flips only where an error exceeds it), and the scores' spread across inputs
    against their size (near 0 for an output that ignores its input)."""
    scores = np.asarray(scores, np.float64)
    top1 = scores.argmax(1)
    top = np.sort(scores, axis=1)
    return {
        "top1_classes": int(len(np.unique(top1))),
        "top1_majority": float(np.bincount(top1).max() / len(top1)),
        "top2_gap_median": float(np.median(top[:, -1] - top[:, -2])),
        "logit_rms": float(np.sqrt(np.mean(scores**2))),
        "across_input_std_rms": float(np.sqrt(np.mean(scores.var(axis=0)))),
    }


def flipped_gaps(reference: np.ndarray, candidate: np.ndarray) -> list[float]:
    """The reference's gaps between its two best scores on the inputs where the candidate's
    top-1 differs, ascending: a top-1 flips only where the error exceeds that gap."""
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate)
    top = np.sort(reference, axis=1)
    gaps = top[:, -1] - top[:, -2]
    return sorted(float(g) for g in gaps[reference.argmax(1) != candidate.argmax(1)])


def compare(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    labels: np.ndarray | None = None,
) -> dict:
    """Metrics of `candidate` (outputs concatenated over the batch) against `reference`.

    Top-1 and label accuracy use the first output; relative L2 and cosine use all of them.
    `reference_top1_majority`: the share of inputs on which the reference gives its most
    common class, the agreement a constant answer would reach.
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
        stats = logit_stats(ref[0])
        result["reference_top1_classes"] = stats["top1_classes"]
        result["reference_top1_majority"] = stats["top1_majority"]
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
