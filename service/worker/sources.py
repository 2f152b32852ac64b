"""Where a job's original model comes from, and what it is verified on.

Three sources, one result (`Source`):

1. An ONNX upload: the graph as sent; input shapes from the upload where its dims are symbolic.
2. A zoo default (``kind == "zoo"``): the service's shipped export of the zoo model, or a fresh
   export when the caller asks for other input shapes.
3. Weights for an architecture (``kind == "safetensors"``): ``zoo:NAME`` (or a bare zoo name),
   ``torchvision:NAME`` or ``timm:NAME`` with constructor arguments (``arch_args``), built by
   ``bnfold.architectures`` with the uploaded state dict loaded strictly. These keep the torch
   module: they are folded in torch (forward folds, branch merging), where ONNX sees less.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.worker.parsing import parse_onnx, parse_safetensors, readable_by_runtime
from service.worker.sandbox import FOLDING, Refused, disable_unpickling, first_lines, require

__all__ = ["Source", "load_source", "read_onnx_upload"]


@dataclass
class Source:
    original: Any  # onnx.ModelProto, unfolded
    input_shapes: dict[str, list[int]] | None  # by graph input name, for generated inputs
    description: dict[str, Any]  # the record's "source"
    module: Any = None  # the torch module, for sources folded in torch
    example: tuple | None = None  # its example inputs


def load_source(job_dir: Path, job: dict[str, Any]) -> Source:
    kind = job["kind"]
    if kind == "onnx":
        source = read_onnx_upload(job_dir, job)
        require(*FOLDING)
        return source
    if kind == "zoo":
        return _zoo_default(job["architecture"], job.get("input_shape"))
    if kind == "safetensors":
        return _weights_upload(job_dir, job)
    raise Refused(400, f"unknown job kind {kind!r}")


def read_onnx_upload(job_dir: Path, job: dict[str, Any]) -> Source:
    """An ONNX upload, parsed and lowered to an IR version onnxruntime reads, with the caller's
    input shapes; onnx alone is loaded, not the folding libraries (torch: seconds)."""
    original, note = readable_by_runtime(parse_onnx((job_dir / "upload").read_bytes()))
    shapes = _shapes_by_name(original, job.get("input_shape"))
    return Source(original, shapes, {"format": "onnx", **({"ir_version": note} if note else {})})


def _zoo_default(name: str, input_shape: Any) -> Source:
    require("torch", "models", *FOLDING)
    import models
    from service.default_graphs import shipped_graph

    disable_unpickling()
    shipped = shipped_graph(name) if input_shape is None else None
    description = {"format": "zoo", "architecture": name, "shipped_graph": shipped is not None}
    if shipped is None:
        from bnfold.architectures import Architecture

        architecture = Architecture("zoo", name)
        module = architecture.build()
        example = _example(architecture, input_shape)
        original = _export(module, example, architecture.spec)
        return Source(original, _shapes_of(original, example), description)
    # the same export, made ahead (service/default_graphs.py): seconds saved at start
    import onnx

    original = onnx.load(shipped)
    shapes = {
        value.name: [2, *shape[1:]]
        for value, shape in zip(original.graph.input, models.input_shapes(name), strict=False)
    }
    return Source(original, shapes, description)


def _weights_upload(job_dir: Path, job: dict[str, Any]) -> Source:
    state = parse_safetensors((job_dir / "upload").read_bytes())
    require("models", *FOLDING)
    from bnfold.architectures import ArchitectureError, load_weights, parse_architecture

    try:
        architecture = parse_architecture(job["architecture"], job.get("arch_args"))
        module = load_weights(architecture.build(), state, architecture.spec)
    except ArchitectureError as exc:
        raise Refused(400, str(exc)) from None
    except ImportError as exc:
        raise Refused(
            400, f"{job['architecture']}: its library is not installed here ({exc.name})"
        ) from None
    example = _example(architecture, job.get("input_shape"))
    original = _export(module, example, architecture.spec)
    description = {"format": "safetensors", "architecture": job["architecture"]}
    if job.get("arch_args"):
        description["arch_args"] = architecture.args
    return Source(original, _shapes_of(original, example), description, module, example)


def _example(architecture: Any, input_shape: Any) -> tuple:
    """Inputs to trace, fold and verify with: the architecture's own, or the caller's shapes."""
    if input_shape is None:
        return architecture.example_inputs(batch=2)
    # one shape, or shapes by input name (these models take their inputs in order)
    shapes = list(input_shape.values()) if isinstance(input_shape, dict) else [input_shape]
    expected = len(architecture.input_shapes())
    if len(shapes) != expected:
        raise Refused(
            400,
            f"{architecture.spec!r} takes {expected} input(s), input_shape gives {len(shapes)}",
        )
    return architecture.example_inputs(batch=shapes[0][0], shapes=[tuple(s) for s in shapes])


def _export(module: Any, example: tuple, spec: str) -> Any:
    import torch

    import bnfold

    try:
        with torch.no_grad():
            return bnfold.export_onnx(module, example, dynamic_batch=True)
    except Exception as exc:
        raise Refused(422, f"exporting {spec!r} to ONNX failed: {first_lines(exc)}") from None


def _shapes_of(original: Any, example: tuple) -> dict[str, list[int]]:
    names = [i.name for i in original.graph.input]
    return {n: list(t.shape) for n, t in zip(names, example, strict=False)}


def _shapes_by_name(original: Any, input_shape: Any) -> dict[str, list[int]] | None:
    """The caller's ``input_shape``: one list for a one-input model, or a dict by name."""
    if input_shape is None:
        return None
    names = [i.name for i in original.graph.input]
    inits = {t.name for t in original.graph.initializer}
    names = [n for n in names if n not in inits]
    if isinstance(input_shape, dict):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise Refused(400, f"input_shape names unknown inputs {unknown}; inputs are {names}")
        return input_shape
    if len(names) != 1:
        raise Refused(
            400, f"the model has inputs {names}: give input_shape as an object by input name"
        )
    return {names[0]: input_shape}
