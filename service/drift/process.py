"""The monitor's own process: ``DriftWindows`` behind a pipe.

The server's side (``service.drift.monitor``) starts this with multiprocessing's ``spawn``
(a fresh interpreter: no inherited sockets, no forked threads) and talks to it over one duplex
``Connection`` in tuples:

    server -> monitor   ("observe", [Sample, ...])
                        ("forget", name)
                        ("call", id, method, args)        method: "report" or "kept_samples"
    monitor -> server   ("observed", {name: (rows, DriftResult)})
                        ("reply", id, ok, value)          not ok: value = (kind, message)
                        ("log", level, logger name, text)

Observing in a process of its own is what keeps the reply path free: the observer's Python
(moments, pooling, scoring) never holds the server's GIL, and the process runs at a lower
priority than the server (docs/BENCHMARKS.md "Drift"). Log lines go to the server, which
writes them with its own format. The process ends when the pipe closes.
"""

from __future__ import annotations

import logging
import os
from multiprocessing.connection import Connection

from service.drift.windows import DriftWindows, Unmonitorable
from service.settings import Settings

# below the server's priority: on a busy machine the monitor falls behind and drops samples
# (counted) rather than taking CPU from replies
NICENESS = 10


class _ToServer(logging.Handler):
    """Log records sent to the server, formatted with their traceback."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn = conn
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(("log", record.levelno, record.name, self.format(record)))
        except (OSError, ValueError):
            pass  # the server is gone: nothing to tell


def serve(conn: Connection, settings: Settings) -> None:
    """The process's main loop; returns when the server closes the pipe."""
    try:
        os.nice(NICENESS)
    except OSError:
        pass
    root = logging.getLogger()
    root.handlers[:] = [_ToServer(conn)]
    root.setLevel(logging.INFO)
    windows = DriftWindows(settings)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "observe":
            changed = windows.observe(message[1])
            if changed:
                conn.send(("observed", changed))
        elif kind == "forget":
            windows.forget(message[1])
        elif kind == "call":
            _, call_id, method, args = message
            conn.send(("reply", call_id, *_call(windows, method, args)))
        elif kind == "stop":
            return


def _call(windows: DriftWindows, method: str, args: tuple) -> tuple[bool, object]:
    try:
        if method == "report":
            return True, windows.report(*args)
        if method == "kept_samples":
            return True, windows.kept_samples(*args)
        return False, ("failed", f"unknown call {method!r}")
    except Unmonitorable as exc:
        return False, ("unmonitorable", str(exc))
    except Exception as exc:  # told to the caller, never the end of the monitor
        logging.getLogger("service.drift").exception("drift: %s failed", method)
        return False, ("failed", f"{type(exc).__name__}: {exc}")
