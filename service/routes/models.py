"""Management API: deploy (POST), list, read, delete, download. Every route needs the token."""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.auth import Authorized
from service.errors import BadRequest
from service.handlers import DEFAULT_ATOL, DEFAULT_RTOL, UploadRequest
from service.routes.deps import Models
from service.routes.forms import (
    copy_file,
    flag_field,
    integer_field,
    number_field,
    text_fields,
)
from service.runtime.buckets import parse_spec
from service.schemas import ERROR_RESPONSES, ModelPublic, ModelsPublic, ModelSummary
from service.store import validate_name

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "file"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "an .onnx model, or a .safetensors state dict "
                            "together with 'architecture'",
                        },
                        "architecture": {
                            "type": "string",
                            "description": "for a .safetensors file: zoo:NAME (or a zoo name), "
                            "torchvision:NAME or timm:NAME",
                        },
                        "arch_args": {
                            "type": "string",
                            "description": 'JSON constructor arguments, e.g. {"num_classes": 10}'
                            " (num_classes, in_chans, global_pool, drop_rate, width_mult, "
                            "aux_logits)",
                        },
                        "input_shape": {
                            "type": "string",
                            "description": 'JSON: [2,3,32,32], or {"input": [2,3,32,32]}',
                        },
                        "rtol": {"type": "number", "minimum": 0},
                        "atol": {"type": "number", "minimum": 0},
                        "max_batch_size": {
                            "type": "integer",
                            "minimum": 1,
                            "description": "rows per onnxruntime run and per request; "
                            "1 turns dynamic batching off for this model",
                        },
                        "max_queue_delay_ms": {
                            "type": "number",
                            "minimum": 0,
                            "description": "how long a request may wait for others to batch with",
                        },
                        "optimize": {
                            "type": "boolean",
                            "description": "serve the fastest candidate of bnfold.optimize "
                            "(fp32, INT8 data-free, INT8 calibrated, mixed) within the budget",
                        },
                        "min_top1_agreement": {"type": "number", "minimum": 0, "maximum": 1},
                        "max_rel_l2": {"type": "number", "minimum": 0},
                        "max_accuracy_drop": {"type": "number", "minimum": 0},
                        "calibration": {
                            "type": "string",
                            "format": "binary",
                            "description": "calibration inputs for optimize: .npy (one "
                            "input), .npz or .safetensors (one array per input, by name)",
                        },
                        "drift_sample": {
                            "type": "number",
                            "minimum": 0,
                            "maximum": 1,
                            "description": "fraction of this model's requests sampled by the "
                            "drift monitor (default BNFOLD_DRIFT_SAMPLE; 0 turns it off)",
                        },
                        "dynamic_batching": {
                            "type": "boolean",
                            "description": "true or false: batch this model's requests or not; "
                            "unset: on, except for convolution models on the GPU",
                        },
                        "batch_buckets": {
                            "type": "string",
                            "description": "auto, off, or batch sizes such as 1,2,4,8: pad "
                            "each batch to one of them, each size in its own warmed session "
                            "(default BNFOLD_BATCH_BUCKETS: auto, convolution models on CUDA)",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ModelPublic,
    openapi_extra=_UPLOAD_SCHEMA,
    summary="Upload a model: it is folded, verified and deployed",
)
async def create_model(request: Request, _: Authorized, models: Models) -> dict[str, Any]:
    models.check_can_ingest()  # before the body is read
    async with models.scratch("upload-") as scratch:
        upload = await _read_upload_form(request, scratch)
        model = await models.deploy(upload)
        return model.public()


@router.get("", response_model=ModelsPublic)
def list_models(_: Authorized, models: Models) -> dict[str, Any]:
    data = [ModelSummary.model_validate(m.public()) for m in models.registry.all()]
    return {"data": data, "count": len(data)}


@router.get("/{name}", response_model=ModelPublic)
def read_model(name: str, _: Authorized, models: Models) -> dict[str, Any]:
    return models.registry.get(validate_name(name)).public()


@router.delete("/{name}", status_code=204)
async def delete_model(name: str, _: Authorized, models: Models) -> Response:
    await models.delete(name)
    return Response(status_code=204)


@router.get(
    "/{name}/onnx",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_model(name: str, _: Authorized, models: Models) -> FileResponse:
    model = models.registry.get(validate_name(name))
    return FileResponse(
        models.onnx_path(name),
        media_type="application/octet-stream",
        filename=f"{model.name}-{model.version}.onnx",
    )


# -- form parsing -------------------------------------------------------------------------------

_FIELDS = {
    "name",
    "file",
    "architecture",
    "arch_args",
    "input_shape",
    "rtol",
    "atol",
    "max_batch_size",
    "max_queue_delay_ms",
    "dynamic_batching",
    "batch_buckets",
    "optimize",
    "min_top1_agreement",
    "max_rel_l2",
    "max_accuracy_drop",
    "calibration",
    "drift_sample",
}
_BUDGET_FIELDS = ("min_top1_agreement", "max_rel_l2", "max_accuracy_drop")
_DATA_FORMATS = {".npy": "npy", ".npz": "npz", ".safetensors": "safetensors"}


async def _read_upload_form(request: Request, scratch) -> UploadRequest:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest("send the model as multipart/form-data with fields 'name' and 'file'")
    # the body limit middleware bounds what this reads; non-file fields are capped at 64 KiB
    form = await request.form(max_files=2, max_fields=len(_FIELDS), max_part_size=64 << 10)
    try:
        fields = text_fields(form, _FIELDS)
        request_fields = {
            "name": validate_name(_required(fields, "name")),
            "architecture": fields.get("architecture") or None,
            "arch_args": _arch_args(fields),
            "input_shape": _input_shape(fields.get("input_shape")),
            "rtol": number_field(fields, "rtol", DEFAULT_RTOL),
            "atol": number_field(fields, "atol", DEFAULT_ATOL),
            "batching": _batching(fields),
            "optimize": _optimize(fields, form.get("calibration")),
            "drift_sample": _fraction(fields, "drift_sample"),
        }
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise BadRequest("missing the 'file' field (the model file)")
        target = scratch / "upload"
        await run_in_threadpool(copy_file, file, target)
        calibration = form.get("calibration")
        if isinstance(calibration, UploadFile):
            await run_in_threadpool(copy_file, calibration, scratch / "calibration", "calibration")
        return UploadRequest(upload=target, **request_fields)
    finally:
        await form.close()


def _fraction(fields: dict[str, str], key: str) -> float | None:
    if not fields.get(key):
        return None
    value = number_field(fields, key, 0.0)
    if value > 1:
        raise BadRequest(f"{key} is a fraction between 0 and 1, got {fields[key]!r}")
    return value


def _optimize(fields: dict[str, str], calibration: Any) -> dict[str, Any] | None:
    """``optimize=true``, its budget and calibration file; without it, nothing changes."""
    wanted = flag_field(fields, "optimize", False)
    given = [k for k in _BUDGET_FIELDS if fields.get(k)]
    if isinstance(calibration, str) and calibration:
        raise BadRequest("calibration must be a file (.npy, .npz or .safetensors), not a field")
    if not wanted:
        if given or isinstance(calibration, UploadFile):
            extra = given + (["calibration"] if isinstance(calibration, UploadFile) else [])
            raise BadRequest(f"{extra} only apply with optimize=true")
        return None
    budget: dict[str, float] = {}
    for key in given:
        budget[key] = number_field(fields, key, 0.0)
    if budget.get("min_top1_agreement", 0.0) > 1:
        raise BadRequest("min_top1_agreement is a fraction between 0 and 1")
    if "max_accuracy_drop" in budget and not isinstance(calibration, UploadFile):
        raise BadRequest(
            "max_accuracy_drop needs labelled calibration data: a calibration file (.npz or "
            ".safetensors) holding a 'labels' array of class indices beside the inputs"
        )
    out: dict[str, Any] = {"budget": budget, "calibration": None}
    if isinstance(calibration, UploadFile):
        suffix = "." + (calibration.filename or "").rsplit(".", 1)[-1].lower()
        if suffix not in _DATA_FORMATS:
            raise BadRequest(
                f"calibration file {calibration.filename!r}: send .npy, .npz or .safetensors"
            )
        out.update(calibration="calibration", format=_DATA_FORMATS[suffix])
    return out


def _required(fields: dict[str, str], key: str) -> str:
    value = fields.get(key)
    if not value:
        raise BadRequest(f"missing the {key!r} field")
    return value


def _batching(fields: dict[str, str]) -> dict[str, Any]:
    """This model's own batching settings; what is not given follows the server's defaults."""
    out: dict[str, Any] = {}
    if fields.get("max_batch_size"):
        out["max_batch_size"] = integer_field(fields, "max_batch_size", 0, 1, 1 << 16)
    raw = fields.get("max_queue_delay_ms")
    if raw:
        delay = number_field(fields, "max_queue_delay_ms", 0.0)
        if delay > 10_000:
            raise BadRequest(f"max_queue_delay_ms must be at most 10000, got {raw!r}")
        out["max_queue_delay_ms"] = delay
    raw = fields.get("dynamic_batching")
    if raw:
        flag = raw.strip().lower()
        if flag not in ("true", "false", "1", "0"):
            raise BadRequest(f"dynamic_batching must be true or false, got {raw!r}")
        out["dynamic_batching"] = flag in ("true", "1")
    raw = fields.get("batch_buckets")
    if raw:
        try:
            spec = parse_spec(raw)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        out["batch_buckets"] = spec if isinstance(spec, str) else ",".join(map(str, spec))
    return out


def _arch_args(fields: dict[str, str]) -> dict[str, Any] | None:
    """The JSON object of constructor arguments; its names and values are checked by the worker
    against bnfold.architectures.ARGUMENTS, where the architecture is known."""
    raw = fields.get("arch_args")
    if raw is None or raw.strip() == "":
        return None
    if not fields.get("architecture"):
        raise BadRequest("arch_args is given without an architecture")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise BadRequest(
            f'arch_args must be a JSON object like {{"num_classes": 10}}, got {raw!r}'
        ) from None
    if not isinstance(value, dict):
        raise BadRequest(f'arch_args must be a JSON object like {{"num_classes": 10}}, got {raw!r}')
    return value


def _input_shape(raw: str | None) -> list[int] | dict[str, list[int]] | None:
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    try:
        value = json.loads(text if text[0] in "[{" else f"[{text}]")
    except json.JSONDecodeError:
        raise BadRequest(
            f'input_shape must be JSON like [2,3,32,32] or {{"x": [2,3,32,32]}}, got {raw!r}'
        ) from None
    shapes = value.values() if isinstance(value, dict) else [value]
    for shape in shapes:
        if not (
            isinstance(shape, list)
            and shape
            and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in shape
            )
        ):
            raise BadRequest(
                f"input_shape {raw!r}: each shape is a non-empty list of positive integers"
            )
        if math.prod(shape) > 1 << 24:
            raise BadRequest(f"input_shape {shape} is too large to verify with (> 2**24 values)")
    return value
