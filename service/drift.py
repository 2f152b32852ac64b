"""The drift monitor: sampled infer requests through each model's observer graph, off the
request path.

``offer`` is what the inference path calls once a reply is encoded: a coin flip at the
model's sampling rate and, for the chosen few, a ``put_nowait`` on a bounded queue (a full
queue drops the sample and counts it). One background thread takes samples off the queue and
runs them through the observer graph of the version that served them (``bnfold.drift``: the
original graph, kept by the store next to the folded one, with each BatchNormalization's input
moments as outputs), and keeps per model a window of the last ``drift_window`` sampled rows.
Its ``DriftDetector`` (fitted on the original's running statistics) scores the window; a log
line says when a model starts and stops drifting.

Where ``drift_keep_samples`` allows it, the sampled rows are also kept, in memory only and
bounded in count and bytes, for ``POST /v1/models/{name}/recalibrate`` with
``source=traffic``. They are never logged.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import ServiceError
from service.settings import Settings

if TYPE_CHECKING:  # bnfold is imported when the first model is observed, not with the app
    from bnfold.drift import DriftDetector, DriftResult

logger = logging.getLogger(__name__)

GATHER_S = 0.05  # how long the monitor thread lets samples gather before it observes them


class DriftUnavailable(ServiceError):
    """The model cannot be monitored (no original graph kept, no BatchNorm statistics)."""

    status_code = 409


@dataclass
class _Window:
    version: str
    detector: DriftDetector | None
    session: Any  # bnfold.drift.ObserverSession
    unavailable: str | None = None
    entries: deque = field(default_factory=deque)  # (rows, {site: ChannelMoments})
    rows: int = 0
    result: DriftResult | None = None
    unscored_rows: int = 0  # rows observed since `result` was computed


@dataclass
class _Kept:
    rows: deque = field(default_factory=deque)  # (rows, bytes, {input: array})
    count: int = 0
    nbytes: int = 0


class DriftMonitor:
    def __init__(self, settings: Settings, original_path) -> None:
        """``original_path(name, version)`` says where the store keeps a version's original."""
        self.settings = settings
        self._original_path = original_path
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, settings.drift_queue))
        self._windows: dict[str, _Window] = {}
        self._kept: dict[str, _Kept] = {}
        self.sampled: dict[str, int] = {}  # rows observed, per model
        self.dropped: dict[str, int] = {}  # samples dropped on a full queue, per model
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._random = random.Random()

    # -- the request path ----------------------------------------------------------------------
    def rate_of(self, record: dict[str, Any]) -> float:
        """A model's sampling rate: its upload's ``drift_sample``, else BNFOLD_DRIFT_SAMPLE."""
        rate = record.get("drift_sample")
        return self.settings.drift_sample if rate is None else rate

    def offer(
        self, name: str, version: str, inputs: dict[str, np.ndarray], rate: float | None = None
    ) -> None:
        """Maybe sample one request; never blocks, never raises."""
        rate = self.settings.drift_sample if rate is None else rate
        if rate <= 0 or self._random.random() >= rate:
            return
        if self._thread is None:
            self.start()
        try:
            self._queue.put_nowait((name, version, inputs))
        except queue.Full:
            self.dropped[name] = self.dropped.get(name, 0) + 1

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the monitor thread (the first sampled request does, when none is running)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            try:
                self._queue.put(None, timeout=1)
            except queue.Full:
                pass  # a daemon thread: it ends with the process
            self._thread.join(timeout=5)
            self._thread = None

    def forget(self, name: str) -> None:
        """A deleted model: drop its window and kept samples."""
        with self._lock:
            self._windows.pop(name, None)
            self._kept.pop(name, None)

    # -- the monitor thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            # let the samples of the next GATHER_S queue up without waking this thread for each:
            # every wake-up takes the GIL from the event loop (docs/BENCHMARKS.md "Drift")
            if first is not None:
                time.sleep(GATHER_S)
            items = [first]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is None for item in items)
            for name, version, inputs in (i for i in items if i is not None):
                try:
                    self._observe(name, version, inputs)
                except Exception:  # a monitor must never take the service down
                    logger.exception("drift: observing a sample of %s failed", name)
            if stop:
                return

    def _observe(self, name: str, version: str, inputs: dict[str, np.ndarray]) -> None:
        from bnfold.drift import ChannelMoments

        with self._lock:
            window = self._window(name, version)
        if window.unavailable:
            return
        first = next(iter(inputs.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        moments = {
            site: ChannelMoments.of(mean, var, count)
            for site, (mean, var, count) in window.session.moments(inputs).items()
        }
        size = self.settings.drift_window
        with self._lock:
            if self._windows.get(name) is not window:
                return  # redeployed meanwhile
            window.entries.append((rows, moments))
            window.rows += rows
            while len(window.entries) > 1 and window.rows - window.entries[0][0] >= size:
                window.rows -= window.entries.popleft()[0]
            self.sampled[name] = self.sampled.get(name, 0) + rows
            self._keep(name, rows, inputs)
            # scoring pools the whole window (445 us for 32 one-row samples of the digits CNN,
            # against 51 us for the observer run): done every quarter window, and on every read
            window.unscored_rows += rows
            if window.result is not None and window.unscored_rows < max(1, size // 4):
                return
            was = window.result.drifting if window.result else False
            self._rescore(window)
        now = window.result
        if now.drifting and not was:
            logger.warning(
                "drift: model %s version %s started drifting: score %.3f > threshold %.3f over "
                "the last %d samples",
                name, version, now.score, now.threshold, now.samples,
            )  # fmt: skip
        elif was and not now.drifting:
            logger.warning(
                "drift: model %s version %s stopped drifting: score %.3f <= threshold %.3f",
                name, version, now.score, now.threshold,
            )  # fmt: skip

    def _rescore(self, window: _Window) -> DriftResult:
        """Score the window if samples came since its last score; under lock."""
        if window.result is None or window.unscored_rows:
            window.result = self._score(window)
            window.unscored_rows = 0
        return window.result

    def _score(self, window: _Window) -> DriftResult:
        pooled: dict[str, Any] = {}  # site -> ChannelMoments
        for _, moments in window.entries:
            for site, part in moments.items():
                pooled[site] = part if site not in pooled else pooled[site] + part
        return window.detector.score(pooled, window.rows)

    def _keep(self, name: str, rows: int, inputs: dict[str, np.ndarray]) -> None:
        limit, byte_limit = self.settings.drift_keep_samples, self.settings.drift_keep_bytes
        nbytes = sum(a.nbytes for a in inputs.values())
        if limit <= 0 or rows > limit or nbytes > byte_limit:
            return
        kept = self._kept.setdefault(name, _Kept())
        kept.rows.append((rows, nbytes, {k: np.array(v, copy=True) for k, v in inputs.items()}))
        kept.count += rows
        kept.nbytes += nbytes
        while kept.count > limit or kept.nbytes > byte_limit:
            old_rows, old_bytes, _ = kept.rows.popleft()
            kept.count -= old_rows
            kept.nbytes -= old_bytes

    # -- building a model's observer -------------------------------------------------------------
    def _window(self, name: str, version: str) -> _Window:
        """The model's window for ``version`` (a new version starts a new window); under lock."""
        window = self._windows.get(name)
        if window is None or window.version != version:
            window = self._windows[name] = self._build(name, version)
        return window

    def _build(self, name: str, version: str) -> _Window:
        import onnx

        from bnfold.drift import DriftDetector, ObserverSession, SiteReference, observer_graph

        path = Path(self._original_path(name, version))
        if not path.is_file():
            why = "the store keeps no original graph for this version (deployed before it did)"
            return _Window(version, None, None, why)
        observer = observer_graph(onnx.load(str(path)))
        if not observer.sites:
            return _Window(version, None, None, "the model has no BatchNorm running statistics")
        detector = DriftDetector(
            [SiteReference(s.name, s.mean, s.var, s.eps) for s in observer.sites],
            self.settings.drift_threshold,
            self.settings.drift_window,
        )
        return _Window(version, detector, ObserverSession(observer))

    # -- reading -------------------------------------------------------------------------------
    def report(self, name: str, version: str) -> DriftResult:
        """The model's latest window score (building its observer if no sample came yet)."""
        with self._lock:
            window = self._window(name, version)
            if window.unavailable:
                raise DriftUnavailable(f"model {name!r} cannot be monitored: {window.unavailable}")
            if not window.entries:
                return window.detector.score({}, 0)
            return self._rescore(window)

    def scores(self) -> dict[str, float]:
        with self._lock:
            return {
                n: self._rescore(w).score
                for n, w in self._windows.items()
                if w.result is not None and not w.unavailable
            }

    def kept_samples(self, name: str) -> tuple[dict[str, np.ndarray], int]:
        """The kept sampled rows of a model, concatenated per input, and how many."""
        with self._lock:
            kept = self._kept.get(name)
            parts = [inputs for _, _, inputs in kept.rows] if kept else []
        if not parts:
            return {}, 0
        by_shape: dict[tuple, list] = {}
        for inputs in parts:  # rows of one shape only: the most recent shape wins
            key = tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(inputs.items()))
            by_shape.setdefault(key, []).append(inputs)
        chosen = by_shape[
            tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(parts[-1].items()))
        ]
        arrays = {k: np.concatenate([p[k] for p in chosen]) for k in chosen[0]}
        return arrays, int(next(iter(arrays.values())).shape[0])
