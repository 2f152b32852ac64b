"""The v2 ``GRPCInferenceService``: each method converts its message, calls the handlers the
HTTP routes call, and converts the answer back.

Errors: a ``ServiceError`` ends the call with the status code of ``GRPC_STATUS`` for its HTTP
status (NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE for a full queue, ...) and its message; a
503's ``Retry-After`` goes into the trailing metadata as ``retry-after``. Anything else is
logged and ends the call as INTERNAL with a fixed message: no stack trace reaches a client,
and a user's mistake is never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from starlette.concurrency import run_in_threadpool

import service
from service.errors import NotFound, ServiceError, ServiceUnavailable, first_line
from service.grpc import converters, health_pb2
from service.grpc import v2_pb2 as pb
from service.handlers import InferenceService

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
# HTTP status of a ServiceError -> gRPC status code
GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}
# above this many typed-contents values, a request is converted in a thread, off the loop
_LOOP_TYPED_VALUES = 4096
_INTERNAL = "internal server error; the server log has the details"


def status_of(exc: ServiceError) -> grpc.StatusCode:
    return GRPC_STATUS.get(exc.status_code, grpc.StatusCode.INTERNAL)


class InferenceServicer:
    """The methods, over the app's state (``inference``, ``ready``, ``not_ready_reason``)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    @property
    def inference(self) -> InferenceService:
        inference = getattr(self.state, "inference", None)
        if inference is None:
            raise ServiceUnavailable("starting")
        return inference

    # -- health and metadata -------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.state.ready))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="bnfold", version=service.__version__, extensions=["binary_tensor_data"]
        )

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        # as Triton answers it: a model that is not there is not ready (HTTP says 404)
        try:
            self.inference.model(request.name, request.version or None)
        except (NotFound, ServiceUnavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context):
        document = self.inference.metadata(request.name, request.version or None)
        return converters.model_metadata(document)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context):
        document = self.inference.config(request.name, request.version or None)
        return converters.model_config(document)

    # -- inference -----------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        inference = self.inference
        model = inference.model(request.model_name, request.model_version or None)
        return await inference.measured(model, self._infer(inference, model, request))

    async def _infer(self, inference: InferenceService, model, request: pb.ModelInferRequest):
        decode = functools.partial(
            converters.decode_request,
            request,
            model.runtime.signature,
            max_elements=inference.settings.max_tensor_elements,
            max_batch_size=inference.max_batch_size(model),
        )
        heavy = converters.typed_values(request) > _LOOP_TYPED_VALUES
        decoded = await run_in_threadpool(decode) if heavy else decode()
        results, timing = await inference.run(model, decoded)
        reply = converters.encode_response(
            model.name, model.version, decoded.id, results, decoded.outputs
        )
        return reply, timing

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request of the stream runs as soon as it arrives (so they batch with each other
        and with other clients); replies go out as they finish, carrying the request's id. An
        error answers that request with ``error_message`` and the stream goes on."""
        replies: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                reply = await self.ModelInfer(request, context)
            except ServiceError as exc:
                reply = None
                message = exc.message
            except Exception:
                logger.exception("unhandled error on a gRPC stream request")
                reply, message = None, _INTERNAL
            if reply is None:
                failed = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version
                )
                failed.id = request.id
                await replies.put(
                    pb.ModelStreamInferResponse(error_message=message, infer_response=failed)
                )
            else:
                await replies.put(pb.ModelStreamInferResponse(infer_response=reply))

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                await replies.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()


def _unary(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def call(request, context):
        try:
            return await method(request, context)
        except ServiceError as exc:
            if exc.headers and "Retry-After" in exc.headers:
                context.set_trailing_metadata((("retry-after", exc.headers["Retry-After"]),))
            await context.abort(status_of(exc), exc.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            logger.exception("unhandled error on gRPC %s: %s", method.__name__, first_line(exc))
            await context.abort(grpc.StatusCode.INTERNAL, _INTERNAL)

    return call


_UNARY = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}


HEALTH = "grpc.health.v1.Health"


class HealthServicer:
    """The standard health check (Kubernetes grpc probes): SERVING once the models are loaded,
    as ``/v2/health/ready`` answers 200; for the server ("") and for the inference service."""

    def __init__(self, state: Any) -> None:
        self.state = state

    async def Check(self, request: health_pb2.HealthCheckRequest, context):
        if request.service not in ("", SERVICE):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        status = health_pb2.HealthCheckResponse
        ready = bool(getattr(self.state, "ready", False))
        return status(status=status.SERVING if ready else status.NOT_SERVING)


def health_handler(servicer: HealthServicer) -> grpc.GenericRpcHandler:
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(HEALTH, {"Check": check})


def handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The service's methods for ``grpc.aio.Server.add_generic_rpc_handlers``."""
    methods = {
        name: grpc.unary_unary_rpc_method_handler(
            _unary(getattr(servicer, name)),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (request, response) in _UNARY.items()
    }
    methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, methods)
