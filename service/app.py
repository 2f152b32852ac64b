"""The application factory: ``create_app(settings)`` wires store, runtime, handlers and routes.

Nothing heavy happens at import or in the factory. At start-up (lifespan) the store is
recovered and the token resolved; loading the deployed models, and on a fresh store deploying
the zoo's defaults, runs in the background while ``/v2/health/live`` already answers and
``/v2/health/ready`` says 503 until it is done.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import service
from service.auth import TOKEN_FILE, load_or_create_token
from service.drift import DriftMonitor
from service.errors import ServiceError, install_error_handlers
from service.grpc import server as grpc_server_module
from service.handlers import InferenceService, ModelService
from service.limits import BodyLimitMiddleware
from service.metrics import ServiceMetrics
from service.routes import drift, health, inference, models
from service.routes import metrics as metrics_route
from service.routes.infer_asgi import InferFastPath
from service.runtime.registry import ModelRegistry
from service.runtime.sessions import CUDA, available_providers
from service.settings import Settings
from service.store import ModelStore

logger = logging.getLogger(__name__)

_NO_TELEMETRY = {"tracing": False, "metrics": False, "logs": False}
DEFAULT_MODELS = ("mlp_bn_after_act", "resnet_small")  # models.DEFAULT_MODELS, without torch


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    store = ModelStore(settings.store)
    registry = ModelRegistry()
    metrics = ServiceMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # a read-only replica must not clean up what the writer has in progress
        try:
            deployed = await run_in_threadpool(
                store.deployed if settings.store_readonly else store.recover
            )
            token, created = load_or_create_token(store.root, settings.api_token)
        except OSError as exc:  # a store path that cannot be made, read or written
            app.state.startup_error = f"the store {store.root}: {_os_reason(exc)}"
            raise
        if created:
            print(
                f"bnfold: generated API token (kept in {store.root / TOKEN_FILE}):\n{token}",
                file=sys.stderr,
                flush=True,
            )
        app.state.api_token = token
        handlers = ModelService(settings, store, registry, metrics)
        app.state.models = handlers
        app.state.inference = InferenceService(settings, registry, metrics)
        # a monitor always, for models whose upload sets drift_sample; its thread starts with
        # the first sampled request
        monitor = DriftMonitor(settings, store.original_path)
        handlers.drift = app.state.inference.drift = monitor
        metrics.watch_drift(monitor)
        # raises under require_gpu without CUDA; otherwise says where models will run
        try:
            provider = await run_in_threadpool(handlers.sessions.probe)
        except ServiceError as exc:
            app.state.startup_error = exc.message
            raise
        if provider == CUDA:
            logger.info("execution provider: %s (GPU)", provider)
        else:
            logger.warning(
                "execution provider: %s: no usable GPU (%s; onnxruntime offers %s), serving on "
                "the CPU",
                provider,
                handlers.sessions.cpu_reason or "CUDA not tried",
                ", ".join(available_providers()),
            )
        # gRPC beside HTTP, in this event loop: the same models, batchers and metrics
        grpc_server = None
        if settings.grpc_port:
            try:
                grpc_server = await grpc_server_module.start(settings, app.state)
            except grpc_server_module.GrpcStartError as exc:
                app.state.startup_error = str(exc)
                raise
        task = asyncio.create_task(_warm_up(app, handlers, deployed))
        try:
            yield
        finally:
            task.cancel()
            if grpc_server is not None:
                await grpc_server_module.stop(grpc_server)
            handlers.executor.shutdown(wait=False, cancel_futures=True)
            if handlers.drift is not None:
                handlers.drift.stop()

    app = FastAPI(
        title="bnfold service",
        version=service.__version__,
        description="POST a trained model: it is folded, verified and served over KServe v2.",
        lifespan=lifespan,
        telemetry=None if settings.opentelemetry else _NO_TELEMETRY,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.ready = False
    app.state.not_ready_reason = "starting"
    install_error_handlers(app)
    app.state.startup_error = None
    # the last added is the outermost: body limits apply to the infer fast path too
    app.add_middleware(InferFastPath, state=app.state, enabled=settings.infer_fast_path)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=settings.max_request_bytes,
        limits={("POST", "/v1/models"): settings.max_upload_bytes},
    )
    app.add_middleware(StartupErrorMessage, state=app.state)
    app.include_router(health.router)
    app.include_router(inference.router)
    app.include_router(models.router)
    app.include_router(drift.router)
    app.include_router(metrics_route.router)
    return app


def _os_reason(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return f"{reason}: {exc.filename}" if exc.filename else reason


class StartupErrorMessage:
    """A start-up refused for a reason the operator can act on (require_gpu without CUDA, the
    gRPC port taken, a store that cannot be made or written) is reported as that one line:
    Starlette hands uvicorn the whole traceback as the failure's message, which uvicorn logs.
    Other failures keep their traceback."""

    def __init__(self, app, *, state) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "lifespan":
            return await self.app(scope, receive, send)

        async def send_clean(message):
            reason = self.state.startup_error
            if message["type"] == "lifespan.startup.failed" and reason:
                message = {**message, "message": f"bnfold cannot start: {reason}"}
            await send(message)

        return await self.app(scope, receive, send_clean)


async def _warm_up(app: FastAPI, handlers: ModelService, deployed) -> None:
    state = app.state
    state.not_ready_reason = "loading the deployed models"
    await run_in_threadpool(handlers.load, deployed)
    store = handlers.store
    if handlers.settings.store_readonly:
        state.ready = True
        state.not_ready_reason = ""
        logger.info("ready (read-only store): %d model(s) loaded", len(handlers.registry.all()))
        while True:  # follow the writer's deployments
            await asyncio.sleep(max(0.1, handlers.settings.store_poll_s))
            try:
                await run_in_threadpool(handlers.sync)
            except OSError as exc:
                logger.error("store: cannot read the shared store: %s", exc)
    if store.is_fresh():
        if handlers.settings.deploy_defaults:
            state.not_ready_reason = "deploying the default models"
            failures = await handlers.deploy_defaults(list(DEFAULT_MODELS))
            for failure in failures:
                logger.error("default model not deployed (retried next start): %s", failure)
            if not failures:
                await run_in_threadpool(store.mark_initialized)
        else:
            await run_in_threadpool(store.mark_initialized)
    state.ready = True
    state.not_ready_reason = ""
    logger.info("ready: %d model(s) loaded", len(handlers.registry.all()))
