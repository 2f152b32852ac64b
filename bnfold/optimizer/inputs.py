"""The inputs `optimize` works on: example, calibration, generated, timing feeds.

Everything becomes feed dicts {graph input name: float32 array}. Generated inputs follow the
example inputs: Gaussian with their mean and standard deviation, clipped to their range when
they are bounded below (images in [0, 1]); an ONNX graph without example inputs gets N(0, 1)
at its declared shape, symbolic batch 1. A graph whose inputs fix the batch size (exported
for batch 1, say) gets every set at that size: generated sets hold as many rows in batches of
it, and calibration sets are re-split into it (`fixed_batch`, `rebatch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

__all__ = [
    "InputSpec",
    "as_feeds",
    "check_feeds",
    "concat_feeds",
    "fixed_batch",
    "input_spec",
    "rebatch",
]


class InputSpec:
    """Graph input names and one example feed (the model's example inputs)."""

    def __init__(
        self,
        names: list[str],
        example: dict[str, np.ndarray],
        assumed: str,
        fixed_batch: int | None = None,
    ) -> None:
        self.names = names
        self.example = example
        self.assumed = assumed  # how the example was obtained, for the report
        self.fixed_batch = fixed_batch  # the one batch size the graph takes, if it fixes one

    def generated(self, batch: int, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
        """`count` sets of `batch` rows; as many rows in sets of `fixed_batch` where the graph
        fixes one."""
        if self.fixed_batch:
            batch, count = self.fixed_batch, -(-batch * count // self.fixed_batch)
        rng = np.random.default_rng(seed)
        feeds = []
        for _ in range(count):
            feed = {}
            for name, x in self.example.items():
                shape = (batch, *x.shape[1:])
                mean, std = float(x.mean()), float(x.std()) or 1.0
                value = rng.standard_normal(shape) * std + mean
                if x.min() >= 0:
                    value = np.clip(value, float(x.min()), float(x.max()))
                feed[name] = value.astype(x.dtype)
            feeds.append(feed)
        return feeds

    def describe(self) -> dict:
        return {
            "names": self.names,
            "example_shapes": {n: list(x.shape) for n, x in self.example.items()},
            "example_range": {n: [float(x.min()), float(x.max())] for n, x in self.example.items()},
            "assumed": self.assumed,
        }


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the graph's inputs all fix (their first dimension, a number), or None
    where one is symbolic or they differ."""
    firsts = set()
    for value in _graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].HasField("dim_value"):
            return None
        firsts.add(dims[0].dim_value)
    return firsts.pop() if len(firsts) == 1 else None


def rebatch(feeds: Sequence[dict[str, np.ndarray]], size: int, what: str) -> list[dict]:
    """The rows of `feeds`, in order, in sets of exactly `size`: a ValueError naming `what`
    where their count is not a multiple of it."""
    try:
        whole = concat_feeds(feeds)
    except ValueError:  # the sets differ past the batch: check_feeds names the input
        return list(feeds)
    rows = len(next(iter(whole.values())))
    if rows % size:
        raise ValueError(
            f"{what}: {rows} samples; the graph takes batches of exactly {size}, so give a "
            f"multiple of {size}"
        )
    return [{k: v[i : i + size] for k, v in whole.items()} for i in range(0, rows, size)]


def as_feeds(names: list[str], batches: Sequence) -> list[dict[str, np.ndarray]]:
    """A list of input tuples (or arrays, for one input) as feed dicts."""
    feeds = []
    for item in batches:
        values = item if isinstance(item, list | tuple) else (item,)
        if len(values) != len(names):
            raise ValueError(f"an input set has {len(values)} arrays; the model takes {len(names)}")
        feeds.append({n: _array(v) for n, v in zip(names, values, strict=True)})
    return feeds


def check_feeds(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], what: str) -> None:
    """Refuse, naming the input and set, feeds the graph cannot take or that hold NaN or inf:
    before any work, rather than onnxruntime's message (or a quantizer's assertion) halfway."""
    declared = {v.name: v.type.tensor_type for v in _graph_inputs(model)}
    for index, feed in enumerate(feeds):
        where = f"{what} set {index}" if len(feeds) > 1 else what
        for name, array in feed.items():
            tensor_type = declared[name]
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
            expected = "x".join("?" if d is None else str(d) for d in dims)
            if tensor_type.HasField("shape") and (
                array.ndim != len(dims)
                or any(d is not None and d != n for d, n in zip(dims, array.shape, strict=True))
            ):
                got = "x".join(str(n) for n in array.shape) or "a scalar"
                raise ValueError(
                    f"{where}: input {name!r} has shape {got}; the graph takes {expected}"
                )
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            if array.dtype != dtype:
                raise ValueError(
                    f"{where}: input {name!r} is {array.dtype}; the graph takes {dtype}"
                )
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                bad = int(array.size - np.isfinite(array).sum())
                raise ValueError(
                    f"{where}: input {name!r} holds {bad} NaN or infinite value(s) of {array.size}"
                )


def concat_feeds(feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {n: np.concatenate([f[n] for f in feeds]) for n in feeds[0]}


def _array(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == np.float64 else array


def input_spec(model: onnx.ModelProto, example_inputs, calibration) -> InputSpec:
    graph_inputs = _graph_inputs(model)
    names = [v.name for v in graph_inputs]
    batch = fixed_batch(model)
    if example_inputs is not None:
        example = as_feeds(names, [example_inputs])[0]
        return InputSpec(names, example, "example inputs", batch)
    if calibration:
        example = as_feeds(names, calibration[:1])[0]
        if batch:
            example = {n: x[:batch] for n, x in example.items()}
        return InputSpec(names, example, "the first calibration set", batch)
    example = {}
    for value in graph_inputs:
        dims = value.type.tensor_type.shape.dim
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif i == 0:
                shape.append(1)
            else:
                raise ValueError(
                    f"input {value.name!r} has a symbolic dimension {d.dim_param or i!r}: "
                    "give example_inputs (or --input-shape)"
                )
        elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        example[value.name] = np.random.default_rng(0).standard_normal(shape).astype(elem)
    return InputSpec(
        names, example, "N(0, 1) at the graph's declared shapes (no inputs given)", batch
    )
