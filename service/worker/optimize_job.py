"""The optimize job: the fold job, then ``bnfold.optimize`` picks what is served.

First the calibration file, when one came, is parsed and checked against the uploaded graph
(a bad file is refused before anything is folded). Then the upload goes through the fold job
unchanged (parsed, folded, verified exactly against the original, load-tested, written). Then
``bnfold.optimize`` measures its candidates on this machine (the folded fp32 graph, INT8
data-free from the BN statistics, INT8 calibrated when a calibration file came with the upload,
INT8 with operators kept in fp32 by measurement) and the fastest one within the upload's
accuracy budget replaces ``folded.onnx``. A lossy candidate is verified against its budget, not
to rtol/atol: the record says which, and why it was chosen.

The calibration file holds one array per model input (``.npy`` for one input, ``.npz`` or
``.safetensors`` by input name), parsed and checked as the recalibrate job's data is, and
optionally a ``labels`` array of class indices (for ``max_accuracy_drop``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bnfold.array_files import LABELS
from service.worker.fold_job import load_test, run_fold_job
from service.worker.input_data import batches_of, match_inputs, parse_arrays
from service.worker.sandbox import FOLDING, Refused, first_lines, require
from service.worker.sources import load_source, read_onnx_upload

__all__ = ["run_optimize_job"]

CALIBRATION_BATCH = 8


def _classes(original: Any) -> int | None:
    """The number of classes of a model whose first output is [N, classes] with a fixed
    ``classes``; None when the graph does not say."""
    dims = original.graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 1:
        return dims[1].dim_value
    return None


def _labels(array: Any, classes: int | None) -> Any:
    from bnfold.optimizer.accuracy import class_indices

    try:
        return class_indices(array, classes, what="'labels'")
    except ValueError as exc:
        raise Refused(400, str(exc)) from None


def _calibration(original: Any, data: bytes, settings: dict[str, Any], shapes: dict) -> tuple:
    """The calibration batches and labels (or None), every refusal naming the file."""
    try:
        arrays = parse_arrays(data, settings.get("format"))
        labels = None
        if LABELS in arrays and LABELS not in {i.name for i in original.graph.input}:
            labels = _labels(arrays.pop(LABELS), _classes(original))
        feeds = match_inputs(original, arrays, shapes)
    except Refused as exc:
        raise Refused(exc.status, f"the calibration file: {exc}", **exc.extra) from None
    samples = len(next(iter(feeds.values())))
    if labels is not None and len(labels) != samples:
        raise Refused(400, f"the calibration file holds {len(labels)} labels for {samples} samples")
    return [tuple(batch.values()) for batch in batches_of(feeds, CALIBRATION_BATCH)], labels


def run_optimize_job(job_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    settings = job.get("optimize") or {}
    if job["kind"] == "onnx":
        # the graph as sent, with onnx alone: a bad calibration file is refused before the
        # folding libraries are loaded (torch, onnx-ir: 9 s on a 2-core AMD EPYC)
        source = read_onnx_upload(job_dir, job)
    else:
        source = load_source(job_dir, job)  # zoo and weights uploads: the graph is an export
    shapes = source.input_shapes or {}
    calibration = labels = None
    if settings.get("calibration"):
        data = (job_dir / settings["calibration"]).read_bytes()
        calibration, labels = _calibration(source.original, data, settings, shapes)
    if settings.get("budget", {}).get("max_accuracy_drop") is not None and labels is None:
        raise Refused(
            400,
            f"max_accuracy_drop needs a {LABELS!r} array of class indices in the calibration file",
        )
    require(*FOLDING)
    result = run_fold_job(job_dir, job, source)
    require("bnfold.optimizer")
    import numpy as np
    import onnx

    import bnfold

    original = onnx.load(str(job_dir / "original.onnx"))  # as written, whatever folding did
    example = None
    if calibration is None and shapes:
        rng = np.random.default_rng(0)
        example = tuple(rng.standard_normal(shape).astype(np.float32) for shape in shapes.values())
    try:
        optimized = bnfold.optimize(
            original,
            example,
            budget=bnfold.Budget(**settings.get("budget", {})),
            calibration=calibration,
            labels=labels,
        )
    except (ValueError, TypeError) as exc:
        raise Refused(422, f"optimizing failed: {first_lines(exc)}") from None
    chosen = optimized.chosen
    chosen_bytes = optimized.model.SerializeToString()
    load_test(chosen_bytes)
    (job_dir / "folded.onnx").write_bytes(chosen_bytes)
    report = optimized.report.to_dict()
    result["optimization"] = report
    result["precision"] = {
        "precision": chosen.precision,
        "candidate": chosen.name,
        "why": report["why"],
        "verified": "to rtol/atol against the original (an exact fold)"
        if chosen.precision == "fp32" and chosen.name == "fp32"
        else "against the accuracy budget "
        + ", ".join(f"{k}={v}" for k, v in report["budget"].items() if v is not None),
        "calibration_samples": sum(len(b[0]) for b in calibration) if calibration else 0,
    }
    return result
