"""The least a grpc.aio server can do with an infer-sized request: take the message's bytes
and answer a fixed 4 kB message, on the same method path as the service's ModelInfer (no
protobuf parsing on either side). ``request_overhead.py`` times it with the same client as
the service, to show what grpc and the loopback cost on their own on this machine.

    python bench/grpc_floor_app.py --port 18301
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

REPLY = b"x" * 4096
METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def reply(request: bytes, context) -> bytes:
    return REPLY


async def serve(port: int, max_bytes: int) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
        ]
    )
    service, method = METHOD.rsplit("/", 1)
    handler = grpc.unary_unary_rpc_method_handler(reply)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.lstrip("/"), {method: handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=18301)
    p.add_argument("--max-bytes", type=int, default=64 << 20)
    p.add_argument("--uvloop", action="store_true", help="on uvloop, as the service runs")
    args = p.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port, args.max_bytes))
    else:
        asyncio.run(serve(args.port, args.max_bytes))


if __name__ == "__main__":
    main()
