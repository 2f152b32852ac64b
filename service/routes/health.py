"""Server-level KServe v2 endpoints: metadata, liveness, readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request

import service
from service.errors import ServiceUnavailable
from service.schemas import ERROR_RESPONSES

router = APIRouter(prefix="/v2", tags=["health"], responses=ERROR_RESPONSES)


@router.get("")
def server_metadata() -> dict:
    # no "statistics": there is no /stats endpoint, and Triton tooling would go looking for it
    return {"name": "bnfold", "version": service.__version__, "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
def ready(request: Request) -> dict:
    state = request.app.state
    if not state.ready:
        raise ServiceUnavailable(state.not_ready_reason)
    return {"ready": True}
