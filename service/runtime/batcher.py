"""Dynamic batching: concurrent infer requests to one model run as one onnxruntime call.

Each deployed model has one ``Batcher``. A request is queued; the batcher's loop takes the oldest
request, adds every queued request with the same non-batch shapes that still fits
``max_batch_size`` rows, waits up to ``max_queue_delay`` (counted from the oldest request's
arrival) for more while the batch is not full, concatenates the inputs along dimension 0, runs
onnxruntime once in a worker thread and slices the outputs back per request.

1. Exactness: onnxruntime computes each row of a batch-independent model with the same kernels
   whatever the batch size, so a request's slice is bit-identical to running it alone (tested).
   A model is batched only when every input and output has a variable first dimension; a model
   whose outputs do not come back with the batch's row count is run request by request instead.
2. One run at a time per model: the loop awaits its run, and requests that arrive meanwhile form
   the next batch, so batches grow with load even with no delay configured.
3. The queue is bounded: past ``max_queue`` waiting requests, ``infer`` raises 503 with a
   ``Retry-After`` hint instead of growing memory.
4. A failing batch is re-run request by request, so one bad request fails alone.
5. The delay is spent only when company is likely: when other requests were already queued or
   the previous run served several. A lone request on an idle model runs at once, so batching
   adds nothing to latency at concurrency 1.
6. onnxruntime runs in a worker thread, so that health checks and uploads stay responsive,
   except runs expected to take under ``INLINE_RUN_S`` (0.5 ms): for those the thread hop
   costs more than the run, so they run on the event loop. The estimate is the cheapest of
   the model's last 8 runs and of the run timed at deploy time (one thread, in the record),
   scaled up linearly when the new run has more input elements (never down). Runs timed in
   the worker include its wait for the GIL, so they only ever raise the estimate above the
   cheapest; larger dynamic dimensions scale it up. A model with no deploy-time timing starts
   with no estimate, so its first run is in a thread. Such a run does not wait for company
   either (case 5's delay): what it could save is less than the wait; requests already queued
   still share it.
7. On the GPU, onnxruntime's CUDA provider re-plans every convolution at each change of batch
   size, so a model with convolutions runs in batch buckets (``buckets.py``): a batch is padded
   up to the smallest bucket that holds it, written straight into that bucket's host buffers
   when it has them (IO binding), run in the bucket's own session, which keeps its plans, and
   cut back to its rows before any reply. Case 1 holds for the real rows: the padding repeats
   the last row and is never sliced into a reply. A model for which no buckets could be built
   is not batched unless its upload asks (``GPU_REPLANS``). ``batch_buckets`` turns buckets on
   for any model (the CPU tests use it) or off.

The loop runs only while requests wait: a batcher left behind by a redeployment finishes what
it holds and leaves nothing running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import BadRequest, ServiceError, ServiceUnavailable, first_line
from service.protocol.v2 import Signature
from service.runtime.buckets import bucket_for, pad, unpad
from service.runtime.sessions import LoadedSession
from service.settings import Settings

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
# runs expected to be shorter than this go on the event loop: handing a run to a worker thread
# and back costs 0.17-0.26 ms on an idle 2-core benchmark machine, and under load the worker
# then waits for the GIL the busy event loop holds (a 20 us MLP run measured 130-200 us there)
INLINE_RUN_S = 0.5e-3


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # rows per onnxruntime run, and per request on a batched model
    max_queue_delay_ms: float  # how long the oldest request may wait for others
    max_queue: int  # requests allowed to wait; beyond it, 503
    enabled: bool  # False: every request runs alone (no batch dimension, or turned off)
    reason: str | None = None  # why batching is off, when the model could have had it
    buckets: tuple[int, ...] = ()  # case 7: every run padded to one of these sizes; () exact
    # what the warm-up measured and chose (bucket_sessions.add_buckets), for the model's record
    bucket_report: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "dynamic_batching": self.enabled,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_ms": self.max_queue_delay_ms,
            "max_queue": self.max_queue,
            "batch_buckets": list(self.buckets),
        }
        if self.reason:
            out["reason"] = self.reason
        if self.bucket_report:
            out["bucket_warmup"] = self.bucket_report
        return out


# onnxruntime's CUDA provider re-plans a convolution whenever its input shape differs from the
# previous run's, including shapes it has seen before: on an H100, ResNet-18 runs took 35-50 ms
# with the heuristic cuDNN search (210-300 ms exhaustive) when the batch size changed from one
# run to the next, against 0.6-0.7 ms at a steady size (docs/BENCHMARKS.md "GPU")
GPU_REPLANS = (
    "off on the GPU for this model: onnxruntime's CUDA provider re-plans every convolution "
    "when the batch size changes (35-50 ms per change measured on an H100, against 0.7 ms for "
    "a ResNet-18 run), more than batching saves; upload with dynamic_batching=true to force it"
)


def policy_for(
    settings: Settings,
    signature: Signature,
    overrides: Mapping[str, Any] | None = None,
    replans_on_new_batch: bool = False,
    buckets: Sequence[int] = (),
    bucket_report: dict[str, Any] | None = None,
) -> BatchPolicy:
    """The settings' defaults, then what the model's upload asked for (``record["batching"]``).
    Batching is off for a model whose tensors do not all have a variable first dimension, and,
    unless its upload asked for it, for a model whose session re-plans its kernels at every new
    batch size (``LoadedSession.replans_on_new_batch``: convolutions on the GPU) and that has
    no ``buckets`` (its warmed bucket sizes, case 7) to keep them; its largest bucket caps the
    batch."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    max_batch = int(overrides.get("max_batch_size", settings.max_batch_size))
    buckets = tuple(sorted(buckets))
    if buckets:
        max_batch = min(max_batch, buckets[-1])
        replans_on_new_batch = False  # each bucket's session keeps its own plans
    delay = float(overrides.get("max_queue_delay_ms", settings.max_queue_delay_ms))
    enabled = settings.dynamic_batching and signature.batched and max_batch > 1
    asked = overrides.get("dynamic_batching")
    reason = None
    if enabled and asked is False:
        enabled, reason = False, "off for this model: its upload asked for dynamic_batching=false"
    elif enabled and replans_on_new_batch and asked is not True:
        enabled, reason = False, GPU_REPLANS
    return BatchPolicy(
        max(1, max_batch),
        max(0.0, delay),
        max(1, settings.max_queue),
        enabled,
        reason,
        buckets,
        bucket_report,
    )


@dataclass(frozen=True)
class Timing:
    queue_s: float  # from arrival to the start of the run that served it
    compute_s: float  # that onnxruntime run
    batch_rows: int  # rows in that run


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    rows: int
    key: tuple  # what must agree to share a run: every input's shape past dim 0 and dtype
    elements: int  # in all its inputs
    future: asyncio.Future
    arrived: float


class Batcher:
    def __init__(
        self,
        name: str,
        runtime: LoadedSession,
        policy: BatchPolicy,
        executor: Executor,
        on_batch: Callable[[int, float], None] | None = None,  # rows, compute seconds
        inline_below_s: float = INLINE_RUN_S,
        expected_run: tuple[int, float] | None = None,  # (input elements, seconds) measured
    ) -> None:
        self.name = name
        self.runtime = runtime
        self.policy = policy
        self._executor = executor
        self._waiting: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.on_batch = on_batch
        self._last_requests = 0  # requests in the previous run
        # (input elements, onnxruntime seconds) of the last runs, for case 6's estimate
        self._recent_runs: deque[tuple[int, float]] = deque(maxlen=8)
        self.inline_below_s = inline_below_s
        self._expected_run = expected_run  # at deploy time, on one thread: case 6's first guess

    @property
    def depth(self) -> int:
        """Requests waiting for a run (not counting the one running)."""
        return len(self._waiting)

    async def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: list[str]
    ) -> tuple[dict[str, np.ndarray], Timing]:
        if len(self._waiting) >= self.policy.max_queue:
            raise ServiceUnavailable(
                f"model {self.name!r} has {len(self._waiting)} requests queued (the limit); "
                f"retry in {RETRY_AFTER_S} s",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        loop = asyncio.get_running_loop()
        first = next(iter(inputs.values()))
        rows = first.shape[0] if first.ndim else 1
        key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(inputs.items()))
        arrived = time.perf_counter()
        size = sum(a.size for a in inputs.values())
        pending = _Pending(dict(inputs), outputs, rows, key, size, loop.create_future(), arrived)
        self._waiting.append(pending)
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._drain(), name=f"batcher-{self.name}")
        return await pending.future

    # -- the loop ----------------------------------------------------------------------------
    async def _drain(self) -> None:
        while self._waiting:
            batch = self._take(None, self.policy.max_batch_size)
            if not batch:
                continue  # only cancelled requests were left
            rows = sum(p.rows for p in batch)
            company = len(batch) > 1 or self._waiting or self._last_requests > 1  # case 5
            cheap = self._runs_inline(sum(p.elements for p in batch))  # case 6
            if self.policy.enabled and self.policy.max_queue_delay_ms > 0 and company and not cheap:
                deadline = batch[0].arrived + self.policy.max_queue_delay_ms / 1e3
                while rows < self.policy.max_batch_size:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        pass
                    more = self._take(batch[0].key, self.policy.max_batch_size - rows)
                    batch += more
                    rows += sum(p.rows for p in more)
            self._last_requests = len(batch)
            try:
                await self._execute(batch)
            except Exception as exc:  # never leave a request hanging
                logger.exception("batch on %s failed", self.name)
                _fail(batch, ServiceError(f"inference failed: {first_line(exc)}"))

    def _take(self, key: tuple | None, capacity: int) -> list[_Pending]:
        """Queued requests, oldest first, that share ``key`` (the oldest's, if None) and fit."""
        batch: list[_Pending] = []
        kept: deque[_Pending] = deque()
        while self._waiting:
            p = self._waiting.popleft()
            if p.future.done():  # the client went away
                continue
            if key is None:
                key = p.key
            fits = not batch or (self.policy.enabled and p.rows <= capacity)
            if p.key == key and fits:
                batch.append(p)
                capacity -= p.rows
                if capacity <= 0 or not self.policy.enabled:
                    break
            else:
                kept.append(p)
        kept.extend(self._waiting)
        self._waiting = kept
        return batch

    async def _execute(self, batch: list[_Pending], bucketed: bool = True) -> None:
        loop = asyncio.get_running_loop()
        names = _union(p.outputs for p in batch)
        rows = sum(p.rows for p in batch)
        bucket = bucket_for(rows, self.policy.buckets) if bucketed else None
        if bucket is not None:  # case 7: padded into the bucket's own buffers where it has them
            staging = self.runtime.staging(bucket) or {}
            inputs = {
                n: pad([p.inputs[n] for p in batch], bucket, staging.get(n))
                for n in batch[0].inputs
            }
        elif len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {n: np.concatenate([p.inputs[n] for p in batch]) for n in batch[0].inputs}
        run_rows = bucket or rows
        elements = sum(p.elements for p in batch) * run_rows // max(1, rows)
        try:
            if self._runs_inline(elements):
                results, started, compute = self._run(inputs, names)
            else:
                results, started, compute = await loop.run_in_executor(
                    self._executor, self._run, inputs, names
                )
        except Exception as exc:
            if len(batch) > 1:  # find the request at fault: each alone
                for p in batch:
                    await self._execute([p])
                return
            _fail(batch, exc)
            return
        self._learn(elements, compute)
        follows = all(v.ndim and v.shape[0] == run_rows for v in results.values())
        if (len(batch) > 1 or run_rows != rows) and not follows:
            logger.warning("%s: outputs do not follow the batch rows; running alone", self.name)
            for p in batch:  # alone, and a padded request alone without its padding
                await self._execute([p], bucketed=len(batch) > 1)
            return
        if run_rows != rows:
            results = unpad(results, rows)  # the padding never reaches a reply
        if self.on_batch is not None:
            self.on_batch(rows, compute)
        start = 0
        for p in batch:
            if not p.future.done():
                if len(batch) == 1:
                    out = {n: results[n] for n in p.outputs}
                else:
                    out = {n: results[n][start : start + p.rows] for n in p.outputs}
                p.future.set_result((out, Timing(started - p.arrived, compute, rows)))
            start += p.rows

    def _runs_inline(self, elements: int) -> bool:
        """Case 6: a run expected to take less than a thread hop runs on the event loop."""
        runs = list(self._recent_runs)
        if self._expected_run is not None:
            runs.append(self._expected_run)
        if not runs:
            return False
        expected = min(s * max(1.0, elements / max(1, n)) for n, s in runs)
        return expected < self.inline_below_s

    def _learn(self, elements: int, compute_s: float) -> None:
        self._recent_runs.append((elements, compute_s))

    def _run(
        self, inputs: dict[str, np.ndarray], names: list[str]
    ) -> tuple[dict[str, np.ndarray], float, float]:
        """Outputs, when the run started, and how long it took (timed where it runs, so that
        a thread hop counts as queueing, not compute)."""
        try:
            started = time.perf_counter()
            results = self.runtime.run(inputs, names)
            return results, started, time.perf_counter() - started
        except ServiceError:
            raise
        except Exception as exc:  # onnxruntime's own error types
            message = first_line(exc)
            if "INVALID_ARGUMENT" in message or "Invalid" in message:
                raise BadRequest(f"the model rejected the inputs: {message}") from None
            logger.exception("inference failed on %s", self.name)
            raise ServiceError(
                "inference failed inside onnxruntime; the server log has details"
            ) from None


def _union(lists) -> list[str]:
    seen: dict[str, None] = {}
    for names in lists:
        seen.update(dict.fromkeys(names))
    return list(seen)


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)
