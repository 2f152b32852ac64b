"""Clients that stream infer requests while a server is stopped: what a graceful stop must
survive, for the server in a container (test_image.py) and outside one
(tests/service/test_container.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np


def stream_during_stop(
    url: str, model: str, x: np.ndarray, stop: Callable[[], int], clients: int = 4
) -> dict:
    """`clients` threads send infer requests back to back on keep-alive connections while
    `stop()` stops the server and returns its exit code. A refused connection ends a thread
    (the server stopped accepting), and so does a `Connection: close` answer; a reset, a
    disconnect without an answer or a 5xx is a failure."""
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    stop_at: list[float] = []
    failures: list[str] = []
    answered_after = [0]
    sent_before_stop = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            first = True
            while True:
                started = time.monotonic()
                try:
                    r = c.post(f"/v2/models/{model}/infer", content=body)
                except httpx.ConnectError:
                    return
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    return
                finally:
                    if first:
                        first = False
                        sent_before_stop.wait()
                with lock:
                    if r.status_code != 200:
                        failures.append(f"{r.status_code}: {r.text[:200]}")
                    elif stop_at and started < stop_at[0] and time.monotonic() > stop_at[0]:
                        answered_after[0] += 1
                if r.headers.get("connection") == "close":
                    return  # the server said it would take no more on this connection

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    sent_before_stop.wait()
    time.sleep(0.3)
    stop_at.append(time.monotonic())
    exit_code = stop()
    stop_s = time.monotonic() - stop_at[0]
    for t in threads:
        t.join(30)
    return {
        "failures": failures,
        "answered_after_stop": answered_after[0],
        "clients": clients,
        "exit_code": exit_code,
        "stop_s": round(stop_s, 2),
    }
