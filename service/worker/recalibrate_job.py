"""The recalibrate job: new BN statistics from unlabeled data, folded, verified, written.

Input: ``base.onnx`` (the current version's original graph, from the store) and ``upload``,
the data (``service.worker.input_data``: ``.npy``, ``.npz`` or ``.safetensors``, parsed without
pickles and checked against the graph's inputs).

Then: the arrays are split into batches of ``batch_size``,
``bnfold.drift.recalibrate_onnx`` rewrites the statistics in the original's BatchNormalization
nodes (behind a fitted per-channel map of the input, with ``align_input``, when that is the
repair that moves the statistics least), and the fold job's own steps fold, verify (against
the recalibrated original, in eval mode) and load-test. Nothing is written unless every check
passed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.worker.fold_job import fold_in_onnx, load_test, verify_folded
from service.worker.input_data import batches_of, match_inputs, parse_arrays
from service.worker.parsing import parse_onnx
from service.worker.sandbox import FOLDING, Refused, require
from service.worker.savings import measure_savings
from service.worker.sources import Source

__all__ = ["run_recalibrate_job"]


def run_recalibrate_job(job_dir: Path, job: dict[str, Any]) -> dict[str, Any]:
    require("onnx", "numpy")
    original = parse_onnx((job_dir / "base.onnx").read_bytes())
    data = (job_dir / "upload").read_bytes()
    arrays = parse_arrays(data, job.get("format"))
    feeds = match_inputs(original, arrays, job.get("input_shapes") or {})
    batches = batches_of(feeds, int(job.get("batch_size") or 32))
    require(*FOLDING, "bnfold.drift.reestimation")
    from bnfold.drift import recalibrate_onnx

    try:
        recalibrated = recalibrate_onnx(
            original, batches, align_input=bool(job.get("align_input", True))
        )
    except ValueError as exc:
        raise Refused(400, f"recalibration refused: {exc}") from None
    rtol, atol = job.get("rtol", 1e-4), job.get("atol", 1e-5)
    shapes = job.get("input_shapes") or None
    source = Source(recalibrated.model, shapes, {})
    folded, fold_report = fold_in_onnx(source)
    verification = verify_folded(source, folded, fold_report, rtol, atol)
    folded_bytes = folded.SerializeToString()
    load_test(folded_bytes)
    try:
        savings = measure_savings(recalibrated.model, folded, shapes or {})
    except Exception as exc:  # a measurement, not a reason to refuse
        savings = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
    (job_dir / "folded.onnx").write_bytes(folded_bytes)
    (job_dir / "original.onnx").write_bytes(recalibrated.model.SerializeToString())
    return {
        "status": 200,
        "input_shapes": shapes or {},
        "fold_report": fold_report,
        "verification": verification,
        "savings": savings,
        "recalibration": {
            **recalibrated.report(),
            "batch_size": int(job.get("batch_size") or 32),
            "format": job.get("format"),
            "bytes": len(data),
        },
    }
