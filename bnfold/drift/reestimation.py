"""BN re-estimation on an ONNX graph: new running statistics from unlabeled batches.

The ONNX counterpart of ``bnfold.recalibrate``, with the same numerics: every calibration
batch runs through the observer graph in its batch-statistics form (each BN normalizes by its
batch's own moments, as a torch BN in train mode does), the per-batch moments of each BN's
input are gathered, and the population estimate (``statistics.population_statistics``)
replaces the statistics in the original graph's BatchNormalization nodes. The caller's graph is
unchanged; a rewritten copy is returned, to be folded and verified like any upload.

A statistics initializer that something else also reads is not overwritten: the BN gets a new
initializer of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.drift.alignment import choose_repair
from bnfold.drift.denoising import keep_filter
from bnfold.drift.observer import ObserverSession, bn_sites, observer_graph
from bnfold.drift.statistics import population_statistics
from bnfold.drift.statistics import statistics_change as moved_statistics

__all__ = ["OnnxRecalibration", "recalibrate_onnx", "statistics_change"]


@dataclass
class OnnxRecalibration:
    model: onnx.ModelProto  # the original with re-estimated statistics
    batches: int
    samples: int
    sites: list[dict[str, Any]] = field(default_factory=list)  # per BN: what changed
    skipped: list[dict[str, str]] = field(default_factory=list)
    input_alignment: dict[str, Any] | None = None  # when asked for: applied or not, and why
    input_denoising: dict[str, Any] | None = None  # the same, for the denoising filter

    def report(self) -> dict[str, Any]:
        out = {
            "batches": self.batches,
            "samples": self.samples,
            "sites": self.sites,
            "skipped": self.skipped,
        }
        if self.input_alignment is not None:
            out["input_alignment"] = self.input_alignment
        if self.input_denoising is not None:
            out["input_denoising"] = self.input_denoising
        return out


def recalibrate_onnx(
    model: onnx.ModelProto,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    align_input: bool = False,
) -> OnnxRecalibration:
    """Re-estimate every BN site's running statistics on ``batches`` (feed dicts).

    ``align_input``: also try two repairs in front of the graph, each re-estimated behind: the
    input's per-channel gain and bias fitted to the first BN's running statistics
    (``input_alignment``; it undoes what re-estimation cannot, such as an inverted input), and
    Wiener filters and a learned denoiser for the white noise the first BN's variances show
    (``denoising``). Of the re-estimations the one whose statistics moved least from the
    running statistics (``statistics_change``, over the sites after the first) is kept: the
    repair under which the data looks most like the training data to the network. The report
    says which, with the figures (``input_alignment``, ``input_denoising``)."""
    if not align_input:
        return _reestimate(model, batches)
    from bnfold.drift.input_alignment import align_input_onnx, denoise_input_onnx

    batches = list(batches)
    alignment = align_input_onnx(model, batches)
    denoising = denoise_input_onnx(model, batches)
    plain = _reestimate(model, batches)
    report, denoise_report = alignment.to_dict(), denoising.to_dict()
    chosen, change, what = plain, None, "re-estimation alone"
    if alignment.applied or denoising.applied:
        change = statistics_change(model, plain.model)
    if alignment.applied:
        trials = [_reestimate(c.model, batches) for c in alignment.candidates]
        changes = [statistics_change(model, t.model) for t in trials]
        fits = [c.fit for c in alignment.candidates]
        index = choose_repair(report, change, list(zip(changes, fits, strict=True)))
        if index is not None:
            chosen, change, what = trials[index], changes[index], "the input map"
    if denoising.applied:
        trials = [_reestimate(m, batches) for m, _f in denoising.candidates]
        changes = [statistics_change(model, t.model) for t in trials]
        filters = [f for _m, f in denoising.candidates]
        index = keep_filter(denoise_report, filters, changes, change, what, report)
        if index is not None:
            chosen = trials[index]
    chosen.input_alignment, chosen.input_denoising = report, denoise_report
    return chosen


def statistics_change(before: onnx.ModelProto, after: onnx.ModelProto) -> float:
    """How far re-estimation moved the statistics (``statistics.statistics_change``); the
    sites are matched in graph order."""
    old, _ = bn_sites(before)
    new, _ = bn_sites(after)
    return moved_statistics(
        [(a.mean, a.var, b.mean, b.var, a.eps) for a, b in zip(old, new, strict=True)]
    )


def _reestimate(
    model: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]]
) -> OnnxRecalibration:
    observer = observer_graph(model, batch_stats=True)
    if not observer.sites:
        raise ValueError("the graph has no BatchNormalization with constant running statistics")
    # onnxruntime's default threads (the cores): a recalibration is a job of its own; the
    # drift monitor's observer keeps one thread beside the server
    session = ObserverSession(observer, intra_op_threads=0)
    gathered: dict[str, tuple[list, list, list]] = {s.name: ([], [], []) for s in observer.sites}
    n_batches = samples = 0
    for feeds in batches:
        for name, (mean, var, count) in session.moments(feeds).items():
            means, variances, counts = gathered[name]
            if count < 2:
                raise ValueError(
                    f"BatchNorm {name!r} sees {count} value per channel in a batch: one value "
                    "has no variance; calibrate with batches of at least 2 samples"
                )
            means.append(mean)
            variances.append(var)
            counts.append(count)
        n_batches += 1
        samples += int(next(iter(feeds.values())).shape[0])
    if n_batches == 0:
        raise ValueError("recalibration needs at least one calibration batch")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    reports = []
    for site in observer.sites:
        mean, var = population_statistics(*gathered[site.name])
        _check_representable(site.name, mean, var, numpy_helper.to_array(inits[site.var_name]))
        node = graph.node[site.node_index]
        for slot, old_name, value in ((3, site.mean_name, mean), (4, site.var_name, var)):
            old = inits[old_name]
            dtype = numpy_helper.to_array(old).dtype
            new = numpy_helper.from_array(value.astype(dtype).reshape(old.dims), old_name)
            if readers.get(old_name, 0) > 1:  # shared: give this BN its own copy
                new.name = f"{old_name}.recalibrated.{site.node_index}"
                graph.initializer.append(new)
                node.input[slot] = new.name
            else:
                old.CopyFrom(new)
        std_r = np.sqrt(site.var + site.eps)
        reports.append(
            {
                "name": site.name,
                "mean_shift": float(np.mean(np.abs(mean - site.mean) / std_r)),  # in old stds
                "std_ratio": float(np.mean(np.sqrt(var + site.eps) / std_r)),
            }
        )
    return OnnxRecalibration(out, n_batches, samples, reports, observer.skipped)


def _check_representable(name: str, mean: np.ndarray, var: np.ndarray, like: np.ndarray) -> None:
    """Refuse statistics the graph's float type cannot hold (inputs near its range give
    variances beyond it), rather than writing inf into the BN and deploying it."""
    limit = float(np.finfo(like.dtype).max) if like.dtype.kind == "f" else np.inf
    for what, value in (("mean", mean), ("variance", var)):
        peak = float(np.max(np.abs(value)))
        if not np.isfinite(value).all() or peak > limit:
            raise ValueError(
                f"BatchNorm {name!r}: the re-estimated {what} reaches {peak:.3g}, beyond what "
                f"{like.dtype} holds: the calibration inputs are far outside the model's range"
            )
