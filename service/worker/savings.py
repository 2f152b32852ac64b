"""What folding saved: nodes, BatchNorm nodes, and the median latency of each graph."""

from __future__ import annotations

from typing import Any

__all__ = ["measure_savings"]


def measure_savings(original: Any, folded: Any, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """What folding saved: nodes, BatchNorm nodes, and the median latency of each graph.

    Timed on one CPU thread (the worker's OMP_NUM_THREADS=1) at the verification's input
    shapes (a variable dimension as 1), for at most ~0.2 s per graph so deploys stay quick."""
    import time

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    out: dict[str, Any] = {}
    feeds = None
    for graph, model in (("original", original), ("folded", folded)):
        out[f"{graph}_nodes"] = len(model.graph.node)
        out[f"{graph}_batchnorm"] = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        if feeds is None:
            feeds = _timing_feeds(session, shapes, np)
        session.run(None, feeds)  # warm-up: first runs allocate
        times: list[float] = []
        deadline = time.perf_counter() + 0.2
        while len(times) < 3 or (len(times) < 50 and time.perf_counter() < deadline):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        out[f"{graph}_latency_s"] = float(np.median(times))
    out["input_shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    out["threads"] = 1
    return out


_FLOAT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
}


def _timing_feeds(session: Any, shapes: dict[str, list[int]], np: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = shapes.get(arg.name) or [
            d if isinstance(d, int) and d > 0 else 1 for d in arg.shape
        ]
        if arg.type not in _FLOAT_TYPES:
            raise ValueError(f"input {arg.name!r} of type {arg.type}: no timing input")
        feeds[arg.name] = rng.standard_normal(shape).astype(_FLOAT_TYPES[arg.type])
    return feeds
