"""Protobuf messages <-> the transport-free types of ``service.protocol.v2``.

Every input goes through the same checks as an HTTP request (``v2.check_input``: name, rank,
dims, datatype, element and batch limits) before its data is read, and its data must hold
exactly the elements its shape says. A request gives its tensors either all as
``raw_input_contents`` (one entry per input, in order: what tritonclient.grpc sends) or all as
typed ``contents``; a mix is refused, as Triton refuses it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.errors import BadRequest
from service.grpc import v2_pb2 as pb
from service.protocol import v2

# the typed-contents field of each datatype, and the dtype its values have on the wire
CONTENTS_FIELD: dict[str, tuple[str, np.dtype]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
    "BYTES": ("bytes_contents", np.dtype(object)),
}
_CONTENT_FIELDS = sorted({f for f, _ in CONTENTS_FIELD.values()})


def typed_values(request: pb.ModelInferRequest) -> int:
    """How many typed-contents values a request carries (to decide whether to decode it off
    the event loop)."""
    total = 0
    for tensor in request.inputs:
        if tensor.HasField("contents"):
            total += sum(len(getattr(tensor.contents, f)) for f in _CONTENT_FIELDS)
    return total


def decode_request(
    request: pb.ModelInferRequest,
    signature: v2.Signature,
    *,
    max_elements: int,
    max_batch_size: int = 0,
) -> v2.InferRequest:
    if not request.inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give every input's data there, in input order, or none"
        )
    specs = {s.name: s for s in signature.inputs}
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        spec, shape = v2.check_input(
            specs,
            inputs,
            name,
            list(tensor.shape),
            tensor.datatype,
            max_elements,
            max_batch_size,
        )
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise BadRequest(
                    f"input {name!r} has typed contents while the request uses "
                    "raw_input_contents; use one or the other for all inputs"
                )
            inputs[name] = v2.from_binary(name, memoryview(raw[index]), spec.datatype, shape)
        elif has_contents:
            inputs[name] = _from_contents(name, tensor.contents, spec.datatype, shape)
        else:
            raise BadRequest(f"input {name!r} has neither contents nor raw_input_contents")
    v2.check_complete(specs, inputs)
    known = [s.name for s in signature.outputs]
    outputs: list[v2.RequestedOutput] = []
    for out in request.outputs:
        if out.name not in known:
            raise BadRequest(f"unknown output {out.name!r}; the model's outputs are {known}")
        if any(o.name == out.name for o in outputs):
            raise BadRequest(f"output {out.name!r} is requested twice")
        outputs.append(v2.RequestedOutput(out.name, binary=True))
    if not outputs:  # none named: every output, as over HTTP
        outputs = [v2.RequestedOutput(n, binary=True) for n in known]
    return v2.InferRequest(request.id or None, inputs, outputs)


def _from_contents(
    name: str, contents: pb.InferTensorContents, datatype: str, shape: list[int]
) -> np.ndarray:
    if datatype not in CONTENTS_FIELD:
        raise BadRequest(
            f"input {name!r}: {datatype} has no typed contents in the v2 protocol; "
            "send it as raw_input_contents"
        )
    field, wire = CONTENTS_FIELD[datatype]
    others = [f for f in _CONTENT_FIELDS if f != field and len(getattr(contents, f))]
    if others:
        raise BadRequest(f"input {name!r}: {datatype} data belongs in {field}, not {others}")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(
            f"input {name!r}: {field} has {len(values)} values, the shape {shape} holds {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    array = np.array(values, dtype=wire)
    target = v2.DATATYPES[datatype]
    if target != wire:  # INT8 in int32s and the like: each value must fit
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise BadRequest(
                f"input {name!r}: a value of {field} is out of range for {datatype} "
                f"[{info.min}, {info.max}]"
            )
        array = array.astype(target)
    return array.reshape(shape)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    results: dict[str, np.ndarray],
    requested: list[v2.RequestedOutput],
) -> pb.ModelInferResponse:
    """Every output as raw contents (what Triton answers and tritonclient reads)."""
    reply = pb.ModelInferResponse(model_name=model_name, model_version=model_version)
    if request_id:
        reply.id = request_id
    for req in requested:
        array = np.asarray(results[req.name])
        datatype = v2.datatype_of(array)
        reply.outputs.add(name=req.name, datatype=datatype, shape=array.shape)
        reply.raw_output_contents.append(v2.to_binary(array, datatype))
    return reply


def model_metadata(document: dict[str, Any]) -> pb.ModelMetadataResponse:
    """The HTTP metadata document (``v2.model_metadata``) as the gRPC message; the extras HTTP
    adds (execution provider, precision) have no field in the message."""
    reply = pb.ModelMetadataResponse(
        name=document["name"], versions=document["versions"], platform=document["platform"]
    )
    for key in ("inputs", "outputs"):
        for spec in document[key]:
            getattr(reply, key).add(
                name=spec["name"], datatype=spec["datatype"], shape=spec["shape"]
            )
    return reply


def model_config(document: dict[str, Any]) -> pb.ModelConfigResponse:
    """The HTTP config document (``v2.model_config`` and dynamic batching) as the message."""
    config = pb.ModelConfig(
        name=document["name"],
        platform=document["platform"],
        backend=document["backend"],
        max_batch_size=document["max_batch_size"],
    )
    for tensor in document["input"]:
        config.input.add(
            name=tensor["name"],
            data_type=pb.DataType.Value(tensor["data_type"]),
            dims=tensor["dims"],
        )
    for tensor in document["output"]:
        config.output.add(
            name=tensor["name"],
            data_type=pb.DataType.Value(tensor["data_type"]),
            dims=tensor["dims"],
        )
    batching = document.get("dynamic_batching")
    if batching is not None:
        config.dynamic_batching.max_queue_delay_microseconds = batching[
            "max_queue_delay_microseconds"
        ]
    return pb.ModelConfigResponse(config=config)
