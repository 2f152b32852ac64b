"""Per model, the window of the last sampled rows and its drift score; no transport, no threads.

``observe`` takes a batch of sampled requests (name, version, original graph's path, inputs),
runs each model's rows through the observer graph of the version that served them
(``bnfold.drift``: the original graph with each BatchNormalization's input moments as outputs)
and keeps per model a window of the last ``drift_window`` rows, one entry a request. A
``DriftDetector`` fitted on the original's running statistics scores each window that changed,
once a batch; a log line says when a model starts and stops drifting.

Where ``drift_keep_samples`` allows it, the sampled rows are also kept, in memory only and
bounded in count and bytes, for ``POST /v1/models/{name}/recalibrate`` with
``source=traffic``. They are never logged.

This runs in the monitor's own process (``service.drift.process``), never in the server's.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from service.settings import Settings

if TYPE_CHECKING:
    from bnfold.drift import DriftDetector, DriftResult

logger = logging.getLogger("service.drift")

__all__ = ["DriftWindows", "Sample", "Unmonitorable"]


class Unmonitorable(Exception):
    """A version the monitor cannot observe; the message says why."""


class Sample(NamedTuple):
    name: str
    version: str
    original: str  # path of the version's original graph in the store
    inputs: dict[str, np.ndarray]


@dataclass
class _Window:
    version: str
    detector: DriftDetector | None
    session: Any  # bnfold.drift.ObserverSession
    unavailable: str | None = None
    entries: deque = field(default_factory=deque)  # (rows, {site: ChannelMoments})
    rows: int = 0
    result: DriftResult | None = None


@dataclass
class _Kept:
    rows: deque = field(default_factory=deque)  # (rows, bytes, {input: array})
    count: int = 0
    nbytes: int = 0


class DriftWindows:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._windows: dict[str, _Window] = {}
        self._kept: dict[str, _Kept] = {}

    def observe(self, samples: list[Sample]) -> dict[str, tuple[int, DriftResult]]:
        """Observe a batch of samples, each its own entry of its model's window, then score each
        window that changed; by model: (rows observed, its window's score). A sample
        that cannot be observed is logged and skipped, never raised."""
        observed: dict[str, tuple[str, int]] = {}
        for sample in samples:
            try:
                rows = self._observe(sample)
            except Exception:  # a monitor must never take the service down
                logger.exception("drift: observing a sample of %s failed", sample.name)
                continue
            if rows:
                before = observed.get(sample.name, (sample.version, 0))[1]
                observed[sample.name] = (sample.version, before + rows)
        changed = {}
        for name, (version, rows) in observed.items():
            window = self._windows.get(name)
            if window is not None and window.version == version:
                # pooling and scoring a window costs ~0.5 ms of Python, more than observing a
                # sample: once a batch, in this process, never in the server's
                self._rescore(name, window)
                changed[name] = (rows, window.result)
        return changed

    def _observe(self, sample: Sample) -> int:
        from bnfold.drift import ChannelMoments

        window = self._window(sample.name, sample.version, sample.original)
        if window.unavailable:
            return 0
        first = next(iter(sample.inputs.values()))
        rows = int(first.shape[0]) if first.ndim else 1
        moments = {
            site: ChannelMoments.of(mean, var, count)
            for site, (mean, var, count) in window.session.moments(sample.inputs).items()
        }
        size = self.settings.drift_window
        window.entries.append((rows, moments))
        window.rows += rows
        while len(window.entries) > 1 and window.rows - window.entries[0][0] >= size:
            window.rows -= window.entries.popleft()[0]
        self._keep(sample.name, rows, sample.inputs)
        return rows

    def _rescore(self, name: str, window: _Window) -> None:
        was = window.result.drifting if window.result else False
        window.result = now = self._score(window)
        if now.drifting and not was:
            logger.warning(
                "drift: model %s version %s started drifting: score %.3f > threshold %.3f over "
                "the last %d samples",
                name, window.version, now.score, now.threshold, now.samples,
            )  # fmt: skip
        elif was and not now.drifting:
            logger.warning(
                "drift: model %s version %s stopped drifting: score %.3f <= threshold %.3f",
                name, window.version, now.score, now.threshold,
            )  # fmt: skip

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
        kept.rows.append((rows, nbytes, inputs))
        kept.count += rows
        kept.nbytes += nbytes
        while kept.count > limit or kept.nbytes > byte_limit:
            old_rows, old_bytes, _ = kept.rows.popleft()
            kept.count -= old_rows
            kept.nbytes -= old_bytes

    def forget(self, name: str) -> None:
        """A deleted model: drop its window and kept samples."""
        self._windows.pop(name, None)
        self._kept.pop(name, None)

    # -- building a model's observer -------------------------------------------------------------
    def _window(self, name: str, version: str, original: str) -> _Window:
        """The model's window for ``version`` (a new version starts a new window)."""
        window = self._windows.get(name)
        if window is None or window.version != version:
            window = self._windows[name] = self._build(version, Path(original))
        return window

    def _build(self, version: str, path: Path) -> _Window:
        import onnx

        from bnfold.drift import DriftDetector, ObserverSession, SiteReference, observer_graph

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
    def report(self, name: str, version: str, original: str) -> DriftResult:
        """The model's latest window score (building its observer if no sample came yet);
        raises ``Unmonitorable`` when the version cannot be monitored."""
        window = self._window(name, version, original)
        if window.unavailable:
            raise Unmonitorable(window.unavailable)
        if window.result is None:
            return window.detector.score({}, 0)
        return window.result

    def kept_samples(self, name: str) -> tuple[dict[str, np.ndarray], int]:
        """The kept sampled rows of a model, concatenated per input, and how many."""
        kept = self._kept.get(name)
        parts = [inputs for _, _, inputs in kept.rows] if kept else []
        if not parts:
            return {}, 0
        by_shape: dict[tuple, list] = {}
        for inputs in parts:  # rows of one shape only: the most recent shape wins
            by_shape.setdefault(_row_key(inputs), []).append(inputs)
        chosen = by_shape[_row_key(parts[-1])]
        arrays = {k: np.concatenate([p[k] for p in chosen]) for k in chosen[0]}
        return arrays, int(next(iter(arrays.values())).shape[0])


def _row_key(inputs: dict[str, np.ndarray]) -> tuple:
    """What must agree for rows to be concatenated: names, per-row shapes, dtypes."""
    return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(inputs.items()))
