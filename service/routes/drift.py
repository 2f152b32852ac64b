"""Drift: read a model's input drift; recalibrate its BN statistics; roll back a version.

``GET /v1/models/{name}/drift`` is the monitor's latest window (service/drift/);
``POST /v1/models/{name}/recalibrate`` takes unlabeled inputs (a file, or ``source=traffic``)
and deploys a new, verified version; ``POST /v1/models/{name}/rollback`` serves the previous
version again. Every route needs the management token.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.auth import Authorized
from service.drift import DriftUnavailable
from service.errors import BadRequest
from service.handlers import DEFAULT_ATOL, DEFAULT_RTOL
from service.routes.deps import Inference, Models
from service.routes.forms import (
    copy_file,
    flag_field,
    integer_field,
    number_field,
    text_fields,
)
from service.schemas import ERROR_RESPONSES, ModelPublic
from service.store import validate_name

router = APIRouter(prefix="/v1/models", tags=["drift"], responses=ERROR_RESPONSES)

_FORMATS = {".npy": "npy", ".npz": "npz", ".safetensors": "safetensors"}
_FIELDS = {"file", "source", "batch_size", "rtol", "atol", "align_input"}

_RECALIBRATE_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "unlabeled inputs: .npy (one-input models), .npz or "
                            ".safetensors (one array per model input, by name)",
                        },
                        "source": {
                            "type": "string",
                            "enum": ["traffic"],
                            "description": "instead of a file: the sampled requests kept "
                            "(BNFOLD_DRIFT_KEEP_SAMPLES)",
                        },
                        "batch_size": {"type": "integer", "minimum": 2, "default": 32},
                        "align_input": {
                            "type": "boolean",
                            "default": True,
                            "description": "also fit a per-channel gain and bias of the input "
                            "to the first BN's statistics (undoes an inverted input, which "
                            "re-estimation alone cannot); kept only when it moves the "
                            "statistics less than re-estimation alone",
                        },
                        "rtol": {"type": "number", "minimum": 0},
                        "atol": {"type": "number", "minimum": 0},
                    },
                }
            }
        },
    }
}


@router.get("/{name}/drift", summary="Input drift of the model's last sampled window")
async def read_drift(name: str, _: Authorized, inference: Inference) -> dict[str, Any]:
    model = inference.model(validate_name(name))
    if inference.drift is None or inference.drift.rate_of(model.record) <= 0:
        raise DriftUnavailable(
            f"drift monitoring is off for {model.name!r} (BNFOLD_DRIFT_SAMPLE=0, or the upload's "
            "drift_sample=0)"
        )
    result = await run_in_threadpool(inference.drift.report, model.name, model.version)
    return result.to_dict()


@router.post(
    "/{name}/recalibrate",
    status_code=201,
    response_model=ModelPublic,
    openapi_extra=_RECALIBRATE_SCHEMA,
    summary="Re-estimate BN statistics on unlabeled inputs; deploy the verified new version",
)
async def recalibrate(name: str, request: Request, _: Authorized, models: Models) -> dict[str, Any]:
    validate_name(name)
    models.registry.get(name)  # 404 before reading the data
    models.check_can_ingest()  # before the body is read
    async with models.scratch("recalibrate-") as scratch:
        job = await _read_form(request, scratch)
        model = await models.recalibrate(name, scratch, job)
        return model.public()


@router.post("/{name}/rollback", response_model=ModelPublic, summary="Serve the previous version")
async def rollback(name: str, _: Authorized, models: Models) -> dict[str, Any]:
    model = await models.rollback(name)
    return model.public()


async def _read_form(request: Request, scratch) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise BadRequest("send multipart/form-data with a 'file' field, or source=traffic")
    form = await request.form(max_files=1, max_fields=len(_FIELDS), max_part_size=64 << 10)
    try:
        fields = text_fields(form, _FIELDS)
        job: dict[str, Any] = {
            "batch_size": integer_field(fields, "batch_size", 32, 2, 1 << 16),
            "rtol": number_field(fields, "rtol", DEFAULT_RTOL),
            "atol": number_field(fields, "atol", DEFAULT_ATOL),
            "align_input": flag_field(fields, "align_input", True),
        }
        file, source = form.get("file"), fields.get("source")
        if source is not None and source != "traffic":
            raise BadRequest(f"source must be 'traffic', got {source!r}")
        if (file is None) == (source is None):
            raise BadRequest("send either a 'file' with the inputs or source=traffic")
        if source == "traffic":
            return {**job, "format": "traffic"}
        if not isinstance(file, UploadFile):
            raise BadRequest("the 'file' field must be a file")
        suffix = "." + (file.filename or "").rsplit(".", 1)[-1].lower()
        job["format"] = _FORMATS.get(suffix)  # None: recognized by its first bytes
        await run_in_threadpool(copy_file, file, scratch / "upload")
        return job
    finally:
        await form.close()
