"""The KServe v2 / Open Inference Protocol, with Triton's binary tensor extension.

A request body is JSON, optionally followed by raw tensors: the header
``Inference-Header-Content-Length`` gives the JSON's length, and each binary input carries
``parameters.binary_data_size``; tensors follow in input order, little-endian, row-major; a
``BYTES`` element is a 4-byte little-endian length and the bytes.

Every size is checked against what was actually sent before anything is allocated:
a shape's element count (computed with Python integers, so ``[2**62, 8]`` cannot overflow) is
capped, must agree with the model, with ``binary_data_size`` and with the number of JSON values.
Nothing here knows about HTTP; violations raise ``BadRequest``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from service.errors import BadRequest

HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatype -> numpy dtype, little-endian on the wire (BYTES are length-prefixed objects)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items() if name != "BYTES"}

# Triton model-config names of the same types, for GET /v2/models/{m}/config
CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
    "BF16": "TYPE_BF16",
}


def datatype_of(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _BY_KIND[(array.dtype.kind, array.dtype.itemsize)]
    except KeyError:
        raise BadRequest(f"output dtype {array.dtype} has no v2 datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1 for a variable dimension

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @cached_property  # read on every request; the lists are never changed after loading
    def batched(self) -> bool:
        """All tensors have a variable first dimension: Triton's max_batch_size > 0 form."""
        tensors = self.inputs + self.outputs
        return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] = field(default_factory=list)


# -- decoding -----------------------------------------------------------------------------------


def parse_header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    # digits only: int() would also take "1_0", "+5" and other scripts' digits; and at most
    # 19 of them, past which int() refuses (4300) and no body is that long anyway
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) < 20):
        raise BadRequest(f"{HEADER_LENGTH} must be a number of bytes, got {value[:40]!r}")
    length = int(text)
    if length > body_length:
        raise BadRequest(
            f"{HEADER_LENGTH} is {length} but the body has {body_length} bytes; "
            "it must be the length of the JSON part, between 0 and the body length"
        )
    return length


def decode_request(
    body: bytes,
    header_length: int | None,
    signature: Signature,
    *,
    max_elements: int,
    max_batch_size: int = 0,
) -> InferRequest:
    """Parse and check a whole infer request against the model's signature."""
    json_end = len(body) if header_length is None else header_length
    try:
        doc = json.loads(body[:json_end])
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also an int past 4300 digits
        raise BadRequest(f"the request's JSON part is not valid JSON: {exc}") from None
    except RecursionError:  # the C decoder recurses once per nested array or object
        raise BadRequest("the request's JSON part is nested too deeply") from None
    if not isinstance(doc, dict):
        raise BadRequest("the request must be a JSON object with an 'inputs' list")
    binary = memoryview(body)[json_end:]

    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")

    specs = {s.name: s for s in signature.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        if not isinstance(raw, dict):
            raise BadRequest("each entry of 'inputs' must be an object")
        name = raw.get("name")
        spec, shape = check_input(
            specs, inputs, name, raw.get("shape"), raw.get("datatype"), max_elements, max_batch_size
        )
        params = _parameters(raw, f"input {name!r}")
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise BadRequest(f"input {name!r} has both 'data' and binary_data_size")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BadRequest(f"input {name!r}: binary_data_size must be an integer >= 0")
            if offset + size > len(binary):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(binary) - offset} binary bytes left)"
                )
            chunk = binary[offset : offset + size]
            offset += size
            inputs[name] = from_binary(name, chunk, spec.datatype, shape)
        else:
            if "data" not in raw:
                raise BadRequest(f"input {name!r} has neither 'data' nor binary_data_size")
            inputs[name] = _from_json(name, raw["data"], spec.datatype, shape)

    if offset != len(binary):
        raise BadRequest(
            f"{len(binary) - offset} bytes after the JSON part belong to no input; "
            "check binary_data_size and " + HEADER_LENGTH
        )
    check_complete(specs, inputs)
    outputs = _requested_outputs(doc, signature)
    return InferRequest(request_id, inputs, outputs)


def check_input(
    specs: dict[str, TensorSpec],
    seen: dict[str, np.ndarray],
    name: Any,
    shape: Any,
    datatype: Any,
    max_elements: int,
    max_batch_size: int,
) -> tuple[TensorSpec, list[int]]:
    """One input's name, shape and datatype against the model, before its data is read (every
    transport: JSON, binary, gRPC)."""
    if not isinstance(name, str) or name not in specs:
        raise BadRequest(f"unknown input {name!r}; the model's inputs are {sorted(specs)}")
    if name in seen:
        raise BadRequest(f"input {name!r} is given twice")
    spec = specs[name]
    shape = _check_shape(shape, spec, max_elements, max_batch_size)
    if datatype != spec.datatype:
        raise BadRequest(f"input {name!r} expects datatype {spec.datatype}, got {datatype!r}")
    return spec, shape


def check_complete(specs: dict[str, TensorSpec], inputs: dict[str, np.ndarray]) -> None:
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise BadRequest(f"missing input(s) {missing}")


def _check_shape(shape: Any, spec: TensorSpec, max_elements: int, max_batch: int) -> list[int]:
    name = spec.name
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise BadRequest(f"input {name!r}: 'shape' must be a list of integers")
    if any(d < 0 for d in shape):
        raise BadRequest(f"input {name!r}: negative dimension in shape {shape}")
    if len(shape) != len(spec.shape):
        raise BadRequest(
            f"input {name!r}: shape {shape} has rank {len(shape)}, model expects "
            f"{spec.shape} (-1 is any size)"
        )
    for got, want in zip(shape, spec.shape, strict=True):
        if want != -1 and got != want:
            raise BadRequest(f"input {name!r}: shape {shape} does not fit the model's {spec.shape}")
    count = math.prod(shape)  # exact: Python integers
    if count > max_elements:
        raise BadRequest(
            f"input {name!r}: shape {shape} has {count} elements, above the limit of "
            f"{max_elements} per tensor"
        )
    # a zero elsewhere makes the count 0, but numpy has no array with a dimension past int64
    if any(d > max_elements for d in shape):
        raise BadRequest(
            f"input {name!r}: shape {shape} has a dimension above the limit of "
            f"{max_elements} elements per tensor"
        )
    if max_batch and spec.shape and spec.shape[0] == -1 and shape[0] > max_batch:
        raise BadRequest(f"input {name!r}: batch {shape[0]} exceeds max_batch_size {max_batch}")
    return shape


def from_binary(name: str, chunk: memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """A tensor from its raw little-endian bytes (Triton's binary extension, gRPC's raw
    contents), a view on ``chunk`` where possible."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _decode_bytes_elements(name, chunk, count).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise BadRequest(
            f"input {name!r}: shape {shape} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"binary_data_size is {len(chunk)}"
        )
    array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    # a read-only view on the body, no copy, when it can be used as it is (a copy of 600 kB
    # into fresh memory was a tenth of a millisecond per image on the benchmark machine)
    if not array.dtype.isnative:
        return array.astype(dtype.newbyteorder("="))
    return array if array.flags.aligned else array.copy()


def _decode_bytes_elements(name: str, chunk: memoryview, count: int) -> np.ndarray:
    items: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if len(items) == count:
            raise BadRequest(f"input {name!r}: more BYTES elements than the shape holds")
        if pos + 4 > len(chunk):
            raise BadRequest(f"input {name!r}: truncated BYTES length prefix")
        (n,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + n > len(chunk):
            raise BadRequest(f"input {name!r}: BYTES element of {n} bytes runs past its tensor")
        items.append(bytes(chunk[pos : pos + n]))
        pos += n
    if len(items) != count:
        raise BadRequest(f"input {name!r}: {len(items)} BYTES elements, the shape holds {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _flatten(name: str, data: Any, count: int) -> list[Any]:
    """Row-major flattening of nested lists, refusing to grow beyond ``count`` values."""
    flat: list[Any] = []
    stack = [iter([data])]
    while stack:
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(item, list):
            if len(stack) > 64:
                raise BadRequest(f"input {name!r}: 'data' is nested too deeply")
            stack.append(iter(item))
        else:
            flat.append(item)
            if len(flat) > count:
                break
    if len(flat) != count:
        raise BadRequest(
            f"input {name!r}: 'data' has {'more than ' if len(flat) > count else ''}{len(flat)} "
            f"values, the shape holds {count}"
        )
    return flat


def _from_json(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    count = math.prod(shape)
    # the usual form is already flat: check it with one pass over the types in C, instead of
    # walking it in Python (a 224x224 image is 150,528 values)
    flat = data
    types = set(map(type, flat)) if len(flat) == count else None
    if types is None or list in types:  # nested, or the wrong count: walk it, say how many
        flat = _flatten(name, data, count)
        types = set(map(type, flat))
    if datatype == "BYTES":
        if not types <= {str}:
            raise BadRequest(f"input {name!r}: BYTES values in JSON must be strings")
        try:
            encoded = [v.encode() for v in flat]
        except UnicodeEncodeError:  # a lone surrogate, sent as a \ud800 escape
            raise BadRequest(f"input {name!r}: BYTES values must be valid Unicode") from None
        array = np.empty(len(flat), dtype=object)
        array[:] = encoded
        return array.reshape(shape)
    allowed = {bool} if datatype == "BOOL" else {int, float} if datatype.startswith("FP") else {int}
    if not types <= allowed:
        raise BadRequest(f"input {name!r}: 'data' holds values that are not {datatype}")
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise BadRequest(f"input {name!r}: value out of range for {datatype}: {exc}") from None


def _requested_outputs(doc: dict[str, Any], signature: Signature) -> list[RequestedOutput]:
    params = _parameters(doc, "the request")
    binary_default = params.get("binary_data_output", False) is True
    known = [s.name for s in signature.outputs]
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None and not isinstance(raw_outputs, list):
        raise BadRequest("'outputs' must be a list")
    if not raw_outputs:  # absent or empty: the protocol's "every output"
        return [RequestedOutput(n, binary_default) for n in known]
    requested: dict[str, RequestedOutput] = {}
    for raw in raw_outputs:
        if not isinstance(raw, dict) or raw.get("name") not in known:
            name = raw.get("name") if isinstance(raw, dict) else raw
            raise BadRequest(f"unknown output {name!r}; the model's outputs are {known}")
        name = raw["name"]
        if name in requested:
            raise BadRequest(f"output {name!r} is requested twice")
        out_params = _parameters(raw, f"output {name!r}")
        binary = out_params.get("binary_data", binary_default) is True
        requested[name] = RequestedOutput(name, binary)
    return list(requested.values())


def _parameters(raw: dict[str, Any], where: str) -> dict[str, Any]:
    params = raw.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    return params


# -- encoding -----------------------------------------------------------------------------------


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    results: dict[str, np.ndarray],
    requested: list[RequestedOutput],
) -> tuple[bytes, int | None]:
    """Return the body and, when any output is binary, the JSON part's length for the header."""
    outputs = []
    chunks: list[bytes] = []
    for req in requested:
        array = np.asarray(results[req.name])
        datatype = datatype_of(array)
        out: dict[str, Any] = {"name": req.name, "datatype": datatype, "shape": list(array.shape)}
        if req.binary:
            raw = to_binary(array, datatype)
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = _to_json(array, datatype)
        outputs.append(out)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for v in array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts += [struct.pack("<I", len(b)), b]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def _to_json(array: np.ndarray, datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


# -- metadata -----------------------------------------------------------------------------------


def model_metadata(
    name: str,
    version: str,
    signature: Signature,
    execution_provider: str,
    precision: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The v2 metadata, plus the onnxruntime provider in use and the precision served, with
    why (clients ignore extra keys)."""
    return {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "execution_provider": execution_provider,
        "precision": precision or {"precision": "fp32"},
        "inputs": [s.to_dict() for s in signature.inputs],
        "outputs": [s.to_dict() for s in signature.outputs],
    }


def model_config(name: str, signature: Signature, max_batch_size: int) -> dict[str, Any]:
    """Triton's model configuration, in the minimal form its tooling reads."""
    batched = signature.batched and max_batch_size > 0

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        dims = spec.shape[1:] if batched else spec.shape
        return {"name": spec.name, "data_type": CONFIG_TYPES[spec.datatype], "dims": dims}

    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": max_batch_size if batched else 0,
        "input": [tensor(s) for s in signature.inputs],
        "output": [tensor(s) for s in signature.outputs],
    }
