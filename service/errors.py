"""Domain errors carry their HTTP status; one handler turns each into ``{"error": "..."}``.

The KServe v2 protocol and tritonclient expect exactly that body on every non-200 reply, so the
framework's own 404/405/422 and any unexpected exception are shaped the same way. No stack trace
ever reaches a client: unexpected errors are logged here and answered with a fixed message.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error a client can act on. ``extra`` is merged into the JSON body (e.g. reports)."""

    status_code = 500

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None, headers=None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}
        self.headers = headers


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class PayloadTooLarge(ServiceError):
    status_code = 413


class Unprocessable(ServiceError):
    status_code = 422


class ServiceUnavailable(ServiceError):
    status_code = 503


def first_line(exc: BaseException) -> str:
    """An exception as one line for a client: native libraries add multi-line context."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_response(status_code: int, message: str, extra=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, **(extra or {})}, status_code, headers=headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_response(exc.status_code, exc.message, exc.extra, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(422, "invalid request: " + "; ".join(problems))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
