"""Batch buckets: every run at one of a few batch sizes, so that each size keeps its plans.

onnxruntime's CUDA provider re-plans every convolution when a run's batch size differs from the
previous run's, even a size it has seen (41 ms a ResNet-18 run with cuDNN's heuristic search,
211 ms exhaustive, against 0.6-0.7 ms at a steady size on an H100). With buckets, a batch of
``n`` rows is padded up to the smallest bucket ``b >= n`` and run in that bucket's own session
(``bucket_sessions.BucketSession``), which only ever sees ``b`` rows; rows ``n..b`` are dropped
from the outputs before any reply is cut from them.

1. Exactness: the padding rows repeat the batch's last row (a value the model has just seen,
   never a NaN or an out-of-range index that zeros could be) and onnxruntime computes each row
   with the same kernels whatever the other rows hold, so a request's rows are bit-identical
   to running it alone (tested on the CPU provider).
2. The choice (``choose_buckets``) weighs the padding a bucket set wastes, from the run times
   measured while every bucket warms up, against the re-plan that exact sizes would pay.
3. ``batch_buckets`` (the setting, or an upload's field): ``auto`` buckets the models whose
   session re-plans at a new batch size (convolutions on CUDA) and chooses the sizes by rule 2;
   ``off`` never buckets; a list such as ``1,2,4,8`` is used as given, on any provider (the CPU
   tests exercise the GPU's path with it), and caps the batch at its largest size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

AUTO = "auto"
OFF = "off"
IO_BINDING = ("off", "on", "cuda_graph")  # how a bucket's session runs (Settings.io_binding)
# a candidate is dropped when padding its batches to the next kept bucket costs less than this
# fraction of its own run: a GPU runs 1 to 8 images of a ResNet in nearly the time of one
WASTE = 0.05


def parse_spec(spec: str) -> str | tuple[int, ...]:
    """``"auto"``, ``"off"`` or the sizes of ``"1,2,4,8"`` (sorted, unique); ValueError else."""
    text = str(spec).strip().lower()
    if text in (AUTO, OFF):
        return text
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ValueError(
            f"batch_buckets={spec!r}: give auto, off, or batch sizes such as 1,2,4,8"
        ) from None
    if not sizes or sizes[0] < 1 or sizes[-1] > 1 << 16:
        raise ValueError(f"batch_buckets={spec!r}: sizes must be between 1 and 65536")
    return tuple(sizes)


def candidates(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, and ``max_batch`` itself: 1, 2, 4, ..., max."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max(1, max_batch)]


def sizes_for(spec: str | tuple[int, ...], max_batch: int, replans: bool) -> list[int]:
    """The bucket sizes to build and warm for a model (rule 3): [] for no buckets."""
    if spec == OFF or (spec == AUTO and not replans) or max_batch <= 1:
        return []
    if spec == AUTO:
        return candidates(max_batch)
    return [s for s in spec if s <= max_batch] or [min(spec)]


def choose_buckets(run_s: Mapping[int, float], replan_s: float, waste: float = WASTE) -> list[int]:
    """The buckets worth keeping, from the warm-up's measurements (rule 2).

    ``run_s``: the steady run time of each candidate size (``candidates``); ``replan_s``: what a
    run costs beyond that when its batch size differs from the previous run's.

    1. Walking down from the largest candidate (always kept: it bounds the batch), a candidate
       ``b`` is dropped when padding its batches to the next kept bucket ``b'`` costs at most
       ``waste`` of its own run, ``run(b') - run(b) <= waste * run(b)``: each bucket costs a
       session (weights, workspace, and on CUDA a warm-up re-plan) and would save nothing.
    2. A batch of ``n`` rows padded to bucket ``b`` wastes at most ``run(b) - run(p)``, ``p``
       the kept bucket below ``b`` (or 1 for the smallest), since run time grows with rows.
       Exact sizes in one session pay ``replan_s`` instead when the size changes. If the worst
       padding waste is not below ``replan_s``, bucketing cannot win: ``[]`` (the CPU provider,
       whose re-plan is nothing).
    """
    sizes = sorted(run_s)
    if not sizes:
        return []
    kept = [sizes[-1]]
    for b in reversed(sizes[:-1]):
        if run_s[kept[0]] - run_s[b] > waste * run_s[b]:
            kept.insert(0, b)
    below = [sizes[0], *kept[:-1]]
    worst = max(run_s[b] - run_s[p] for b, p in zip(kept, below, strict=True))
    return kept if worst < replan_s else []


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding ``rows`` (``buckets`` sorted); None when none does."""
    return next((b for b in buckets if b >= rows), None)


def pad(parts: Sequence[np.ndarray], bucket: int, out: np.ndarray | None = None) -> np.ndarray:
    """The requests' arrays of one input, concatenated on dim 0 and padded to ``bucket`` rows
    with copies of the last row (case 1), written into ``out`` when given and of the batch's
    shape and dtype (a bucket's staging buffer, bound at the example shapes)."""
    rows = sum(len(p) for p in parts)
    first = parts[0]
    if out is not None and (out.shape[1:] != first.shape[1:] or out.dtype != first.dtype):
        out = None
    if out is None:
        if len(parts) == 1 and rows == bucket:
            return first
        out = np.empty((bucket, *first.shape[1:]), dtype=first.dtype)
    start = 0
    for part in parts:
        out[start : start + len(part)] = part
        start += len(part)
    out[rows:] = out[rows - 1]
    return out


def unpad(outputs: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` rows of every output: what the requests sent, without the padding."""
    return {name: value[:rows] for name, value in outputs.items()}
