"""Uploaded bytes to an ONNX graph or a state dict: protobuf and safetensors, never pickles."""

from __future__ import annotations

from typing import Any

from service.worker.sandbox import Refused, disable_unpickling, require

__all__ = ["external_data_refs", "parse_onnx", "parse_safetensors", "readable_by_runtime"]


def external_data_refs(model: Any) -> list[str]:
    """Names of every tensor in the model (graphs, subgraphs, functions) stored outside it.

    Wider than onnx's own tensor walk (and so ``bnfold.onnx.external_data``): sparse
    initializers and sparse attribute tensors are checked too (``bnfold.onnx.walk``)."""
    from onnx import TensorProto

    from bnfold.onnx.walk import tensors

    return [
        t.name or "<unnamed>"
        for _, t in tensors(model)
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data)
    ]


def parse_onnx(data: bytes) -> Any:
    require("onnx")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Refused(
            400, f"the file is not a valid ONNX model (protobuf parse failed: {exc})"
        ) from None
    # before anything else looks at the graph: external data names a path on *our* disk
    external = external_data_refs(model)
    if external:
        raise Refused(
            400,
            f"ONNX models with external data are refused (tensors {external[:5]}); "
            "save the model with all tensors inside the file",
        )
    if not model.graph.node:
        raise Refused(400, "the file is not a usable ONNX model: its graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises ValidationError and C++ errors
        raise Refused(400, f"the ONNX model does not pass onnx.checker: {exc}") from None
    return model


def readable_by_runtime(model: Any) -> tuple[Any, str | None]:
    """The model with the IR version onnxruntime reads, where lowering it is exact (a newer
    onnx writes its own by default), and the note saying so; a 400 where it is not."""
    from bnfold.onnx.ir_version import lower_for_runtime

    try:
        return lower_for_runtime(model)
    except ValueError as exc:
        raise Refused(400, f"the ONNX model cannot be served: {exc}") from None


def parse_safetensors(data: bytes) -> dict[str, Any]:
    """A state dict of torch tensors from safetensors bytes (a JSON header and raw buffers)."""
    from safetensors import SafetensorError, deserialize

    try:
        deserialize(data)  # validates header and buffers before torch is loaded
    except (SafetensorError, ValueError, OSError) as exc:
        raise Refused(400, f"the file is not a valid safetensors state dict: {exc}") from None
    require("torch")
    disable_unpickling()
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise Refused(400, f"the file is not a valid safetensors state dict: {exc}") from None
