"""Latency of candidate graphs on this machine, so that only the graphs decide.

Measured here (2 cores, shared): two sessions of the *same* ResNet-18 graph, intra-op
spinning on (onnxruntime's default), timed interleaved: the first-created one is 14-18% slower.
Spinning threads of one session steal the core the other needs. With spinning off the A/A
ratio is 0.94-1.00. So:

1. every session is made with the serving options, intra-op (and inter-op) spinning off;
2. runs are interleaved, one run of every session per round, in orders from `run_orders`:
   rotated by one each round so that every session takes every place equally often, the
   direction flipping every full rotation so that no session always follows the same
   neighbour, and never the same session twice in a row across a round boundary. (The order
   used before, forward and backward alternating, ran the first and the last session twice
   in a row at every turn: with four sessions of MobileNetV3-Large at batch 1, those two
   measured 1.5-3.3% faster than the two in the middle, the same graph in every place;
   rotated, the four were within 0.98-1.02 of each other with no pattern by place);
3. half the rounds run on sessions created in the given order, half on fresh sessions
   created in the reverse order, so creation order cannot decide;
4. per round, each session's time over the reference's in that same round (load from
   neighbours hits both halves of a pair alike); the median over rounds is the ratio.

`aa_ratio` times two sessions of one graph the same way: a method is trusted when it gives
about 1.0 there.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["aa_ratio", "make_session", "run_orders", "session_options", "time_interleaved"]


def session_options(threads: int | None = None, *, spinning: bool = False) -> ort.SessionOptions:
    """The options candidates are timed and served with (threads None: onnxruntime's default)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    flag = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", flag)
    options.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return options


def make_session(
    model: onnx.ModelProto | bytes, threads: int | None = None, *, spinning: bool = False
) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(
        data, session_options(threads, spinning=spinning), providers=["CPUExecutionProvider"]
    )


def run_orders(count: int, rounds: int) -> list[list[int]]:
    """Step 2: the order of `count` sessions in each of `rounds` rounds (indices).

    Rounds come in blocks of `count`: within a block the order is rotated by one each round,
    so every session takes every place once; every other block rotates the reversed order,
    so a session follows its other neighbour. With three or more sessions no session runs
    twice in a row across a round boundary; two sessions simply alternate.
    """
    if count <= 2:
        return [
            list(range(count)) if r % 2 == 0 else list(range(count))[::-1] for r in range(rounds)
        ]
    orders = []
    for r in range(rounds):
        base = list(range(count)) if (r // count) % 2 == 0 else list(range(count))[::-1]
        k = r % count
        orders.append(base[k:] + base[:k])
    return orders


def _rounds(sessions: dict, feeds: Mapping[str, np.ndarray], rounds: int, times: dict) -> None:
    names = list(sessions)
    for name in names:  # warm-up: allocations, first-run planning
        for _ in range(2):
            sessions[name].run(None, feeds)
    for indices in run_orders(len(names), rounds):  # step 2
        for name in (names[i] for i in indices):
            start = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - start)


def time_interleaved(
    models: Mapping[str, onnx.ModelProto | bytes],
    feeds: Mapping[str, np.ndarray],
    *,
    reference: str | None = None,
    threads: int | None = None,
    rounds: int = 20,
    spinning: bool = False,
) -> dict[str, dict]:
    """{name: {"median_ms", "ratio"}}: ratio is the median paired time over `reference`'s."""
    names = list(models)
    reference = reference or names[0]
    data = {n: m if isinstance(m, bytes) else m.SerializeToString() for n, m in models.items()}
    times: dict[str, list[float]] = {n: [] for n in names}
    first = max(1, rounds // 2)
    for order, count in ((names, first), (names[::-1], rounds - first)):  # step 3
        if count <= 0:
            continue
        sessions = {n: make_session(data[n], threads, spinning=spinning) for n in order}
        _rounds(sessions, feeds, count, times)
        del sessions
    out = {}
    for name in names:
        ratios = [t / r for t, r in zip(times[name], times[reference], strict=True)]  # step 4
        out[name] = {
            "median_ms": 1e3 * statistics.median(times[name]),
            "ratio": statistics.median(ratios),
            "rounds": len(ratios),
        }
    return out


def aa_ratio(
    model: onnx.ModelProto | bytes,
    feeds: Mapping[str, np.ndarray],
    *,
    threads: int | None = None,
    rounds: int = 20,
    spinning: bool = False,
    creation_orders: bool = True,
) -> float:
    """Median paired time of the first-created session of `model` over the second's.

    With `creation_orders=False` both sessions live through all rounds in creation order:
    the naive method, the one that shows the spinning artefact.
    """
    data = model if isinstance(model, bytes) else model.SerializeToString()
    if creation_orders:
        # "A" is created first in the first half and second in the second half, so the ratio
        # is about 1 whatever creation order does
        return time_interleaved(
            {"A": data, "B": data},
            feeds,
            threads=threads,
            rounds=rounds,
            spinning=spinning,
            reference="B",
        )["A"]["ratio"]
    sessions = {n: make_session(data, threads, spinning=spinning) for n in ("A", "B")}
    times: dict[str, list[float]] = {"A": [], "B": []}
    _rounds(sessions, feeds, rounds, times)
    return statistics.median(a / b for a, b in zip(times["A"], times["B"], strict=True))
