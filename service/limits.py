"""Request body limits, enforced while the body streams in (pure ASGI middleware).

Starlette has no body limit of its own. A declared ``Content-Length`` above the limit is
answered 413 before a byte of the body is read; a chunked body is counted as it arrives and
refused the moment it passes the limit, so memory and disk stay bounded whatever the client does.
"""

from __future__ import annotations

from service.errors import PayloadTooLarge, error_response

# a refused body is read and dropped up to this much more, so that an ordinary client that is
# still sending gets the 413 instead of a reset connection; beyond it the connection just closes
_DRAIN_BYTES = 8 << 20


class BodyLimitMiddleware:
    def __init__(self, app, *, default_limit: int, limits: dict[tuple[str, str], int]) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limits = limits  # (method, path) -> limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.get((scope["method"], scope["path"]), self.default_limit)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            response = error_response(413, _message(limit, declared))
            return await response(scope, receive, send)

        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    await _drain(receive, message)
                    raise PayloadTooLarge(_message(limit))
            return message

        await self.app(scope, limited_receive, send)


def _message(limit: int, declared: int | None = None) -> str:
    size = f" ({declared} bytes declared)" if declared is not None else ""
    return f"request body too large{size}: the limit is {limit} bytes"


def _content_length(scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive, message) -> None:
    drained = 0
    while message.get("more_body") and drained < _DRAIN_BYTES:
        message = await receive()
        drained += len(message.get("body", b""))
