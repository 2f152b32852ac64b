"""verify_onnx: run an original and a folded ONNX graph in onnxruntime and compare outputs.

Both run on the CPU in float32. The original runs with graph optimizations off, so that
onnxruntime cannot fold its BatchNormalization on its own and the reference is the graph as
written; the candidate runs at `candidate_opt_level` (default: all, as it would be served).

Inputs, when not given, are generated from the graph's input shapes: random normal data at
several batch sizes and constant-valued data (a constant input makes border effects such as
an unshifted zero padding stand out). A symbolic dimension other than the first needs
`input_shapes=`. An output is within tolerance when

    max_abs_err <= atol + rtol * max|reference|

and the report is ok when every output of every case is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from bnfold.onnx.ir_version import lower_for_runtime
from bnfold.onnx.runtime import is_runtime_error, runtime_reason
from bnfold.report import OutputError, VerifyCase, VerifyReport

__all__ = ["make_inputs", "verify_onnx"]

logger = logging.getLogger(__name__)

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def _session(
    model: onnx.ModelProto, level: ort.GraphOptimizationLevel, what: str
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # unused initializers etc. are not the user's concern here
    readable, _ = lower_for_runtime(model)  # a newer onnx's default IR version, where exact
    try:
        return ort.InferenceSession(
            readable.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        if not is_runtime_error(exc):
            raise
        raise ValueError(
            f"onnxruntime cannot load the {what} graph: {runtime_reason(exc)}"
        ) from None


def _resolve_shape(
    name: str, dims: Sequence[int | str | None], batch: int, given: Mapping[str, Sequence[int]]
) -> list[int]:
    if name in given:
        shape = [int(d) for d in given[name]]
        if len(shape) != len(dims):
            raise ValueError(f"input_shapes[{name!r}] has rank {len(shape)}, graph has {len(dims)}")
        return [
            batch if i == 0 and not isinstance(d, int) else s
            for i, (s, d) in enumerate(zip(shape, dims, strict=True))
        ]
    shape = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d >= 0:
            shape.append(d)
        elif i == 0:
            shape.append(batch)
        else:
            raise ValueError(
                f"input {name!r} has symbolic dimension {i} ({d!r}); pass input_shapes="
                f"{{{name!r}: [...]}} (CLI: --input-shape {name}=...)"
            )
    return shape


def make_inputs(
    session: ort.InferenceSession,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, np.ndarray]]:
    """Named input sets: random at each batch size (one when the batch is static), and a
    constant-valued one at the first batch size."""
    given = dict(input_shapes or {})
    rng = np.random.default_rng(seed)
    metas = session.get_inputs()
    static_batch = all(m.shape and isinstance(m.shape[0], int) for m in metas)
    sizes = list(batch_sizes)[:1] if static_batch else list(batch_sizes)
    cases: dict[str, dict[str, np.ndarray]] = {}

    def fill(batch: int, make: Callable[[tuple, type], np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for meta in metas:
            dtype = _NP_TYPES.get(meta.type)
            if dtype is None:
                raise ValueError(f"input {meta.name!r} has unsupported type {meta.type}")
            shape = tuple(_resolve_shape(meta.name, meta.shape, batch, given))
            feeds[meta.name] = make(shape, dtype)
        return feeds

    def random(shape: tuple, dtype: type) -> np.ndarray:
        if np.issubdtype(dtype, np.floating):
            return rng.standard_normal(shape).astype(dtype)
        if dtype is np.bool_:
            return rng.random(shape) < 0.5
        return rng.integers(0, 8, size=shape).astype(dtype)

    for batch in sizes:
        cases[f"random_batch{batch}"] = fill(batch, random)
    cases[f"constant_batch{sizes[0]}"] = fill(
        sizes[0], lambda shape, dtype: np.full(shape, 1, dtype)
    )
    return cases


def _compare(name: str, ref: np.ndarray, cand: np.ndarray) -> OutputError:
    if ref.shape != cand.shape:
        return OutputError(name, float("inf"), float("inf"), float("inf"), 0.0)
    ref64, cand64 = ref.astype(np.float64), cand.astype(np.float64)
    diff = np.abs(cand64 - ref64)
    same_nan = np.isnan(ref64) & np.isnan(cand64)
    diff = np.where(same_nan, 0.0, np.nan_to_num(diff, nan=np.inf))
    max_abs = float(diff.max(initial=0.0))
    max_ref = float(np.nan_to_num(np.abs(ref64), nan=0.0).max(initial=0.0))
    ref_norm = float(np.linalg.norm(np.nan_to_num(ref64)))
    rel_l2 = float(np.linalg.norm(diff)) / ref_norm if ref_norm else float(np.linalg.norm(diff))
    return OutputError(name, max_abs, max_abs / max_ref if max_ref else max_abs, rel_l2, max_ref)


def _worst(errors: list[OutputError]) -> OutputError:
    return OutputError(
        errors[0].name,
        max(e.max_abs_err for e in errors),
        max(e.max_rel_err for e in errors),
        max(e.rel_l2_err for e in errors),
        max(e.max_abs_ref for e in errors),
    )


def verify_onnx(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch_sizes: Sequence[int] = (1, 3),
    rtol: float = 1e-4,
    atol: float = 1e-5,
    candidate_opt_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Compare `folded` against `original` output by output; see the module docstring.

    `inputs` is one feed dict or a list of them; generated when None. Raises ValueError when
    inputs cannot be generated (symbolic non-batch dims), the graphs' inputs differ, or
    onnxruntime cannot load a graph (with its reason).
    `progress(done, total)` is called after each input set.
    """
    reference = _session(original, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "original")
    candidate = _session(folded, candidate_opt_level, "folded")
    ref_inputs = sorted(m.name for m in reference.get_inputs())
    if ref_inputs != sorted(m.name for m in candidate.get_inputs()):
        raise ValueError("the two graphs have different inputs")
    if inputs is None:
        cases = make_inputs(
            reference, batch_sizes=batch_sizes, input_shapes=input_shapes, seed=seed
        )
    elif isinstance(inputs, Mapping):
        cases = {"given": dict(inputs)}
    else:
        cases = {f"given{i}": dict(feed) for i, feed in enumerate(inputs)}
    names = [o.name for o in reference.get_outputs()]
    if names != [o.name for o in candidate.get_outputs()]:
        return VerifyReport(False, rtol, atol, [], error="the two graphs have different outputs")

    results: list[VerifyCase] = []
    per_output: dict[str, list[OutputError]] = {n: [] for n in names}
    for done, (case_name, feeds) in enumerate(cases.items(), start=1):
        try:
            refs = reference.run(names, feeds)
            cands = candidate.run(names, feeds)
        except Exception as exc:  # noqa: BLE001 - a failing case is a result, not a crash
            return VerifyReport(
                False,
                rtol,
                atol,
                [_worst(v) for v in per_output.values() if v],
                results,
                error=f"{case_name}: {exc}",
            )
        errors = [_compare(n, r, c) for n, r, c in zip(names, refs, cands, strict=True)]
        ok = all(e.max_abs_err <= atol + rtol * e.max_abs_ref for e in errors)
        results.append(VerifyCase(case_name, ok, errors))
        for e in errors:
            per_output[e.name].append(e)
        if progress is not None:
            progress(done, len(cases))
    outputs = [_worst(v) for v in per_output.values() if v]
    return VerifyReport(all(c.ok for c in results), rtol, atol, outputs, results)
