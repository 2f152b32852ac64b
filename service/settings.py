"""The service's one settings class.

Every field can be set from the environment as ``BNFOLD_<FIELD>`` (``BNFOLD_PORT=9000``,
``BNFOLD_REQUIRE_GPU=1``); the command line overrides the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "BNFOLD_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

MiB = 1 << 20
CUDNN_CONV_ALGO_SEARCH = ("HEURISTIC", "EXHAUSTIVE", "DEFAULT")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # the v2 GRPCInferenceService (service/grpc/), on the same host, models, batchers and
    # metrics as HTTP; 0 turns it off
    grpc_port: int = 8001
    store: Path = field(default_factory=lambda: Path("bnfold-store"))
    api_token: str | None = None  # None: read from the store, or generate one there
    require_gpu: bool = False  # refuse to start / deploy when CUDA is not the provider in use
    deploy_defaults: bool = True  # a fresh store gets the zoo's default models
    # replicas sharing one store: one writer; the others read it and follow its deployments
    store_readonly: bool = False  # never write the store; refuse uploads and deletes (403)
    store_poll_s: float = 5.0  # a read-only replica re-reads the store this often
    log_level: str = "info"  # debug, info, warning, error
    log_format: str = "text"  # or json: one object per line (the container's default)
    # FastAPI's native OpenTelemetry (spans, metrics, logs to a configured SDK provider); off
    # by default: its per-request checks cost more than the whole infer fast path's routing
    opentelemetry: bool = False
    # set by the container image (Dockerfile), not by users: "full", or "slim", which has no
    # torch, so serves but cannot fold an upload; "" outside an image
    image_variant: str = ""

    # limits, all enforced before the memory is spent
    max_upload_bytes: int = 256 * MiB  # POST /v1/models body
    max_request_bytes: int = 64 * MiB  # any other request body
    max_tensor_elements: int = 1 << 24  # per input tensor
    max_batch_size: int = 64  # advertised in /config and enforced on a variable batch dim

    # dynamic batching: the defaults of every model; an upload can set its own
    dynamic_batching: bool = True  # off: every request is its own onnxruntime run
    max_queue_delay_ms: float = 1.0  # how long a request may wait for others to join it
    max_queue: int = 128  # infer requests waiting per model; beyond it, 503 with Retry-After
    intra_op_threads: int = 0  # onnxruntime threads per run; 0: its default (physical cores)
    # whether onnxruntime's intra-op threads spin, waiting for work, after a run (onnxruntime's
    # default) instead of sleeping. Off: spinning threads hold their cores against the event
    # loop, the other models' sessions, the drift monitor and anything else on the machine
    # (ResNet-18 served beside another onnxruntime process on 2 cores: p50 28-29 ms spinning,
    # 11 ms not); alone, spinning was 1-2% faster at concurrency 1 and equal at 32
    # (docs/BENCHMARKS.md "Request overhead")
    intra_op_spinning: bool = False
    # how the CUDA provider picks convolution algorithms: EXHAUSTIVE (onnxruntime's default)
    # benchmarks every algorithm for each new input shape, hundreds of ms per shape that
    # dynamic batching meets at every new batch size; HEURISTIC asks cuDNN's heuristics
    cudnn_conv_algo_search: str = "HEURISTIC"  # or EXHAUSTIVE, DEFAULT
    # batch buckets (service/runtime/buckets.py): "auto" pads batches to a few sizes, each with
    # its own warmed session, for models that re-plan at a new batch size (convolutions on
    # CUDA); "off"; or sizes such as "1,2,4,8" for every batched model, on any provider
    batch_buckets: str = "auto"
    # how a bucket's session runs: "off" (session.run), "on" (IO binding, pinned host buffers
    # on CUDA), "cuda_graph" (IO binding and a CUDA graph; CUDA only, else IO binding)
    io_binding: str = "off"
    infer_fast_path: bool = True  # infer requests skip FastAPI's routing (routes/infer_asgi.py)
    coalesce_writes: bool = True  # a response's header and body in one write (http_protocol.py)

    # drift monitoring (service/drift/): a fraction of infer requests runs, off the request
    # path, through each model's observer graph; windows are compared with the BN statistics
    drift_sample: float = 0.01  # fraction of infer requests sampled; 0 turns monitoring off
    drift_window: int = 32  # samples (rows) per window; defaults: docs/BENCHMARKS.md "Drift"
    drift_threshold: float = 0.1  # a full window scoring above it is drifting
    drift_queue: int = 64  # sampled requests waiting for the monitor; more are dropped, counted
    # sampled rows kept in memory per model for recalibrate source=traffic; 0 keeps none (the
    # default: they are user data); never logged, never written to disk
    drift_keep_samples: int = 0
    drift_keep_bytes: int = 16 * MiB  # and at most this many bytes of them per model

    # the ingest worker: one process per upload, with resource limits
    worker_timeout_s: float = 300.0  # wall clock
    worker_cpu_s: int = 300  # RLIMIT_CPU
    worker_memory_bytes: int = 8 << 30  # RLIMIT_AS
    worker_concurrency: int = 2  # worker processes at once; further uploads wait their turn
    worker_queue: int = 8  # uploads allowed to wait for a worker; beyond it, 503

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``BNFOLD_*`` variables, then ``overrides`` that are not None."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "store" in values:
            values["store"] = Path(values["store"])
        search = values.get("cudnn_conv_algo_search", cls.cudnn_conv_algo_search).upper()
        if search not in CUDNN_CONV_ALGO_SEARCH:
            raise ValueError(
                f"{ENV_PREFIX}CUDNN_CONV_ALGO_SEARCH={search!r} is not one of "
                + ", ".join(CUDNN_CONV_ALGO_SEARCH)
            )
        values["cudnn_conv_algo_search"] = search
        from service.runtime.buckets import IO_BINDING, parse_spec  # numpy only: cheap

        parse_spec(values.get("batch_buckets", cls.batch_buckets))  # ValueError if malformed
        binding = str(values.get("io_binding", cls.io_binding)).lower()
        if binding not in IO_BINDING:
            raise ValueError(f"{ENV_PREFIX}IO_BINDING={binding!r} is not one of {IO_BINDING}")
        values["io_binding"] = binding
        for name, lowest, what in (
            ("port", 0, f"port (--port, {ENV_PREFIX}PORT; 0: any free port)"),
            ("grpc_port", 0, f"gRPC port ({ENV_PREFIX}GRPC_PORT; 0: no gRPC server)"),
        ):
            port = int(values.get(name, getattr(cls, name)))
            if not lowest <= port <= 65535:
                raise ValueError(f"{what} {port}: use {lowest} to 65535")
        sample = float(values.get("drift_sample", cls.drift_sample))
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"{ENV_PREFIX}DRIFT_SAMPLE={sample!r} must be between 0 and 1")
        return cls(**values)


def _parse(name: str, type_: Any, raw: str) -> Any:
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    try:
        if type_name == "bool":
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {type_name}") from None
    if type_name == "str | None":
        return raw or None
    return raw
