"""Arrays of model inputs sent as a file (calibration or recalibration data), parsed and checked.

``.npy`` (one array, for a one-input model), ``.npz`` or ``.safetensors`` (one array per model
input, by input name), read by ``bnfold.array_files`` (no pickles; an ``.npz``'s directory
checked before anything is inflated). Every array is then checked against the graph's inputs (dtype,
rank, fixed dimensions, equal sample counts, finite values whose squares are finite too, at
least 2 samples, not all identical).
"""

from __future__ import annotations

from typing import Any

from service.worker.sandbox import LIMITS, Refused

__all__ = ["MIN_SAMPLES", "batches_of", "match_inputs", "parse_arrays"]

MIN_SAMPLES = 2  # one sample has no variance


def parse_arrays(data: bytes, declared: str | None) -> dict[str, Any]:
    """The file's arrays (``bnfold.array_files``), an .npz inflating to at most a quarter of
    the upload limit (1 MiB at the least); a refusal is a 400, one of size a 413."""
    from bnfold.array_files import ArrayFileError, ArrayFileTooLarge, read_arrays

    limit = max(LIMITS.get("file_bytes", 1 << 30) // 4, 1 << 20)
    try:
        return read_arrays(data, declared, max_inflated_bytes=limit)
    except ArrayFileTooLarge as exc:
        raise Refused(413, str(exc)) from None
    except ArrayFileError as exc:
        raise Refused(400, str(exc)) from None


def match_inputs(
    original: Any, arrays: dict[str, Any], verified: dict[str, list[int]]
) -> dict[str, Any]:
    """Arrays by input name, checked. A symbolic dimension past the batch must equal the one
    the model was verified with at deploy time (``verified``, the record's input shapes)."""
    import numpy as np
    from onnx import helper

    inits = {t.name for t in original.graph.initializer}
    inputs = [i for i in original.graph.input if i.name not in inits]
    names = [i.name for i in inputs]
    if len(inputs) == 1 and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    unknown, missing = sorted(set(arrays) - set(names)), sorted(set(names) - set(arrays))
    if unknown or missing:
        raise Refused(
            400,
            f"the data must hold one array per model input {names}: "
            + "; ".join(
                p
                for p in (
                    f"missing {missing}" if missing else "",
                    f"unknown {unknown}" if unknown else "",
                )
                if p
            ),
        )
    counts = set()
    for spec in inputs:
        array = arrays[spec.name]
        tensor = spec.type.tensor_type
        want = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if array.dtype != want:
            raise Refused(400, f"input {spec.name!r} must be {want}, the data holds {array.dtype}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        seen = verified.get(spec.name) or []
        if len(seen) == len(dims):
            dims = [d or s for d, s in zip(dims, seen, strict=True)]
        shown = ["N", *(d if d else "?" for d in dims[1:])]
        if array.ndim != len(dims) or any(
            d and d != n for d, n in zip(dims[1:], array.shape[1:], strict=True)
        ):
            raise Refused(
                400,
                f"input {spec.name!r} has shape {list(array.shape)}; the model takes "
                f"[{', '.join(map(str, shown))}]",
            )
        if want.kind == "f":
            _check_float_values(spec.name, array)
        counts.add(int(array.shape[0]))
    if len(counts) != 1:
        raise Refused(400, f"the inputs hold different numbers of samples: {sorted(counts)}")
    n = counts.pop()
    if n < MIN_SAMPLES:
        raise Refused(
            400,
            f"{n} sample(s): BN statistics need at least {MIN_SAMPLES} (one sample has no "
            "variance)",
        )
    if all((arrays[spec.name] == arrays[spec.name][:1]).all() for spec in inputs):
        raise Refused(
            400,
            f"all {n} samples are identical: BN statistics need samples that differ (one "
            "sample has no variance)",
        )
    return {spec.name: np.ascontiguousarray(arrays[spec.name]) for spec in inputs}


def _check_float_values(name: str, array: Any) -> None:
    """Finite, and small enough that squares (variances, L2 norms) stay finite: statistics are
    kept in the graph's float type, float32 at the least."""
    import numpy as np

    if not np.isfinite(array).all():
        raise Refused(400, f"input {name!r} holds NaN or infinite values")
    bound = float(np.sqrt(np.finfo(np.promote_types(array.dtype, np.float32)).max))
    largest = float(np.abs(array).max()) if array.size else 0.0
    if largest > bound:
        raise Refused(
            400,
            f"input {name!r} holds values up to {largest:.3g} in magnitude; beyond {bound:.3g} "
            "their squares overflow (BN variances, L2 norms)",
        )


def batches_of(feeds: dict[str, Any], batch_size: int) -> list[dict[str, Any]]:
    """Near-equal batches of at most ``batch_size`` samples (sizes differ by at most one), so
    that no last batch of one sample has no variance."""
    import numpy as np

    n = next(iter(feeds.values())).shape[0]
    count = -(-n // max(MIN_SAMPLES, batch_size))
    splits = {k: np.array_split(v, count) for k, v in feeds.items()}
    return [{k: splits[k][i] for k in feeds} for i in range(count)]
