"""KServe v2 model endpoints: metadata, readiness, Triton config, infer.

The infer route reads the raw body: tritonclient sends no Content-Type, and its binary tensor
extension puts raw bytes after the JSON, so there is no JSON body for a framework to parse.
"""

from __future__ import annotations

import zlib

from fastapi import APIRouter, Request, Response

from service.errors import BadRequest, PayloadTooLarge
from service.handlers import InferenceService
from service.protocol import v2
from service.routes.deps import Inference
from service.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/v2/models", tags=["inference"], responses=ERROR_RESPONSES)

_INFER_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "parameters": {"type": "object"},
                                    "data": {"type": "array"},
                                },
                            },
                        },
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            }
        },
    }
}


@router.get("/{name}")
@router.get("/{name}/versions/{version}")
def model_metadata(name: str, inference: Inference, version: str | None = None) -> dict:
    return inference.metadata(name, version)


@router.get("/{name}/ready")
@router.get("/{name}/versions/{version}/ready")
def model_ready(name: str, inference: Inference, version: str | None = None) -> dict:
    model = inference.model(name, version)
    return {"name": model.name, "version": model.version, "ready": True}


@router.get("/{name}/config")
def model_config(name: str, inference: Inference) -> dict:
    return inference.config(name)


@router.post("/{name}/infer", openapi_extra=_INFER_SCHEMA)
@router.post("/{name}/versions/{version}/infer", openapi_extra=_INFER_SCHEMA)
async def infer(
    name: str, request: Request, inference: Inference, version: str | None = None
) -> Response:
    """Served by ``service.routes.infer_asgi`` unless ``BNFOLD_INFER_FAST_PATH=0``; declared here
    for the OpenAPI description either way."""
    inference.model(name, version)  # 404 before reading a body for a model that is not there
    payload, headers = await run_infer(
        inference,
        name,
        version,
        await request.body(),
        request.headers.get("content-encoding"),
        request.headers.get(v2.HEADER_LENGTH),
    )
    return Response(payload, headers=headers)


async def run_infer(
    inference: InferenceService,
    name: str,
    version: str | None,
    body: bytes,
    content_encoding: str | None,
    header_length: str | None,
) -> tuple[bytes, dict[str, str]]:
    """One infer request, from the raw body to the reply's body and headers (both paths)."""
    body = _decode(body, content_encoding, inference.settings.max_request_bytes)
    payload, length = await inference.infer(name, version, body, header_length)
    if length is None:
        return payload, {"content-type": "application/json"}
    return payload, {"content-type": "application/octet-stream", v2.HEADER_LENGTH: str(length)}


def _decode(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo gzip/deflate Content-Encoding (tritonclient can compress), capped at ``limit``."""
    if not encoding or encoding.strip().lower() == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding.strip().lower())
    if wbits is None:
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"the decompressed body exceeds the limit of {limit} bytes")
    return out
