"""``bnfold serve``: run the service (also ``python -m service``)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from service import logs
from service.settings import Settings

LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnfold serve",
        description="Serve folded models over KServe v2. Every option can also be set with "
        "an environment variable BNFOLD_<OPTION> (e.g. BNFOLD_PORT=9000).",
    )
    p.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--store", help="model store directory (default ./bnfold-store)")
    p.add_argument(
        "--require-gpu",
        action="store_true",
        default=None,
        help="refuse to start or deploy when the CUDA execution provider is not usable",
    )
    p.add_argument("--log-level", choices=LEVELS)
    p.add_argument("--log-format", choices=["text", "json"])
    return p


DRAIN_S = 1.0  # how long a stopping server keeps idle keep-alive connections open


def _http_protocol(settings: Settings) -> Any:
    """uvicorn's ``http`` setting: its httptools protocol with coalesced writes, or its own
    choice when that is turned off or httptools is missing."""
    if settings.coalesce_writes:
        try:
            from service.http_protocol import CoalescingHttpToolsProtocol
        except ImportError:  # no httptools: uvicorn falls back to h11
            return "auto"
        return CoalescingHttpToolsProtocol
    return "auto"


def _draining(protocol: Any) -> Any:
    """The httptools protocol ``protocol`` names, answering with ``Connection: close`` once the
    server drains (DrainingServer); h11, uvicorn's fallback, is left as it is."""
    if protocol == "auto":
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            return protocol
        protocol = HttpToolsProtocol

    class DrainingProtocol(protocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            if getattr(self.server_state, "draining", False) and self.cycle is not None:
                self.cycle.keep_alive = False

    return DrainingProtocol


def _busy(connection: Any) -> bool:
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and not cycle.response_complete


def _draining_server(config: Any) -> Any:
    import asyncio

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's shutdown closes idle keep-alive connections at once, so a request a
        client has just sent on one dies of a reset (the kernel answers unread data with RST).
        This one first stops accepting, then for up to DRAIN_S keeps them open: a request that
        arrives on one is answered with ``Connection: close`` and the connection then closes.
        uvicorn's own shutdown follows: what is still idle is closed, what is in flight is
        awaited (``timeout_graceful_shutdown``)."""

        async def shutdown(self, sockets: Any = None) -> None:
            self.server_state.draining = True
            for server in self.servers:
                server.close()
            for connection in list(self.server_state.connections):
                if _busy(connection):
                    connection.shutdown()  # the response in progress says Connection: close
            deadline = asyncio.get_running_loop().time() + DRAIN_S
            while self.server_state.connections and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            await super().shutdown(sockets)

    return DrainingServer(config)


def _stopped(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(
            host=args.host,
            port=args.port,
            store=args.store,
            require_gpu=args.require_gpu,
            log_level=args.log_level,
            log_format=args.log_format,
        )
        if settings.log_level not in LEVELS or settings.log_format not in ("text", "json"):
            raise ValueError(
                f"log level {settings.log_level!r} / format {settings.log_format!r}: "
                f"use one of {LEVELS} / text, json"
            )
    except ValueError as exc:
        print(f"bnfold serve: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)

    import uvicorn

    from service.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http=_draining(_http_protocol(settings)),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to the root set up above
        timeout_graceful_shutdown=5,
    )
    server = _draining_server(config)
    # SIGTERM is the ordinary stop (docker stop, Kubernetes). uvicorn catches it, stops
    # accepting, answers what is in flight, then raises it again against the handler it found:
    # this one, so that a stop exits 0 rather than 143 (as PID 1 of a container the default
    # action would be ignored and exit 0 anyway; under an init, or outside one, it would not).
    signal.signal(signal.SIGTERM, _stopped)
    server.run()
    # uvicorn exits on a failed start-up (e.g. require_gpu without CUDA) without raising
    return 0 if server.started else 1
