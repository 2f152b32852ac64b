"""optimize for target "cuda": the fp32 graph and its fp16 version (`fp16`), checked here.

Their accuracy is measured through onnxruntime on this machine; neither is timed, since that
needs a CUDA device (bench/gpu_serving.py does it there), so the fp32 graph is chosen and the
fp16 candidate is offered in `.candidates` with its accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

from bnfold.optimizer import progress
from bnfold.optimizer.budget import Budget
from bnfold.optimizer.candidates import Candidate, OptimizeReport, OptimizeResult
from bnfold.optimizer.fp16 import to_fp16
from bnfold.optimizer.hardware import cpu_features

__all__ = ["optimize_cuda"]


def optimize_cuda(
    fp32: Candidate,
    steps: dict,
    measure: Callable[[Candidate], None],
    budget: Budget,
    inputs: dict,
    notes: list[str],
) -> OptimizeResult:
    """`measure` sets a candidate's accuracy and budget verdict; `steps`, `inputs` and `notes`
    are the report's so far."""
    with progress.stage("fp16 for CUDA"):
        half = to_fp16(fp32.model)
    steps["fp16"] = half.to_dict()
    candidates = [
        fp32,
        Candidate(
            "fp16",
            "fp16",
            "fp16 weights and compute, fp32 graph inputs and outputs (onnxruntime's float16 "
            f"converter); {len(half.overflow_nodes)} node(s) with weights beyond 65504 and "
            f"{len(half.kept_fp32) - len(half.overflow_nodes)} fp16-sensitive node(s) in fp32",
            half.model,
            excluded_nodes=list(half.kept_fp32),
        ),
    ]
    with progress.stage("accuracy", len(candidates)) as step:
        for c in candidates:
            measure(c)
            step()
    notes.append(
        "target cuda: candidates are checked for accuracy through onnxruntime on this machine "
        "but not timed (no CUDA device here); the fp32 graph is chosen, and the fp16 candidate "
        "is in .candidates with its accuracy"
    )
    report = OptimizeReport(
        target="cuda",
        cpu=cpu_features(),
        budget=budget.to_dict(),
        chosen=fp32.name,
        why="not timed on a CUDA device: nothing shown faster than fp32",
        inputs=inputs,
        timing={"method": "none: needs a CUDA device"},
        steps=steps,
        candidates=[c.to_dict() for c in candidates],
        notes=notes,
    )
    return OptimizeResult(fp32.model, candidates, report)
