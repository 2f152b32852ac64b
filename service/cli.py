"""``bnfold serve``: run the service (also ``python -m service``)."""

from __future__ import annotations

import argparse
import logging
import sys

from service.settings import Settings


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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env(
            host=args.host, port=args.port, store=args.store, require_gpu=args.require_gpu
        )
    except ValueError as exc:
        print(f"bnfold serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    import uvicorn

    from service.app import create_app

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn exits on a failed start-up (e.g. require_gpu without CUDA) without raising
    return 0 if server.started else 1
