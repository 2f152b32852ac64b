"""The gRPC server, in the event loop of the HTTP server, over the same app state.

Message size limits: a request is refused by grpc before it is parsed when it is larger than
``max_request_bytes``, the limit of an HTTP body (after decompression: grpc checks the
decompressed size too), with RESOURCE_EXHAUSTED; replies may be as large as grpc allows, as
over HTTP.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from service.grpc.servicer import HealthServicer, InferenceServicer, handler, health_handler
from service.settings import Settings

logger = logging.getLogger(__name__)

MAX_SEND_BYTES = (1 << 31) - 1  # grpc's largest message
STOP_GRACE_S = 5.0  # how long a stopping server lets calls in flight finish


class GrpcStartError(RuntimeError):
    """The gRPC port could not be bound."""


async def start(settings: Settings, state: Any) -> grpc.aio.Server:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
        ]
    )
    server.add_generic_rpc_handlers(
        (handler(InferenceServicer(state)), health_handler(HealthServicer(state)))
    )
    address = f"{settings.host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise GrpcStartError(
            f"cannot listen for gRPC on {address} ({exc}); set BNFOLD_GRPC_PORT to a free "
            "port, or 0 to turn gRPC off"
        ) from None
    await server.start()
    logger.info("gRPC (KServe v2) listening on %s", address)
    return server


async def stop(server: grpc.aio.Server) -> None:
    await server.stop(STOP_GRACE_S)
