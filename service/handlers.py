"""Transport-free handlers: what the routes call. Data flows one way,
upload -> ingest (worker) -> store -> runtime registry."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import shutil
import time
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from starlette.concurrency import run_in_threadpool

import service
from service.drift import DriftMonitor
from service.errors import Forbidden, NotFound, ServiceError, Unprocessable, first_line
from service.ingest import Ingestor, IngestResult
from service.metrics import ServiceMetrics
from service.protocol import v2
from service.runtime import bucket_sessions
from service.runtime.batcher import Batcher, Timing, policy_for
from service.runtime.buckets import AUTO, parse_spec, sizes_for
from service.runtime.registry import LoadedModel, ModelRegistry
from service.runtime.sessions import (
    CUDA,
    LoadedSession,
    ModelLoadError,
    SessionFactory,
    gpu_divergence,
)
from service.settings import Settings
from service.store import ModelStore, StoredModel, validate_name

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5


@dataclass
class UploadRequest:
    name: str
    upload: Path  # the uploaded file, in a scratch directory of the store
    architecture: str | None = None  # zoo:NAME (or NAME), torchvision:NAME, timm:NAME
    arch_args: dict[str, Any] | None = None  # constructor arguments, checked by the worker
    input_shape: Any = None
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL
    batching: dict[str, Any] | None = None  # max_batch_size, max_queue_delay_ms for this model
    # bnfold.optimize: {"budget": {...}, "calibration": file name in the scratch dir or None}
    optimize: dict[str, Any] | None = None
    drift_sample: float | None = None  # this model's drift sampling rate; None: the server's

    def job(self) -> dict[str, Any]:
        return {
            "job": "optimize" if self.optimize is not None else "fold",
            "optimize": self.optimize,
            "kind": "safetensors" if self.architecture else "onnx",
            "architecture": self.architecture,
            "arch_args": self.arch_args,
            "input_shape": self.input_shape,
            "rtol": self.rtol,
            "atol": self.atol,
        }


class ModelService:
    """Deploy, list, delete; loads the store at start."""

    def __init__(
        self,
        settings: Settings,
        store: ModelStore,
        registry: ModelRegistry,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.metrics = metrics
        self.drift: DriftMonitor | None = None  # set by create_app
        self.sessions = SessionFactory(
            settings.require_gpu,
            settings.intra_op_threads,
            settings.cudnn_conv_algo_search,
            settings.intra_op_spinning,
        )
        self.ingestor = Ingestor(settings)
        # onnxruntime runs off the event loop; each model's batcher has one run at a time
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="onnxruntime")
        self._name_locks: dict[str, asyncio.Lock] = {}

    # -- start-up ----------------------------------------------------------------------------
    def load(self, deployed: list[StoredModel]) -> None:
        """Build sessions for what the store holds (after ``store.recover()``)."""
        for stored in deployed:
            try:
                self.registry.put(self._load(stored))
            except (ModelLoadError, ServiceError) as exc:
                logger.error("store: cannot load %s %s: %s", stored.name, stored.version, exc)

    def _load(self, stored: StoredModel) -> LoadedModel:
        record = stored.record
        runtime = self._session(
            str(stored.model_path), record.get("batching"), record.get("input_shapes")
        )
        return self._loaded(stored.name, stored.version, record, runtime)

    def _session(
        self,
        model: bytes | str,
        batching: dict[str, Any] | None,
        input_shapes: dict[str, list[int]] | None,
    ) -> LoadedSession:
        """A session for ``model`` and, when the settings or its upload ask for them, its batch
        buckets, each warmed (batcher.py case 7, buckets.py rule 3)."""
        runtime = self.sessions.create(model)
        batching = batching or {}
        spec = parse_spec(batching.get("batch_buckets") or self.settings.batch_buckets)
        max_batch = int(batching.get("max_batch_size") or self.settings.max_batch_size)
        sizes = sizes_for(spec, max_batch, runtime.replans_on_new_batch)
        if not sizes or not runtime.signature.batched:
            return runtime
        return bucket_sessions.add_buckets(
            self.sessions,
            runtime,
            model,
            sizes,
            choose=spec == AUTO,
            io_binding=self.settings.io_binding,
            input_shapes=input_shapes,
        )

    def _loaded(
        self, name: str, version: str, record: dict[str, Any], runtime: LoadedSession
    ) -> LoadedModel:
        policy = policy_for(
            self.settings,
            runtime.signature,
            record.get("batching"),
            runtime.replans_on_new_batch,
            tuple(runtime.buckets),
            runtime.bucket_report,
        )
        on_batch = self.metrics.batch_observer(name) if self.metrics else None
        batcher = Batcher(
            name, runtime, policy, self.executor, on_batch, expected_run=_deploy_timing(record)
        )
        return LoadedModel(name, version, record, runtime, batcher)

    @asynccontextmanager
    async def scratch(self, prefix: str) -> AsyncIterator[Path]:
        """A private directory in the store's tmp/ for one upload, removed afterwards."""
        path = await run_in_threadpool(self.store.scratch_dir, prefix)
        try:
            yield path
        finally:
            await run_in_threadpool(shutil.rmtree, path, True)

    async def deploy_defaults(self, architectures: list[str]) -> list[str]:
        """Deploy zoo models under their own names, each in its own worker, in parallel.
        Returns what failed, one line per model."""

        async def one(arch: str) -> None:
            async with self.scratch(f"zoo-{arch}-") as scratch:
                result = await self.ingestor.run(scratch, {"kind": "zoo", "architecture": arch})
                await self._commit(arch, result)

        outcomes = await asyncio.gather(*(one(a) for a in architectures), return_exceptions=True)
        return [
            f"{arch}: {exc}"
            for arch, exc in zip(architectures, outcomes, strict=True)
            if isinstance(exc, Exception)
        ]

    def sync(self) -> None:
        """A read-only replica follows the writer: load new current versions, drop deleted."""
        current = {m.name: m for m in self.store.deployed()}
        for name, stored in current.items():
            loaded = self.registry.find(name)
            if loaded is None or loaded.version != stored.version:
                try:
                    self.registry.put(self._load(stored))
                    logger.info("store: now serving %s version %s", name, stored.version)
                except (ModelLoadError, ServiceError) as exc:
                    logger.error("store: cannot load %s %s: %s", name, stored.version, exc)
        for model in self.registry.all():
            if model.name not in current:
                self.registry.remove(model.name)
                logger.info("store: %s was deleted", model.name)

    def _writable(self) -> None:
        if self.settings.store_readonly:
            raise Forbidden(
                "this replica serves the shared store read-only (BNFOLD_STORE_READONLY); "
                "deploy and delete through the writer replica"
            )

    def check_can_ingest(self) -> None:
        """Uploads and recalibrations run the worker, which folds with torch: the slim image
        (BNFOLD_IMAGE_VARIANT=slim) has none, so it refuses them before reading any byte."""
        self._writable()
        if self.settings.image_variant == "slim":
            full = f"bnfold:{service.__version__}"
            raise Forbidden(
                f"this is the serving-only image ({full}-slim, without torch): it cannot fold "
                f"uploads; upload to a server running the full image {full} and serve its store "
                "here with BNFOLD_STORE_READONLY=1"
            )

    # -- management --------------------------------------------------------------------------
    async def deploy(self, request: UploadRequest) -> LoadedModel:
        self.check_can_ingest()
        validate_name(request.name)
        result = await self.ingestor.run(request.upload.parent, request.job())
        if request.drift_sample is not None:
            result.result["drift_sample"] = request.drift_sample
        return await self._commit(request.name, result, request.batching)

    async def _commit(
        self, name: str, result: IngestResult, batching: dict[str, Any] | None = None
    ) -> LoadedModel:
        folded = await run_in_threadpool(result.folded_path.read_bytes)
        version = hashlib.sha256(folded).hexdigest()[:16]
        try:
            runtime = await run_in_threadpool(
                self._session, folded, batching, result.result["input_shapes"]
            )
        except ModelLoadError as exc:
            raise Unprocessable(f"the folded graph cannot be served: {exc}") from None
        info = result.result
        record = {
            "name": name,
            "version": version,
            "platform": "onnxruntime_onnx",
            "source": info["source"],
            "input_shapes": info["input_shapes"],
            "fold_report": info["fold_report"],
            "verification": info["verification"],
            "savings": info.get("savings") or {},
            "gpu_divergence": None,
            "batching": batching or {},
            "deployed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        record.update(info.get("lineage") or {})  # a recalibration: recalibrated_from, data used
        record["precision"] = info.get("precision") or _exact_precision(runtime)
        if info.get("drift_sample") is not None:
            record["drift_sample"] = info["drift_sample"]
        if info.get("optimization"):
            record["optimization"] = info["optimization"]
        if runtime.provider == CUDA:
            try:
                record["gpu_divergence"] = await run_in_threadpool(
                    gpu_divergence, str(result.original_path), runtime, info["input_shapes"]
                )
            except Exception as exc:  # a measurement, not a reason to refuse the model
                logger.warning("GPU divergence of %s not measured: %s", name, exc)
                record["gpu_divergence"] = {"error": first_line(exc)}
        lock = self._name_locks.setdefault(name, asyncio.Lock())
        async with lock:
            original = result.original_path if result.original_path.is_file() else None
            await run_in_threadpool(
                self.store.deploy, name, version, result.folded_path, record, original
            )
            model = self._loaded(name, version, record, runtime)
            self.registry.put(model)
            # under the lock: a concurrent deploy's new directory is not yet current
            await run_in_threadpool(self.store.prune, name)
        logger.info("deployed %s version %s on %s", name, version, runtime.provider)
        return model

    async def delete(self, name: str) -> None:
        self._writable()
        validate_name(name)
        lock = self._name_locks.setdefault(name, asyncio.Lock())
        async with lock:
            await run_in_threadpool(self.store.delete, name)
            self.registry.remove(name)
            if self.drift is not None:
                self.drift.forget(name)

    def onnx_path(self, name: str) -> Path:
        validate_name(name)
        model = self.registry.get(name)
        return self.store.get(model.name).model_path

    # -- drift: recalibrate and roll back ------------------------------------------------------
    async def recalibrate(self, name: str, scratch: Path, job: dict[str, Any]) -> LoadedModel:
        """Re-estimate the BN statistics of the current version on the data in
        ``scratch/upload`` (or the kept traffic samples), fold, verify, deploy a new version."""
        self.check_can_ingest()
        validate_name(name)
        self.registry.get(name)
        stored = await run_in_threadpool(self.store.get, name)
        if not stored.original_path.is_file():
            raise Unprocessable(
                f"model {name!r} version {stored.version} has no original graph in the store "
                "(deployed before originals were kept): upload it again to recalibrate"
            )
        if job.get("format") == "traffic":
            await run_in_threadpool(self._traffic_data, name, scratch / "upload")
            job["format"] = "npz"
        await run_in_threadpool(shutil.copyfile, stored.original_path, scratch / "base.onnx")
        job = {**job, "job": "recalibrate", "input_shapes": stored.record.get("input_shapes")}
        result = await self.ingestor.run(scratch, job)
        result.result["source"] = stored.record.get("source", {})
        result.result["lineage"] = {
            "recalibrated_from": stored.version,
            "recalibration": result.result.pop("recalibration"),
        }
        return await self._commit(name, result, stored.record.get("batching"))

    def _traffic_data(self, name: str, target: Path) -> None:
        import numpy as np

        if self.drift is None or self.settings.drift_keep_samples <= 0:
            raise Forbidden(
                "source=traffic needs sampled requests kept: set BNFOLD_DRIFT_KEEP_SAMPLES "
                "(and BNFOLD_DRIFT_SAMPLE > 0), or send the data as a file"
            )
        arrays, count = self.drift.kept_samples(name)
        if count == 0:
            raise Unprocessable(f"no sampled requests of {name!r} are kept yet")
        with open(target, "wb") as out:
            np.savez(out, **arrays)

    async def rollback(self, name: str) -> LoadedModel:
        """Serve the previous version again (the current one becomes the previous)."""
        self._writable()
        validate_name(name)
        lock = self._name_locks.setdefault(name, asyncio.Lock())
        async with lock:
            target = await run_in_threadpool(self.store.previous, name)
            model = await run_in_threadpool(self._load, target)  # before the switch
            await run_in_threadpool(self.store.rollback, name)
            self.registry.put(model)
        logger.info("rolled %s back to version %s", name, model.version)
        return model


class InferenceService:
    def __init__(
        self, settings: Settings, registry: ModelRegistry, metrics: ServiceMetrics | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.drift: DriftMonitor | None = None  # set by create_app

    def model(self, name: str, version: str | None = None) -> LoadedModel:
        model = self.registry.get(name)
        if version is not None and version != model.version:
            raise NotFound(f"model {name!r} has no version {version!r} (serving {model.version})")
        return model

    def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """The v2 model metadata document (HTTP answers it as it is, gRPC as its message)."""
        model = self.model(name, version)
        return v2.model_metadata(
            model.name,
            model.version,
            model.runtime.signature,
            model.runtime.provider,
            model.record.get("precision") or {"precision": model.precision},
        )

    def config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration, with the model's dynamic batching."""
        model = self.model(name, version)
        policy = model.batcher.policy
        config = v2.model_config(model.name, model.runtime.signature, policy.max_batch_size)
        if policy.enabled:
            delay_us = int(policy.max_queue_delay_ms * 1000)
            config["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
        return config

    async def infer(
        self, name: str, version: str | None, body: bytes, header_length: str | None
    ) -> tuple[bytes, int | None]:
        """One HTTP infer request: the reply's body and, for binary outputs, its JSON length."""
        model = self.model(name, version)  # held for the whole request: a swap cannot touch it
        return await self.measured(model, self._infer_http(model, body, header_length))

    async def measured(self, model: LoadedModel, work: Awaitable[tuple[T, Timing]]) -> T:
        """Await one request's ``work`` (decode, run, encode), counted in the model's metrics
        whatever the transport; failures by the status their error carries."""
        if self.metrics is None:
            reply, _ = await work
            return reply
        started = time.perf_counter()
        series = self.metrics.series(model.name)
        series.requests.inc()
        try:
            reply, timing = await work
        except ServiceError as exc:
            self.metrics.failures.labels(model.name, str(exc.status_code)).inc()
            raise
        except Exception:
            self.metrics.failures.labels(model.name, "500").inc()
            raise
        series.queue_seconds.observe(timing.queue_s)
        series.compute_seconds.observe(timing.compute_s)
        series.total_seconds.observe(time.perf_counter() - started)
        return reply

    async def run(
        self, model: LoadedModel, request: v2.InferRequest
    ) -> tuple[dict[str, np.ndarray], Timing]:
        """A decoded request through the model's batcher (shared by every transport), then
        offered to the drift monitor."""
        names = [o.name for o in request.outputs]
        results, timing = await model.batcher.infer(request.inputs, names)
        if self.drift is not None:  # a coin flip and a non-blocking put: the reply never waits
            self.drift.offer(
                model.name, model.version, request.inputs, model.record.get("drift_sample")
            )
        return results, timing

    def max_batch_size(self, model: LoadedModel) -> int:
        """The batch a request may carry, checked while decoding (0: not a batched model)."""
        return model.batcher.policy.max_batch_size if model.runtime.signature.batched else 0

    async def _infer_http(
        self, model: LoadedModel, body: bytes, header_length: str | None
    ) -> tuple[tuple[bytes, int | None], Timing]:
        signature = model.runtime.signature
        length = v2.parse_header_length(header_length, len(body))
        decode = functools.partial(
            v2.decode_request,
            body,
            length,
            signature,
            max_elements=self.settings.max_tensor_elements,
            max_batch_size=self.max_batch_size(model),
        )
        # parsing a large JSON tensor takes milliseconds: off the loop, so health stays quick
        json_part = len(body) if length is None else length
        heavy = json_part > _LOOP_JSON_BYTES
        request = await run_in_threadpool(decode) if heavy else decode()
        results, timing = await self.run(model, request)
        encode = functools.partial(
            v2.encode_response, model.name, model.version, request.id, results, request.outputs
        )
        json_values = sum(results[o.name].size for o in request.outputs if not o.binary)
        reply = await run_in_threadpool(encode) if json_values > _LOOP_JSON_VALUES else encode()
        return reply, timing


def _exact_precision(runtime: LoadedSession) -> dict[str, Any]:
    """What a model deployed without ``optimize`` is served in: the exact fold, as uploaded."""
    floats = [s.datatype for s in runtime.signature.inputs if s.datatype.startswith(("FP", "BF"))]
    return {
        "precision": (floats[0] if floats else "FP32").lower(),
        "candidate": "folded",
        "why": "optimize was not requested: the exact fold is served",
        "verified": "to rtol/atol against the original (an exact fold)",
    }


def _deploy_timing(record: dict[str, Any]) -> tuple[int, float] | None:
    """(input elements, seconds) of the folded graph's run timed by the ingest worker."""
    savings = record.get("savings") or {}
    seconds, shapes = savings.get("folded_latency_s"), savings.get("input_shapes")
    if not isinstance(seconds, int | float) or seconds <= 0 or not isinstance(shapes, dict):
        return None
    try:
        elements = sum(math.prod(int(d) for d in shape) for shape in shapes.values())
    except (TypeError, ValueError):
        return None
    return (elements, float(seconds)) if elements > 0 else None


# above these, JSON is parsed or written in a thread rather than on the event loop
_LOOP_JSON_BYTES = 64 << 10
_LOOP_JSON_VALUES = 4096
