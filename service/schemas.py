"""Public response schemas of the management API (documented in the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorPublic(BaseModel):
    error: str


class TensorPublic(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelSummary(BaseModel):
    name: str
    version: str
    platform: str
    execution_provider: str
    source: dict[str, Any]
    inputs: list[TensorPublic]
    outputs: list[TensorPublic]
    deployed_at: str


class ModelPublic(ModelSummary):
    """A deployed model with its fold and verification reports."""

    input_shapes: dict[str, list[int]]
    fold_report: dict[str, Any]
    verification: dict[str, Any]
    gpu_divergence: dict[str, Any] | None = None
    savings: dict[str, Any] | None = None  # nodes and deploy-time latency, before/after
    batching: dict[str, Any] | None = None
    precision: dict[str, Any] | None = None  # precision, candidate, why, how it was verified
    optimization: dict[str, Any] | None = None  # bnfold.optimize's report, when asked for
    recalibrated_from: str | None = None  # the version whose BN statistics were re-estimated
    recalibration: dict[str, Any] | None = None  # data used: samples, batches, bytes, per BN
    drift_sample: float | None = None  # this model's sampling rate, when its upload set one


class ModelsPublic(BaseModel):
    data: list[ModelSummary]
    count: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorPublic} for code in (400, 401, 404, 413, 422, 503)
}
