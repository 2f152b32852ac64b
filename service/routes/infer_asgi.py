"""The infer endpoint as plain ASGI, in front of FastAPI's routing.

``POST /v2/models/{name}[/versions/{version}]/infer`` is the one hot path of the service. Through
FastAPI it pays for route matching over every router, dependency solving, request/response
objects and three exception middlewares: about 0.4 ms of Python per request on the 2-core
benchmark machine, which halved the throughput for a small model (docs/BENCHMARKS.md,
"Serving"). Here the request is matched with one regular expression and handed to the same
``run_infer`` the FastAPI route uses, so both paths parse, check, batch and answer identically;
errors are rendered by the same ``error_response``. Everything else, and this path when
``BNFOLD_INFER_FAST_PATH=0``, goes on to FastAPI, which also keeps describing the endpoint in
the OpenAPI document.

It sits inside ``BodyLimitMiddleware``, so body limits hold the same on both paths.
"""

from __future__ import annotations

import logging
import re

from service.errors import ServiceError, error_response
from service.protocol import v2
from service.routes.inference import run_infer

logger = logging.getLogger(__name__)

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
_HEADER_LENGTH = v2.HEADER_LENGTH.lower().encode()


class ClientDisconnected(Exception):
    """The client went away before its body was complete: nothing to answer."""


class InferFastPath:
    def __init__(self, app, *, state, enabled: bool = True) -> None:
        self.app = app  # the rest of the stack
        self.state = state  # the FastAPI app's state: ``inference`` is set at start-up
        self.enabled = enabled

    async def __call__(self, scope, receive, send):
        if not self.enabled or scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        match = INFER_PATH.fullmatch(path)
        inference = getattr(self.state, "inference", None)
        if match is None or inference is None:
            return await self.app(scope, receive, send)
        name, version = match.groups()
        try:
            inference.model(name, version)  # 404 before reading the body
            body = await _read_body(receive)
            encoding = header_length = None
            for key, value in scope["headers"]:  # the first of each, as Starlette reads them
                if key == b"content-encoding" and encoding is None:
                    encoding = value.decode("latin-1")
                elif key == _HEADER_LENGTH and header_length is None:
                    header_length = value.decode("latin-1")
            payload, headers = await run_infer(
                inference, name, version, body, encoding, header_length
            )
        except ClientDisconnected:
            return
        except ServiceError as exc:
            response = error_response(exc.status_code, exc.message, exc.extra, exc.headers)
            return await response(scope, receive, send)
        except Exception:
            logger.exception("unhandled error on POST %s", path)
            response = error_response(500, "internal server error; the server log has the details")
            return await response(scope, receive, send)
        raw_headers = [(b"content-length", str(len(payload)).encode())]
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        await send({"type": "http.response.body", "body": payload})


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
