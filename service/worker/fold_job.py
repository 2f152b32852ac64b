"""The fold job: fold the original, verify the result, load-test it and write what to serve.

An ONNX source is folded with ``bnfold.fold_onnx``. A torch source (weights for an
architecture) is folded with ``bnfold.fold``, verified in torch, and exported; both kinds are
then verified in onnxruntime against the unfolded graph, which is what the record's
``verification`` reports. Nothing is written unless every check passed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from service.worker.sandbox import Refused, first_lines
from service.worker.savings import measure_savings
from service.worker.sources import Source, load_source

__all__ = ["fold_in_onnx", "fold_in_torch", "load_test", "run_fold_job", "verify_folded"]


def run_fold_job(
    job_dir: Path, job: dict[str, Any], source: Source | None = None
) -> dict[str, Any]:
    """`source`: the upload, when the caller has loaded it already (the optimize job checks
    its calibration file against the graph before anything is folded)."""
    rtol, atol = job.get("rtol", 1e-4), job.get("atol", 1e-5)
    source = source or load_source(job_dir, job)
    extra: dict[str, Any] = {}
    if source.module is not None:
        folded_model, fold_report, extra["torch_verification"] = fold_in_torch(source, rtol, atol)
    else:
        folded_model, fold_report = fold_in_onnx(source)
    verification = verify_folded(source, folded_model, fold_report, rtol, atol)
    folded_bytes = folded_model.SerializeToString()
    load_test(folded_bytes)
    try:
        savings = measure_savings(source.original, folded_model, source.input_shapes or {})
    except Exception as exc:  # a measurement, not a reason to refuse the model
        savings = {"error": first_lines(exc, 1)}
    (job_dir / "folded.onnx").write_bytes(folded_bytes)
    if job["kind"] == "onnx":
        os.link(job_dir / "upload", job_dir / "original.onnx")
    else:
        (job_dir / "original.onnx").write_bytes(source.original.SerializeToString())
    return {
        "status": 200,
        "source": source.description,
        "input_shapes": source.input_shapes or {},
        "fold_report": fold_report,
        "verification": verification,
        "savings": savings,
        **extra,
    }


def fold_in_onnx(source: Source) -> tuple[Any, dict[str, Any]]:
    import bnfold

    try:
        folded = bnfold.fold_onnx(source.original)
    except Exception as exc:
        raise Refused(422, f"folding failed: {first_lines(exc)}") from None
    return folded.model, folded.report.to_dict()


def fold_in_torch(source: Source, rtol: float, atol: float) -> tuple[Any, dict, dict]:
    import torch

    import bnfold

    try:
        with torch.no_grad():
            folded = bnfold.fold(source.module, source.example)
    except Exception as exc:
        raise Refused(422, f"folding failed: {first_lines(exc)}") from None
    fold_report = folded.report.to_dict()
    with torch.no_grad():
        check = bnfold.verify(source.module, folded.module, source.example, rtol=rtol, atol=atol)
    if not check.ok:
        raise Refused(
            422,
            "verification failed in torch: the folded model differs from the original beyond "
            f"rtol={rtol:g}, atol={atol:g} (max_abs_err={check.max_abs_err:.3g}); "
            "nothing was deployed",
            fold_report=fold_report,
            torch_verification=check.to_dict(),
        )
    try:
        with torch.no_grad():
            exported = bnfold.export_onnx(folded.module, source.example, dynamic_batch=True)
    except Exception as exc:
        raise Refused(
            422, f"exporting the folded model to ONNX failed: {first_lines(exc)}"
        ) from None
    return exported, fold_report, check.to_dict()


def verify_folded(
    source: Source, folded: Any, fold_report: dict[str, Any], rtol: float, atol: float
) -> dict[str, Any]:
    import bnfold

    try:
        verification = bnfold.verify_onnx(
            source.original, folded, None, rtol=rtol, atol=atol, input_shapes=source.input_shapes
        )
    except Exception as exc:
        raise Refused(
            422, f"verification could not run: {first_lines(exc)}", fold_report=fold_report
        ) from None
    if not verification.ok and verification.error:
        raise Refused(
            422,
            f"verification could not run the graphs: {first_lines(verification.error, 1)}; "
            "nothing was deployed",
            fold_report=fold_report,
            verification=verification.to_dict(),
        )
    if not verification.ok:
        raise Refused(
            422,
            "verification failed: the folded graph differs from the original beyond "
            f"rtol={rtol:g}, atol={atol:g} (max_abs_err={verification.max_abs_err:.3g}); "
            "nothing was deployed",
            fold_report=fold_report,
            verification=verification.to_dict(),
        )
    return verification.to_dict()


def load_test(folded_bytes: bytes) -> None:
    """The final check: a session on the exact bytes that will be served."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(folded_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Refused(
            422, f"onnxruntime cannot load the folded graph: {first_lines(exc)}"
        ) from None
