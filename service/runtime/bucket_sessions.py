"""Batch buckets' sessions: one warmed onnxruntime session per bucket size (``buckets.py``
says which sizes and why), each run plainly or through IO binding with its buffers bound once,
and a CUDA graph captured on the first bound run when asked.

``add_buckets`` builds them for a loaded model: each bucket's first run (its plan) and
``WARM_RUNS`` more are timed, checked against the model's own session, and the re-plan cost is
timed on the model's own session; ``buckets.choose_buckets`` keeps what pays.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from service.errors import first_line
from service.protocol.v2 import DATATYPES
from service.runtime import buckets as bucketing
from service.runtime.sessions import (
    CPU,
    CUDA,
    LoadedSession,
    ModelLoadError,
    SessionFactory,
    example_feeds,
    outputs_close,
)

logger = logging.getLogger(__name__)

WARM_RUNS = 3  # timed runs of each bucket after its first, at deploy time


class BucketSession:
    """A session that only ever runs ``rows`` rows: plainly, or through IO binding with its
    buffers bound once (and a CUDA graph captured on the first bound run, when asked)."""

    def __init__(self, rows: int, session: Any, provider: str, cuda_graph: bool = False) -> None:
        self.rows = rows
        self.session = session
        self.provider = provider
        self.cuda_graph = cuda_graph
        self.binding: Any = None
        self.staging: dict[str, np.ndarray] = {}  # host buffers (pinned on CUDA when possible)
        self.pinned = False
        self._device_inputs: dict[str, Any] = {}  # OrtValues on the GPU, filled each run
        self._outputs: dict[str, Any] = {}  # bound output OrtValues
        self._lock = threading.Lock()  # the bound buffers are shared state

    def bind(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Bind buffers shaped like ``feeds`` and ``outputs`` (a plain run's) for every run."""
        import onnxruntime as ort

        on_gpu = self.provider == CUDA
        binding = self.session.io_binding()
        for name, value in feeds.items():
            host = _pinned_like(value) if on_gpu else None
            self.pinned = host is not None
            self.staging[name] = host if host is not None else np.empty_like(value)
            if on_gpu:  # a fixed device address, filled from the host buffer each run
                device = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(value.shape), value.dtype, "cuda", 0
                )
                self._device_inputs[name] = device
                binding.bind_ortvalue_input(name, device)
            else:  # the CPU reads the host buffer itself: no copy at all
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(self.staging[name])
                )
        device_type = "cuda" if on_gpu else "cpu"
        for name, value in outputs.items():
            out = ort.OrtValue.ortvalue_from_shape_and_type(
                list(value.shape), value.dtype, device_type, 0
            )
            self._outputs[name] = out
            binding.bind_ortvalue_output(name, out)
        self.binding = binding

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        if self.binding is None:
            values = self.session.run(output_names, feeds)
            return dict(zip(output_names, values, strict=True))
        if any(v.shape != self.staging[n].shape for n, v in feeds.items()):
            values = self.session.run(output_names, feeds)  # another shape than the bound one
            return dict(zip(output_names, values, strict=True))
        with self._lock:
            for name, value in feeds.items():
                staging = self.staging[name]
                if value is not staging:
                    np.copyto(staging, value)
                device = self._device_inputs.get(name)
                if device is not None:
                    device.update_inplace(staging)  # from page-locked memory when pinned
            self.session.run_with_iobinding(self.binding)
            # a bound CPU output is a view of a buffer the next run overwrites: copied out;
            # a GPU one is copied to the host by numpy() anyway
            return {n: np.array(self._outputs[n].numpy(), copy=True) for n in output_names}

    def describe(self) -> dict[str, Any]:
        return {
            "io_binding": self.binding is not None,
            "pinned_host_buffers": self.pinned,
            "cuda_graph": self.cuda_graph and self.binding is not None,
        }


def _pinned_like(value: np.ndarray) -> np.ndarray | None:
    """A page-locked host array like ``value`` (torch's CUDA build allocates it; the copy to
    the device then needs no staging through pageable memory), or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        dtype = torch.from_numpy(np.empty(0, value.dtype)).dtype
        return torch.empty(value.shape, dtype=dtype, pin_memory=True).numpy()
    except Exception as exc:  # no torch (the slim image), no CUDA build, no such dtype
        logger.debug("no pinned host buffer: %s", first_line(exc))
        return None


def add_buckets(
    factory: SessionFactory,
    loaded: LoadedSession,
    model: bytes | str,
    sizes: list[int],
    *,
    choose: bool,
    io_binding: str = "off",
    input_shapes: dict[str, list[int]] | None = None,
) -> LoadedSession:
    """One warmed ``BucketSession`` per size of ``sizes`` on ``loaded``'s provider; with
    ``choose``, only those ``buckets.choose_buckets`` keeps from the warm-up's timings.

    Each bucket's first run (its plan) and ``WARM_RUNS`` more are timed; the re-plan cost is
    timed on the model's own session, at the smallest size right after the largest and back.
    A failure leaves ``loaded`` without buckets, the reason in ``bucket_report``.
    """
    report: dict[str, Any] = {"sizes_tried": list(sizes), "io_binding": io_binding}
    try:
        built, run_s, notes = _warm_buckets(factory, loaded, model, sizes, io_binding, input_shapes)
    except Exception as exc:  # a measurement failed: serve as before, say why
        logger.warning("batch buckets not built: %s", first_line(exc))
        loaded.bucket_report = {**report, "buckets": [], "error": first_line(exc)}
        return loaded
    report["run_ms"] = {str(b): round(t * 1e3, 4) for b, t in run_s.items()}
    kept = sorted(built)
    if choose:
        replan = _replan_s(loaded, sizes, run_s, input_shapes)
        kept = bucketing.choose_buckets(run_s, replan)
        report["replan_ms"] = round(replan * 1e3, 4)
        report["rule"] = (
            f"dropped a size when padding to the next kept one costs <= {bucketing.WASTE:.0%}"
            " of its run; none at all when the worst padding waste is not below a re-plan"
        )
        if not kept:  # measured: a re-plan costs less than padding (the CPU provider)
            loaded.replans_on_new_batch = False
    loaded.buckets = {b: built[b] for b in kept}
    report["buckets"] = kept
    if kept:  # every bucket runs the same way: one model, one provider, one setting
        report["run"] = built[kept[-1]].describe()
    if notes:
        report["notes"] = notes
    loaded.bucket_report = report
    return loaded


def _warm_buckets(
    factory: SessionFactory,
    loaded: LoadedSession,
    model: bytes | str,
    sizes: list[int],
    io_binding: str,
    input_shapes: dict[str, list[int]] | None,
) -> tuple[dict[int, BucketSession], dict[int, float], list[str]]:
    import onnxruntime as ort

    notes: list[str] = []
    bind = io_binding in ("on", "cuda_graph")
    graph = io_binding == "cuda_graph"
    if graph and loaded.provider != CUDA:
        notes.append("cuda_graph: CUDA graphs need the CUDA provider; IO binding only")
        graph = False
    if bind and any(DATATYPES[s.datatype] == np.dtype(object) for s in loaded.signature.inputs):
        notes.append("io_binding: an input is text, which onnxruntime cannot bind")
        bind = graph = False
    elif bind and any(d < 0 for s in loaded.signature.inputs for d in s.shape[1:]):
        # bound at the upload's example shape; a request of another shape runs unbound,
        # which a captured CUDA graph would not survive
        notes.append("io_binding: bound at the example input shapes only")
        if graph:
            notes.append("cuda_graph: off, an input has another variable dimension")
            graph = False
    built: dict[int, BucketSession] = {}
    run_s: dict[int, float] = {}
    names = [o.name for o in loaded.signature.outputs]
    for rows in sizes:
        feeds = example_feeds(loaded.signature, input_shapes, rows)
        # the model's own session gives the reference outputs and their shapes; a CUDA
        # graph session is run through its binding only
        reference = loaded.session.run(names, feeds)
        session, why = _bucket_session(factory, ort, model, loaded.provider, graph)
        if why and why not in notes:
            notes.append(why)
        bucket = BucketSession(rows, session, loaded.provider, graph and not why)
        if bind:
            bucket.bind(feeds, dict(zip(names, reference, strict=True)))
        times = []
        for _ in range(1 + WARM_RUNS):
            started = time.perf_counter()
            got = bucket.run(feeds, names)
            times.append(time.perf_counter() - started)
        for name, want in zip(names, reference, strict=True):
            if not outputs_close(want, got[name]):
                raise ModelLoadError(
                    f"bucket {rows}: output {name!r} differs from the model's own session"
                )
        built[rows] = bucket
        run_s[rows] = min(times[1:])
    return built, run_s, notes


def _bucket_session(
    factory: SessionFactory, ort: Any, model: bytes | str, provider: str, cuda_graph: bool
) -> tuple[Any, str | None]:
    """A session on ``provider``; (session, why the CUDA graph was not had) or (_, None)."""
    options = factory.options(ort)
    options.log_severity_level = 3
    if provider != CUDA:
        return ort.InferenceSession(model, options, providers=[CPU]), None
    why = None
    if cuda_graph:
        try:
            cuda = {**factory.cuda_options, "enable_cuda_graph": "1"}
            return ort.InferenceSession(model, options, providers=[(CUDA, cuda), CPU]), None
        except Exception as exc:  # e.g. a node onnxruntime keeps on the CPU
            why = f"cuda_graph: onnxruntime refused it ({first_line(exc)})"
    session = ort.InferenceSession(model, options, providers=[(CUDA, factory.cuda_options), CPU])
    return session, why


def _replan_s(
    loaded: LoadedSession,
    sizes: list[int],
    run_s: dict[int, float],
    input_shapes: dict[str, list[int]] | None,
) -> float:
    """What a run of the model's own session costs beyond a bucket's steady run when the
    batch size differs from the previous run's (both sizes seen before)."""
    small, large = min(sizes), max(sizes)
    if small == large:
        return 0.0
    names = [o.name for o in loaded.signature.outputs]
    feeds = {r: example_feeds(loaded.signature, input_shapes, r) for r in (small, large)}
    extra = []
    for _ in range(2):
        for rows in (small, large):
            started = time.perf_counter()
            loaded.session.run(names, feeds[rows])
            extra.append(time.perf_counter() - started - run_s[rows])
    return max(0.0, float(np.median(extra)))
