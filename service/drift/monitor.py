"""The server's side of the drift monitor: sampling on the request path, observing elsewhere.

``offer`` is what the inference path calls once a reply is ready: a coin flip at the model's
sampling rate and, for the chosen few, an append to a bounded list (a full list drops the
sample and counts it). A sender thread lets samples gather for ``GATHER_S`` and ships them, a
batch at a time, to the monitor's own process (``service.drift.process``), which observes and
scores them; a receiver thread takes back the scores, counts and log lines. Nothing in this
process runs an observer graph, pools moments or scores a window: that Python held the GIL
that the event loop needs (docs/BENCHMARKS.md "Drift").

The process starts with the first sampled request (or the first read of a drift report), and
again after it dies; the counters here (``sampled``, ``dropped``) survive a restart, its
windows and kept samples do not.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
import threading
import time
from dataclasses import replace
from typing import Any

import numpy as np

from service.drift.windows import Sample
from service.errors import ServiceError
from service.settings import Settings

logger = logging.getLogger("service.drift")

__all__ = ["GATHER_S", "DriftMonitor", "DriftUnavailable", "MonitorUnavailable"]

GATHER_S = 0.05  # how long samples gather before the sender thread ships them
CALL_TIMEOUT_S = 60.0  # a report's first call builds the observer (an onnxruntime session)
RESTART_DELAY_S = 5.0  # after the process dies or fails to start: no restart storm


class DriftUnavailable(ServiceError):
    """The model cannot be monitored (no original graph kept, no BatchNorm statistics)."""

    status_code = 409


class MonitorUnavailable(ServiceError):
    """The monitor's process did not answer (it died, or is starting again)."""

    status_code = 503


class _Call:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False
        self.value: Any = None


class DriftMonitor:
    def __init__(self, settings: Settings, original_path) -> None:
        """``original_path(name, version)`` says where the store keeps a version's original."""
        self.settings = settings
        self._original_path = original_path
        self._random = random.Random()
        self._pending: list[tuple[str, str, dict[str, np.ndarray]]] = []
        self._wake = threading.Condition()
        self._sender: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()  # the process, its pipe and the calls in flight
        self._process: Any = None
        self._conn: Any = None
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._scores: dict[str, float] = {}  # each model's latest window score
        self.sampled: dict[str, int] = {}  # rows observed, per model
        self.dropped: dict[str, int] = {}  # samples dropped on a full list, per model
        self._not_before = 0.0  # monotonic time before which no new process starts

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
        if self._sender is None:
            self.start()
        with self._wake:
            if len(self._pending) >= max(1, self.settings.drift_queue):
                self.dropped[name] = self.dropped.get(name, 0) + 1
                return
            self._pending.append((name, version, inputs))
            if len(self._pending) == 1:
                self._wake.notify()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the sender thread (the first sampled request does); the process starts with
        the first batch it sends."""
        with self._wake:
            if self._sender is None and not self._stopping:
                self._sender = threading.Thread(
                    target=self._send_loop, name="drift-sender", daemon=True
                )
                self._sender.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._sender is not None:
            self._sender.join(timeout=5)
            self._sender = None
        with self._lock:
            process, conn = self._process, self._conn
            self._process = self._conn = None
        if conn is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        if process is not None:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        if conn is not None:
            conn.close()

    def forget(self, name: str) -> None:
        """A deleted model: drop its pending samples, window and kept samples."""
        with self._wake:
            self._pending = [p for p in self._pending if p[0] != name]
        self._scores.pop(name, None)
        with self._lock:
            if self._conn is not None:
                self._send_locked(("forget", name))

    # -- the sender thread ---------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            # let the samples of the next GATHER_S gather: one wake-up and one send for all
            time.sleep(GATHER_S)
            with self._wake:
                batch, self._pending = self._pending, []
            try:
                sent = self._ship(batch)
            except MonitorUnavailable:  # waiting out the restart delay: dropped, counted
                sent = False
            except Exception:  # the sender must outlive anything: logged, the batch dropped
                logger.exception("drift: shipping %d samples to the monitor failed", len(batch))
                sent = False
            if not sent:
                for name, _, _ in batch:
                    self.dropped[name] = self.dropped.get(name, 0) + 1

    def _ship(self, batch: list[tuple[str, str, dict[str, np.ndarray]]]) -> bool:
        paths: dict[tuple[str, str], str] = {}
        samples = []
        for name, version, inputs in batch:
            if (name, version) not in paths:
                paths[name, version] = str(self._original_path(name, version))
            samples.append(Sample(name, version, paths[name, version], inputs))
        with self._lock:
            self._ensure_process()
            return self._send_locked(("observe", samples))

    # -- the process ---------------------------------------------------------------------------
    def _ensure_process(self) -> None:
        """Start the monitor process if none runs; under ``_lock``."""
        if self._process is not None and self._process.is_alive():
            return
        wait = self._not_before - time.monotonic()
        if wait > 0:
            raise MonitorUnavailable(
                f"the drift monitor process ended; a new one starts in {wait:.0f} s"
            )
        self._not_before = time.monotonic() + RESTART_DELAY_S  # until this start succeeds
        from service.drift.process import serve

        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe(duplex=True)
        # only what the windows need: the token and the rest stay in the server
        fields = ("drift_window", "drift_threshold", "drift_keep_samples", "drift_keep_bytes")
        keep = {f: getattr(self.settings, f) for f in fields}
        process = context.Process(
            target=serve,
            args=(theirs, replace(Settings(), **keep)),
            name="bnfold-drift",
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._conn = process, ours
        logger.info("drift: monitor process started (pid %d)", process.pid)
        receiver = threading.Thread(
            target=self._receive_loop, args=(process, ours), name="drift-receiver", daemon=True
        )
        receiver.start()
        self._not_before = 0.0

    def _send_locked(self, message: tuple) -> bool:
        try:
            self._conn.send(message)
            return True
        except (OSError, ValueError):  # the process is gone; its receiver says so
            return False

    def _receive_loop(self, process, conn) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "observed":
                for name, (rows, result) in message[1].items():
                    self.sampled[name] = self.sampled.get(name, 0) + rows
                    self._scores[name] = result.score
            elif kind == "reply":
                _, call_id, ok, value = message
                call = self._calls.get(call_id)
                if call is not None:
                    call.ok, call.value = ok, value
                    call.done.set()
            elif kind == "log":
                _, level, name, text = message
                logging.getLogger(name).log(level, "%s", text)
        process.join(timeout=5)
        with self._lock:
            if self._process is process:
                self._process = self._conn = None
                if not self._stopping:
                    self._not_before = time.monotonic() + RESTART_DELAY_S
            calls, self._calls = self._calls, {}
        for call in calls.values():
            call.ok, call.value = False, ("down", "the drift monitor process ended")
            call.done.set()
        if not self._stopping:
            logger.warning(
                "drift: the monitor process (pid %s) ended with exit code %s; a new one, with "
                "empty windows, starts with the first sample after %.0f s",
                process.pid, process.exitcode, RESTART_DELAY_S,
            )  # fmt: skip

    def _call(self, method: str, *args) -> Any:
        call = _Call()
        with self._lock:
            self._ensure_process()
            call_id = next(self._ids)
            self._calls[call_id] = call
            sent = self._send_locked(("call", call_id, method, args))
        answered = sent and call.done.wait(CALL_TIMEOUT_S)
        self._calls.pop(call_id, None)
        if not answered:
            raise MonitorUnavailable(
                "the drift monitor process did not answer; try again (a new one is starting)"
            )
        if call.ok:
            return call.value
        kind, message = call.value
        if kind == "unmonitorable":
            raise DriftUnavailable(f"model {args[0]!r} cannot be monitored: {message}")
        if kind == "down":
            raise MonitorUnavailable(f"{message}; try again (a new one is starting)")
        raise ServiceError(f"the drift monitor failed: {message}")

    # -- reading -------------------------------------------------------------------------------
    def report(self, name: str, version: str):
        """The model's latest window score (building its observer if no sample came yet)."""
        return self._call("report", name, version, str(self._original_path(name, version)))

    def scores(self) -> dict[str, float]:
        """Each model's latest window score, as the monitor process last sent it."""
        return dict(self._scores)

    def kept_samples(self, name: str) -> tuple[dict[str, np.ndarray], int]:
        """The kept sampled rows of a model, concatenated per input, and how many."""
        return self._call("kept_samples", name)
