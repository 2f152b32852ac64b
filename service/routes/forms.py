"""Multipart form fields shared by the upload and recalibrate routes: checked, with the field
named in every error."""

from __future__ import annotations

import math
import shutil

from starlette.datastructures import UploadFile

from service.errors import BadRequest

__all__ = ["copy_file", "flag_field", "integer_field", "number_field", "text_fields"]


def text_fields(form, allowed: set[str]) -> dict[str, str]:
    """The form's text fields, after refusing any field not in ``allowed`` and any field sent
    more than once (files included): a form keeps the last of repeated fields, which would
    silently drop the first."""
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise BadRequest(f"unknown form field(s) {unknown}; expected {sorted(allowed)}")
    keys = [key for key, _ in form.multi_items()]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise BadRequest(f"form field(s) {repeated} given more than once; send each once")
    return {k: v for k, v in form.items() if isinstance(v, str)}


def copy_file(file: UploadFile, target, field: str = "file") -> None:
    """Write an uploaded file part to ``target``; an empty one is a 400."""
    file.file.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(file.file, out, 1 << 20)
        if out.tell() == 0:
            raise BadRequest(f"the uploaded {field!r} is empty")


def number_field(fields: dict[str, str], key: str, default: float) -> float:
    """A finite number >= 0, or ``default`` when the field is absent or empty."""
    raw = fields.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{key} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{key} must be a finite number >= 0, got {raw!r}")
    return value


def flag_field(fields: dict[str, str], key: str, default: bool) -> bool:
    """true/false/1/0 (any case, spaces around ignored), or ``default`` when absent or blank."""
    raw = (fields.get(key) or "").strip().lower()
    if not raw:
        return default
    if raw not in ("true", "false", "1", "0"):
        raise BadRequest(f"{key} must be true or false, got {fields[key]!r}")
    return raw in ("true", "1")


def integer_field(fields: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    """An integer in [low, high], or ``default`` when the field is absent or empty."""
    raw = fields.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{key} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{key} must be between {low} and {high}, got {raw!r}")
    return value
