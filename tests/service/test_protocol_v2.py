"""The v2 codec on its own: round trips for every datatype, and every malformed frame -> 400."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import BadRequest
from service.protocol import v2
from service.protocol.v2 import RequestedOutput, Signature, TensorSpec

NUMERIC = [t for t in v2.DATATYPES if t != "BYTES"]


def sig(datatype="FP32", shape=(-1, 4)) -> Signature:
    return Signature([TensorSpec("x", datatype, list(shape))], [TensorSpec("y", datatype, [-1])])


def binary_request(doc: dict, *chunks: bytes) -> tuple[bytes, int]:
    head = json.dumps(doc).encode()
    return head + b"".join(chunks), len(head)


def sample(datatype: str, shape, rng) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([f"s{i}".encode() for i in range(int(np.prod(shape)))], object).reshape(
            shape
        )
    dtype = v2.DATATYPES[datatype]
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)


@pytest.mark.parametrize("datatype", list(v2.DATATYPES))
@pytest.mark.parametrize("binary", [False, True])
def test_decode_roundtrip_every_datatype(datatype, binary):
    rng = np.random.default_rng(0)
    x = sample(datatype, (2, 4), rng)
    tensor = {"name": "x", "shape": [2, 4], "datatype": datatype}
    if binary:
        raw = v2.to_binary(x, datatype)
        tensor["parameters"] = {"binary_data_size": len(raw)}
        body, length = binary_request({"inputs": [tensor]}, raw)
    else:
        tensor["data"] = v2._to_json(x, datatype)
        body, length = json.dumps({"inputs": [tensor]}).encode(), None
    req = v2.decode_request(body, length, sig(datatype), max_elements=100)
    np.testing.assert_array_equal(req.inputs["x"], x)
    assert req.inputs["x"].dtype == x.dtype


@pytest.mark.parametrize("datatype", list(v2.DATATYPES))
def test_encode_binary_output_is_little_endian_after_json(datatype):
    y = sample(datatype, (3,), np.random.default_rng(1))
    body, length = v2.encode_response("m", "1", "req-7", {"y": y}, [RequestedOutput("y", True)])
    doc = json.loads(body[:length])
    assert doc["id"] == "req-7" and doc["outputs"][0]["datatype"] == datatype
    size = doc["outputs"][0]["parameters"]["binary_data_size"]
    assert len(body) == length + size
    if datatype != "BYTES":
        np.testing.assert_array_equal(np.frombuffer(body[length:], v2.DATATYPES[datatype]), y)


def test_nested_json_data_is_row_major():
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": [[1, 2, 3, 4], [5, 6, 7, 8]],
                }
            ]
        }
    ).encode()
    req = v2.decode_request(body, None, sig(), max_elements=100)
    assert req.inputs["x"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def fp32_binary(shape, size, payload: bytes):
    tensor = {
        "name": "x",
        "shape": shape,
        "datatype": "FP32",
        "parameters": {"binary_data_size": size},
    }
    return binary_request({"inputs": [tensor]}, payload)


@pytest.mark.parametrize(
    "shape, size, payload, message",
    [
        ([2**62, 4], 32, b"\0" * 32, "elements"),  # would overflow int64 products
        ([-1, 4], 16, b"\0" * 16, "negative"),
        ([2, 4], 16, b"\0" * 16, "needs 32 bytes"),  # shape x itemsize != size
        ([2, 4], 64, b"\0" * 32, "runs past the end"),  # size > what was sent
        ([2, 4], 32, b"\0" * 40, "belong to no input"),  # trailing bytes
        ([2, 3], 24, b"\0" * 24, "does not fit"),  # model wants 4 columns
        ([2, 4, 1], 32, b"\0" * 32, "rank"),
        ([2, 4.0], 32, b"\0" * 32, "list of integers"),
        ([True, 4], 16, b"\0" * 16, "list of integers"),
        ([65, 4], 1040, b"\0" * 1040, "max_batch_size"),
    ],
)
def test_decode_rejects_inconsistent_binary_frames(shape, size, payload, message):
    body, length = fp32_binary(shape, size, payload)
    with pytest.raises(BadRequest, match=message):
        v2.decode_request(body, length, sig(), max_elements=1 << 20, max_batch_size=64)


@pytest.mark.parametrize("value", ["-1", "abc", "99999", "1_0", "+5", "", "1e1", "9" * 5000])
def test_header_length_outside_body_is_rejected(value):
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        v2.parse_header_length(value, 100)


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"inputs": []}, "non-empty"),
        ([], "JSON object"),
        (
            {"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]},
            "unknown input",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": [0] * 4}]},
            "expects datatype FP32",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 5}]},
            "more than",
        ),
        (
            {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0] * 4}]},
            "4 values, the shape holds 8",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a"] * 4}]},
            "not FP32",
        ),
        ({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}, "neither"),
        (
            {
                "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}],
                "outputs": [{"name": "nope"}],
            },
            "unknown output",
        ),
        ({"id": 5, "inputs": []}, "'id' must be a string"),
    ],
)
def test_decode_rejects_bad_json_requests(doc, message):
    with pytest.raises(BadRequest, match=message):
        v2.decode_request(json.dumps(doc).encode(), None, sig(), max_elements=100)


def test_json_int_out_of_range_is_rejected():
    doc = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "INT8", "data": [1, 300]}]}
    with pytest.raises(BadRequest, match="out of range"):
        v2.decode_request(json.dumps(doc).encode(), None, sig("INT8", (-1, 2)), max_elements=10)


@pytest.mark.parametrize(
    "payload, message",
    [
        (struct.pack("<I", 100) + b"ab", "runs past"),
        (b"\x01\x00", "truncated"),
        (struct.pack("<I", 1) + b"a", "1 BYTES elements, the shape holds 2"),
    ],
)
def test_bytes_framing_errors(payload, message):
    tensor = {
        "name": "x",
        "shape": [1, 2],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(payload)},
    }
    body, length = binary_request({"inputs": [tensor]}, payload)
    with pytest.raises(BadRequest, match=message):
        v2.decode_request(body, length, sig("BYTES", (-1, 2)), max_elements=10)


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(-(2**63), 2**63), min_size=2, max_size=2),
    size=st.integers(-(2**63), 2**63),
    sent=st.integers(0, 64),
)
def test_decode_never_allocates_beyond_what_was_sent(shape, size, sent):
    """Any shape / size / payload either decodes to exactly the bytes sent or is a 400."""
    body, length = fp32_binary(shape, size, b"\0" * sent)
    try:
        req = v2.decode_request(body, length, sig(), max_elements=1 << 20)
    except BadRequest:
        return
    assert req.inputs["x"].nbytes == sent


def test_config_skips_batch_dim_when_batched():
    s = Signature([TensorSpec("x", "FP32", [-1, 3, 8, 8])], [TensorSpec("y", "FP32", [-1, 10])])
    cfg = v2.model_config("m", s, 64)
    assert cfg["max_batch_size"] == 64
    assert cfg["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3, 8, 8]}]
    fixed = Signature([TensorSpec("x", "FP32", [1, 3])], [TensorSpec("y", "FP32", [1, 3])])
    assert v2.model_config("m", fixed, 64)["max_batch_size"] == 0


@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_binary_input_is_a_view_when_aligned_and_a_copy_otherwise(pad):
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    raw = x.tobytes()
    # the JSON part's length decides where the tensor starts; pad it to every alignment
    tensor = {"name": "x", "shape": [2, 4], "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [tensor]}).encode()
    head += b" " * ((-len(head) + pad) % 4)
    body = head + raw
    got = v2.decode_request(body, len(head), sig(), max_elements=100).inputs["x"]
    np.testing.assert_array_equal(got, x)
    assert got.flags.aligned and got.dtype.isnative
    address = np.frombuffer(body, np.uint8).ctypes.data + len(head)
    assert (got.ctypes.data == address) == (address % 4 == 0)


def _one_input(**extra) -> bytes:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}
    return json.dumps({"inputs": [tensor], **extra}).encode()


@pytest.mark.parametrize("outputs", [None, []])
def test_absent_or_empty_outputs_ask_for_every_output(outputs):
    extra = {} if outputs is None else {"outputs": outputs}
    body = _one_input(parameters={"binary_data_output": True}, **extra)
    req = v2.decode_request(body, None, sig(), max_elements=100)
    assert req.outputs == [RequestedOutput("y", True)]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"outputs": [{"name": "y"}, {"name": "y"}]}, "requested twice"),
        ({"outputs": {}}, "'outputs' must be a list"),
        ({"outputs": [{"name": "y", "parameters": []}]}, "output 'y': 'parameters' must be"),
        ({"parameters": False}, "the request: 'parameters' must be an object"),
        ({"parameters": []}, "the request: 'parameters' must be an object"),
    ],
)
def test_decode_rejects_bad_requested_outputs_and_parameters(extra, message):
    with pytest.raises(BadRequest, match=message):
        v2.decode_request(_one_input(**extra), None, sig(), max_elements=100)


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"inputs": [{"name": "x", "shape": [' + b"7" * 5000 + b"]}]}", "not valid JSON"),
    ],
    ids=["deep nesting", "int past the digit limit"],
)
def test_json_the_decoder_cannot_take_is_a_bad_request(body, message):
    with pytest.raises(BadRequest, match=message):
        v2.decode_request(body, None, sig(), max_elements=100)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ["FP32", "BYTES"])
def test_empty_tensor_with_a_dimension_past_int64_is_a_bad_request(binary, datatype):
    """[0, 2**70] holds no elements, but numpy cannot shape an array so (was a 500)."""
    tensor = {"name": "x", "shape": [0, 2**70], "datatype": datatype}
    if binary:
        tensor["parameters"] = {"binary_data_size": 0}
        body, length = binary_request({"inputs": [tensor]})
    else:
        tensor["data"] = []
        body, length = json.dumps({"inputs": [tensor]}).encode(), None
    with pytest.raises(BadRequest, match="dimension above the limit"):
        v2.decode_request(body, length, sig(datatype, (-1, -1)), max_elements=100)


def test_json_bytes_with_a_lone_surrogate_is_a_bad_request():
    """ "\\ud800" is valid JSON but no UTF-8 string (was a 500 from str.encode)."""
    doc = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "BYTES", "data": ["\ud800"]}]}
    with pytest.raises(BadRequest, match="valid Unicode"):
        v2.decode_request(json.dumps(doc).encode(), None, sig("BYTES", (-1, 1)), max_elements=10)
