"""KServe v2 model endpoints: metadata, readiness, Triton config, infer.

The infer route reads the raw body: tritonclient sends no Content-Type, and its binary tensor
extension puts raw bytes after the JSON, so there is no JSON body for a framework to parse.
"""

from __future__ import annotations

import zlib

from fastapi import APIRouter, Request, Response

from service.errors import BadRequest, PayloadTooLarge
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
    model = inference.model(name, version)
    return v2.model_metadata(
        model.name, model.version, model.runtime.signature, model.runtime.provider
    )


@router.get("/{name}/ready")
@router.get("/{name}/versions/{version}/ready")
def model_ready(name: str, inference: Inference, version: str | None = None) -> dict:
    model = inference.model(name, version)
    return {"name": model.name, "version": model.version, "ready": True}


@router.get("/{name}/config")
def model_config(name: str, inference: Inference) -> dict:
    model = inference.model(name)
    policy = model.batcher.policy
    config = v2.model_config(model.name, model.runtime.signature, policy.max_batch_size)
    if policy.enabled:
        delay_us = int(policy.max_queue_delay_ms * 1000)
        config["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
    return config


@router.post("/{name}/infer", openapi_extra=_INFER_SCHEMA)
@router.post("/{name}/versions/{version}/infer", openapi_extra=_INFER_SCHEMA)
async def infer(
    name: str, request: Request, inference: Inference, version: str | None = None
) -> Response:
    inference.model(name, version)  # 404 before reading a body for a model that is not there
    body = _decode(
        await request.body(),
        request.headers.get("content-encoding"),
        inference.settings.max_request_bytes,
    )
    payload, header_length = await inference.infer(
        name, version, body, request.headers.get(v2.HEADER_LENGTH)
    )
    if header_length is None:
        return Response(payload, media_type="application/json")
    return Response(
        payload,
        media_type="application/octet-stream",
        headers={v2.HEADER_LENGTH: str(header_length)},
    )


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
