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
        http=_http_protocol(settings),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to the root set up above
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    # SIGTERM is the ordinary stop (docker stop, Kubernetes). uvicorn catches it, stops
    # accepting, answers what is in flight, then raises it again against the handler it found:
    # this one, so that a stop exits 0 rather than 143 (as PID 1 of a container the default
    # action would be ignored and exit 0 anyway; under an init, or outside one, it would not).
    signal.signal(signal.SIGTERM, _stopped)
    server.run()
    # uvicorn exits on a failed start-up (e.g. require_gpu without CUDA) without raising
    return 0 if server.started else 1
