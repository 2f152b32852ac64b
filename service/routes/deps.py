"""Dependency aliases shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.handlers import InferenceService, ModelService


# async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per request
async def get_models(request: Request) -> ModelService:
    return request.app.state.models


async def get_inference(request: Request) -> InferenceService:
    return request.app.state.inference


Models = Annotated[ModelService, Depends(get_models)]
Inference = Annotated[InferenceService, Depends(get_inference)]
