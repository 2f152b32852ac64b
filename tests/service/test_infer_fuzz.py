"""Hypothesis over v2 infer bodies sent to real servers: no request is ever answered 5xx.

``test_schema_fuzz.py`` fuzzes what the OpenAPI document describes; an infer body is mostly
outside it (raw bytes after a JSON header, a header giving the JSON's length). Here bodies are
built from the models' own metadata, JSON and binary (Triton's extension, inputs mixed), then
mutated: any field replaced by a value of another JSON type or removed, shapes negative, zero,
huge or not integers, data shorter, longer, ragged or deeply nested, datatypes unknown or
another model's, parameters of every type, requested outputs unknown or duplicated, the body
truncated or extended, bytes that are not UTF-8, ``Inference-Header-Content-Length`` past the
body, negative or not a number, and gzip/deflate encodings. They go to both infer routes
(with and without a version) on a server with the fast path (``routes/infer_asgi.py``) and one
without it (``BNFOLD_INFER_FAST_PATH=0``).

Every answer is 2xx or 4xx; an error is a JSON ``{"error": "..."}`` naming the problem; a valid
body gets 200 with exactly its inputs back on the identity models; the server stays ready.
The profile is fixed (derandomized, bounded examples), so a run repeats exactly.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from tests.service.support import (
    ONNX_TYPES,
    TEST_ENV,
    TOKEN,
    Server,
    all_datatypes_model,
    conv_bn_model,
    seed_store,
)

HEADER = "Inference-Header-Content-Length"
MAX_ELEMENTS = int(TEST_ENV["BNFOLD_MAX_TENSOR_ELEMENTS"])
DTYPES = {
    "BOOL": np.dtype(bool),
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

# one profile for every test here: repeatable, and small enough for CI on two cores
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def identity_model(datatype: str, shape: list[Any]) -> onnx.ModelProto:
    """in_x -> Identity -> out_x."""
    elem = ONNX_TYPES[datatype]
    x = helper.make_tensor_value_info("in_x", elem, shape)
    y = helper.make_tensor_value_info("out_x", elem, shape)
    graph = helper.make_graph([helper.make_node("Identity", ["in_x"], ["out_x"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


MODELS = {
    "conv": conv_bn_model(),  # x[N,3,8,8] -> y[N,4,8,8], batched
    "identity_all": all_datatypes_model(),  # in_T[N,3] -> out_T, every datatype
    "matrix": identity_model("FP32", ["N", "M"]),  # two variable dimensions
    "fixed": identity_model("INT32", [2, 2]),  # no batch dimension: never batched
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The same seeded store served with the fast path and through FastAPI; each model's
    metadata, as a client would read it first."""
    root = tmp_path_factory.mktemp("infer-fuzz")
    for name, model in MODELS.items():
        seed_store(root / "store", name, model)
    env = {**TEST_ENV, "BNFOLD_API_TOKEN": TOKEN, "BNFOLD_DEPLOY_DEFAULTS": "0"}
    started = {
        "fast path": Server(root / "store", env).start(wait=False),
        "fastapi": Server(root / "store", {**env, "BNFOLD_INFER_FAST_PATH": "0"}),
    }
    started["fast path"].wait_ready()  # the first start recovers the store; then the second
    started["fastapi"].start()
    with started["fast path"].client() as client:
        metadata = {name: client.get(f"/v2/models/{name}").json() for name in MODELS}
    yield started, metadata
    for server in started.values():
        server.stop()


# -- valid requests -------------------------------------------------------------------------


@dataclass
class Case:
    model: str
    path: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    # for an unmutated body: what the answer must be
    expect: dict[str, Any] | None = None
    mutations: list[str] = field(default_factory=list)


def _values(datatype: str) -> st.SearchStrategy:
    dtype = DTYPES[datatype]
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.text(max_size=6)
    if dtype.kind == "f":
        return st.floats(width=8 * dtype.itemsize, allow_nan=False, allow_infinity=False)
    info = np.iinfo(dtype)
    return st.integers(int(info.min), int(info.max))


@st.composite
def tensors(draw, spec: dict[str, Any]) -> np.ndarray:
    """An array that fits ``spec`` (the model metadata's input): -1 dimensions drawn."""
    shape = [draw(st.integers(0, 3)) if d == -1 else d for d in spec["shape"]]
    count = math.prod(shape)
    datatype = spec["datatype"]
    if count > 16:  # the convolution's images: drawn from a seed, not value by value
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return rng.standard_normal(shape).astype(DTYPES[datatype])
    values = draw(st.lists(_values(datatype), min_size=count, max_size=count))
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = [v.encode() for v in values]
        return array.reshape(shape)
    return np.array(values, dtype=DTYPES[datatype]).reshape(shape)


# dimensions of odd tensors: zero, huge, past the element limit
DIMS = [0, 1, 2, 3, 4, 8, 2**31, 2**70, MAX_ELEMENTS + 1]


def _odd_values(datatype: str) -> st.SearchStrategy:
    """Values a client may send for ``datatype`` that it cannot hold."""
    if datatype == "BYTES":  # lone surrogates: not UTF-8 once encoded
        return st.just("\ud800") | st.text(st.characters(exclude_categories=()), max_size=4)
    if datatype == "BOOL":
        return st.sampled_from([0, 1, "true", None])
    if DTYPES[datatype].kind == "f":
        return st.sampled_from([10**400, math.inf, -math.inf, math.nan, 2**64, "1.0"])
    return st.sampled_from([2**64, -(2**63) - 1, -1, 0.5, 1e30, "1", True])


@st.composite
def odd_tensors(draw, spec: dict[str, Any]) -> tuple[list[int], list[Any], bytes]:
    """Shape, JSON data and binary data that agree with each other but maybe not with the
    model: zero, huge or wrong dimensions, another rank, values out of the datatype's range."""
    keep = st.integers(0, 3).map(lambda i: i < 3)  # a fixed dimension, mostly kept
    shape = [d if d != -1 and draw(keep) else draw(st.sampled_from(DIMS)) for d in spec["shape"]]
    if draw(st.integers(0, 3)) == 3:  # no elements, but a dimension no array can have
        shape = draw(st.permutations([0] + [2**70] * (len(shape) - 1)))
    rank_change = draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    shape = shape + [1] if rank_change > 0 else shape[:-1] if rank_change < 0 else shape
    count = math.prod(shape)
    n = count if count <= 64 else draw(st.integers(0, 4))
    datatype = spec["datatype"]
    values = draw(st.lists(_odd_values(datatype) | _values(datatype), min_size=n, max_size=n))
    if datatype == "BYTES":
        raw = b"".join(
            struct.pack("<I", len(b)) + b
            for b in (str(v).encode("utf-8", "surrogatepass") for v in values)
        )
    else:
        itemsize = DTYPES[datatype].itemsize
        raw = draw(st.binary(min_size=n * itemsize, max_size=n * itemsize))
    return shape, values, raw


def to_json_data(array: np.ndarray, nested: bool) -> list[Any]:
    if array.dtype == object:
        flat = [v.decode() for v in array.reshape(-1)]
        return np.array(flat, dtype=object).reshape(array.shape).tolist() if nested else flat
    return array.tolist() if nested else array.reshape(-1).tolist()


def to_binary(array: np.ndarray) -> bytes:
    if array.dtype == object:
        return b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
    return array.tobytes()


# values that have broken decoders: a lone surrogate cannot be encoded to UTF-8, 2**64 fits
# no int64, a float where an int is due, a bool (an int to Python)
ODD_SCALARS = st.sampled_from(["\ud800", "", "1", 2**64, -1, -(2**63) - 1, 1.5, 1e300, True])
# any JSON value, for "parameters" a client may add and for fields given the wrong type
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=6)
    | ODD_SCALARS
    | st.sampled_from(["FP32", "BYTES", "x", "in_x", "out_x", "y", "true"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
EXTRA_PARAMETERS = st.dictionaries(
    st.sampled_from(["sequence_id", "sequence_start", "sequence_end", "priority", "timeout"])
    | st.text(max_size=6),
    JSON_VALUES,
    max_size=3,
)


@st.composite
def valid_cases(draw, metadata: dict[str, dict], binary: bool, odd: bool = False) -> Case:
    """A request that fits the model; with ``odd``, one tensor from ``odd_tensors``."""
    model = draw(st.sampled_from(sorted(metadata)))
    meta = metadata[model]
    specs = draw(st.permutations(meta["inputs"]))  # any input order; chunks follow it
    arrays: dict[str, np.ndarray] = {}
    inputs, chunks = [], []
    # one odd tensor among good ones, so that its check is the one reached
    odd_one = draw(st.sampled_from([s["name"] for s in specs])) if odd else None
    for spec in specs:
        if spec["name"] == odd_one:
            shape, data, raw = draw(odd_tensors(spec))
        else:
            array = draw(tensors(spec))
            arrays[spec["name"]] = array
            shape, raw = list(array.shape), None
            data = to_json_data(array, nested=draw(st.booleans()))
        tensor = {"name": spec["name"], "shape": shape, "datatype": spec["datatype"]}
        params = draw(EXTRA_PARAMETERS.filter(lambda p: "binary_data_size" not in p))
        if binary and draw(st.booleans()):
            raw = to_binary(array) if raw is None else raw
            params["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            tensor["data"] = data
        if params or draw(st.booleans()):
            tensor["parameters"] = params
        inputs.append(tensor)
    doc: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=8))
    params = draw(EXTRA_PARAMETERS.filter(lambda p: "binary_data_output" not in p))
    if binary and draw(st.booleans()):
        params["binary_data_output"] = draw(st.booleans())
    if params:
        doc["parameters"] = params
    names = [o["name"] for o in meta["outputs"]]
    if draw(st.booleans()):  # absent, or [] (every output), or some of them
        chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
        doc["outputs"] = []
        for name in chosen:
            out: dict[str, Any] = {"name": name}
            if binary and draw(st.booleans()):
                out["parameters"] = {"binary_data": draw(st.booleans())}
            doc["outputs"].append(out)
    head = json.dumps(doc).encode()
    headers = {"Content-Type": "application/json"} if draw(st.booleans()) else {}
    if binary:
        headers[HEADER] = str(len(head))
    version = meta["versions"][0]
    path = draw(
        st.sampled_from(
            [f"/v2/models/{model}/infer", f"/v2/models/{model}/versions/{version}/infer"]
        )
    )
    return Case(model, path, head + b"".join(chunks), headers, {"doc": doc, "arrays": arrays})


# -- mutations ------------------------------------------------------------------------------

ODD_DIMS = [-1, 0, 1, 2**31, 2**63, 2**64, 10**30, MAX_ELEMENTS + 1, 1.0, True, "2", None]


def _shapes(shape: Any) -> st.SearchStrategy:
    rank = len(shape) if isinstance(shape, list) else 2
    return st.one_of(
        # the model's rank, so that the checks after the rank's are reached
        st.lists(st.sampled_from(ODD_DIMS) | st.integers(-3, 9), min_size=rank, max_size=rank),
        # a zero dimension beside a huge one: no elements, but no array either
        st.permutations([0, *[2**70] * (rank - 1)]) if rank > 1 else st.just([2**70]),
        st.lists(st.integers(-3, 4), max_size=5),
        JSON_VALUES,
    )


DATATYPES = st.sampled_from([*DTYPES, "BF16", "FP8", "fp32", "", "STRING", "\ud800"]) | JSON_VALUES
SIZES = st.sampled_from([0, 1, -1, 3, 4, 2**31, 2**63, 2**64, 1.0, "4", True, None, [4]])


def _data_mutations(data: Any) -> st.SearchStrategy:
    flat = data if isinstance(data, list) else [data]
    choices = [
        st.just(flat[:-1]),
        st.just(flat + flat[:1]),
        st.just(flat + [0.5]),
        st.just([flat]),
        st.just([flat[: len(flat) // 2], flat[len(flat) // 2 :] + [[1]]]),  # ragged
        st.just(_nest(flat, 70)),  # past the decoder's nesting limit
        st.just({"values": flat}),
        st.lists(JSON_VALUES, min_size=len(flat), max_size=len(flat)),
        JSON_VALUES,
    ]
    if flat:
        choices.append(st.integers(0, len(flat) - 1).flatmap(lambda i: _replace_one(flat, i)))
    return st.one_of(choices)


def _nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def _replace_one(flat: list, i: int) -> st.SearchStrategy:
    return (ODD_SCALARS | JSON_VALUES).map(lambda v: [*flat[:i], v, *flat[i + 1 :]])


def _targeted(key: Any, value: Any, metadata: dict) -> st.SearchStrategy:
    """Values for a field that know what the field is."""
    names = sorted({t["name"] for m in metadata.values() for t in m["inputs"] + m["outputs"]})
    if key == "shape":
        return _shapes(value)
    if key == "datatype":
        return DATATYPES
    if key == "data":
        return _data_mutations(value)
    if key == "binary_data_size":
        return SIZES
    if key == "name":
        return st.sampled_from([*names, "", "nope", "\ud800"]) | JSON_VALUES
    if key in ("parameters", "id", "binary_data_output", "binary_data"):
        return JSON_VALUES
    if key == "outputs":
        return st.one_of(
            st.just([]),
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from([*names, "nope"])},
                    optional={"parameters": JSON_VALUES},
                ),
                max_size=3,
            ),
            st.sampled_from(names).map(lambda n: [{"name": n}, {"name": n}]),  # duplicated
            st.lists(JSON_VALUES, max_size=3),
            JSON_VALUES,
        )
    if key == "inputs":
        return st.just([]) | st.lists(JSON_VALUES, max_size=2) | JSON_VALUES
    return JSON_VALUES


# the fields a mutation picks, most often the first
FIELD_ORDER = {
    k: i
    for i, k in enumerate(
        ["shape", "data", "datatype", "binary_data_size", "an item", "parameters", "name"]
        + ["outputs", "binary_data_output", "binary_data", "id", "inputs"]
    )
}


def _slots(value: Any, parent: Any = None, key: Any = None):
    """Every (container, key) in a JSON document."""
    if parent is not None:
        yield parent, key
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _slots(v, value, k)
    elif isinstance(value, list) and len(value) <= 16:  # not into long data lists
        for i, v in enumerate(value):
            yield from _slots(v, value, i)


@st.composite
def mutated_docs(draw, doc: dict, metadata: dict) -> tuple[dict, list[str]]:
    doc = copy.deepcopy(doc)
    done = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        # which field first, then which of its slots: hypothesis favours the first choice of
        # a draw, and the first slot of a document is its whole 'inputs' list
        slots: dict[Any, list] = {}
        for parent, key in _slots(doc):
            slots.setdefault(key if isinstance(key, str) else "an item", []).append(parent)
        if not slots:  # everything deleted
            break
        fields = sorted(slots, key=lambda k: FIELD_ORDER.get(k, len(FIELD_ORDER)))
        key = draw(st.sampled_from(fields))
        parent = draw(st.randoms(use_true_random=False)).choice(slots[key])
        if key == "an item":
            key = draw(st.sampled_from(range(len(parent)))) if parent else None
            if key is None:
                continue
        action = draw(st.sampled_from(["targeted", "targeted", "replace", "delete", "add"]))
        if action == "delete":
            del parent[key]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["parameters", "data", "outputs", "extra"]))] = draw(
                JSON_VALUES
            )
        elif action == "replace":
            parent[key] = draw(JSON_VALUES)
        else:
            parent[key] = draw(_targeted(key, parent[key], metadata))
        done.append(f"{action} {key!r}")
    return doc, done


def _header_values(body_length: int, json_length: int) -> st.SearchStrategy:
    return st.sampled_from(
        [
            str(body_length + 1),
            str(2**64),
            "-1",
            "-0",
            "0",
            str(json_length - 1),
            str(json_length + 1),
            "",
            "1 2",
            "abc",
            "1e3",
            "0x10",
            "1_0",
            "+5",
            "9" * 5000,
            b"\xff\xfe12",
        ]
    )


BODY_BYTES = st.binary(max_size=12) | st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])


@st.composite
def mutated_bodies(draw, case: Case) -> tuple[bytes, dict, str]:
    """Mutations of the bytes and headers rather than of the document."""
    body, headers = case.body, dict(case.headers)
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "insert",
                "append",
                "replace",
                "deep",
                "long int",
                "not utf-8",
                "utf-16",
                "header length",
                "no header length",
                "encoding",
            ]
        )
    )
    if kind == "truncate":
        body = body[: len(body) - draw(st.integers(1, max(1, len(body))))]
    elif kind == "insert":
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(BODY_BYTES) + body[at:]
    elif kind == "append":
        body += draw(BODY_BYTES)
    elif kind == "replace":
        body = draw(st.binary(max_size=64))
    elif kind == "deep":
        depth = draw(st.sampled_from([100, 5000, 200_000]))
        body = b'{"inputs": ' + b"[" * depth + b"]" * draw(st.sampled_from([0, depth])) + b"}"
        headers.pop(HEADER, None)
    elif kind == "long int":  # beyond Python's digit limit for int()
        body = body.replace(b'"shape": [', b'"shape": [' + b"7" * 5000 + b", ", 1)
        headers.pop(HEADER, None)
    elif kind == "not utf-8":
        body = body.replace(b'"name": "', b'"name": "\xff\xfe', 1)
        headers.pop(HEADER, None)
    elif kind == "utf-16":
        body = body.decode("latin-1").encode(draw(st.sampled_from(["utf-16", "utf-32-be"])))
        headers.pop(HEADER, None)
    elif kind == "header length":
        json_length = int(headers.get(HEADER, len(body)))
        headers[HEADER] = draw(_header_values(len(body), json_length))
    elif kind == "no header length":
        headers.pop(HEADER, None)
    else:
        encoding = draw(st.sampled_from(["gzip", "deflate", "br", "gzip, deflate", "GZIP"]))
        if draw(st.booleans()) and encoding in ("gzip", "GZIP"):
            body = gzip.compress(body)
        elif encoding == "deflate" and draw(st.booleans()):
            body = zlib.compress(body)
        headers["Content-Encoding"] = encoding
    return body, headers, kind


@st.composite
def mutated_cases(draw, metadata: dict, binary: bool) -> Case:
    # hypothesis favours a draw's smallest value: 0 is the common case, here and below
    odd = draw(st.integers(0, 2)) == 0
    case = draw(valid_cases(metadata, binary, odd))
    doc = case.expect["doc"]
    case.expect = None
    case.mutations = ["odd tensors"] if odd else []
    if draw(st.integers(0, 3)) < (1 if odd else 3):  # the document, re-serialized
        json_length = int(case.headers.get(HEADER, len(case.body)))
        doc, done = draw(mutated_docs(doc, metadata))
        case.mutations += done
        head = json.dumps(doc).encode()
        case.body = head + case.body[json_length:]
        if HEADER in case.headers:
            case.headers[HEADER] = str(len(head))
    if not case.mutations or draw(st.integers(0, 3)) == 3:
        case.body, case.headers, kind = draw(mutated_bodies(case))
        case.mutations.append(kind)
    if draw(st.integers(0, 9)) == 0:  # a version the server does not have: 404
        case.path = f"/v2/models/{case.model}/versions/0000/infer"
    return case


# -- the answers ----------------------------------------------------------------------------


def decode_response(response: httpx.Response) -> tuple[dict, dict[str, np.ndarray]]:
    """The reply's JSON and its outputs as arrays, as tritonclient would read them."""
    length = response.headers.get(HEADER)
    head = response.content if length is None else response.content[: int(length)]
    doc = json.loads(head)
    binary = response.content[len(head) :]
    offset = 0
    arrays = {}
    for out in doc["outputs"]:
        dtype = DTYPES[out["datatype"]]
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            data = out["data"]
            if out["datatype"] == "BYTES":
                array = np.empty(len(data), dtype=object)
                array[:] = [v.encode() for v in data]
            else:
                array = np.array(data, dtype=dtype)
        else:
            raw = binary[offset : offset + size]
            offset += size
            if out["datatype"] == "BYTES":
                items, pos = [], 0
                while pos < len(raw):
                    (n,) = struct.unpack_from("<I", raw, pos)
                    items.append(raw[pos + 4 : pos + 4 + n])
                    pos += 4 + n
                array = np.empty(len(items), dtype=object)
                array[:] = items
            else:
                array = np.frombuffer(raw, dtype=dtype)
        arrays[out["name"]] = array.reshape(out["shape"])
    assert offset == len(binary), "binary bytes that belong to no output"
    return doc, arrays


def check(response: httpx.Response, case: Case) -> None:
    where = f"{case.path} {case.mutations} {case.body[:300]!r} {case.headers}"
    assert response.status_code < 500, f"{response.status_code} {response.text[:300]} <- {where}"
    if response.status_code >= 400:
        assert response.headers["content-type"] == "application/json", where
        error = response.json().get("error")
        assert isinstance(error, str) and error.strip(), where
        assert "Traceback" not in error
        assert case.expect is None, f"a valid request refused: {error} <- {where}"
        return
    doc, arrays = decode_response(response)
    assert doc["model_name"] == case.model
    if case.expect is not None:
        check_valid_answer(doc, arrays, case)


def check_valid_answer(doc: dict, arrays: dict[str, np.ndarray], case: Case) -> None:
    request, sent = case.expect["doc"], case.expect["arrays"]
    datatypes = {i["name"]: i["datatype"] for i in request["inputs"]}
    assert doc.get("id") == request.get("id")
    asked = [o["name"] for o in request.get("outputs") or []]
    expected = asked or _output_names(case.model)
    assert [o["name"] for o in doc["outputs"]] == expected
    default = (request.get("parameters") or {}).get("binary_data_output") is True
    wanted = {o["name"]: (o.get("parameters") or {}) for o in request.get("outputs") or []}
    for out in doc["outputs"]:
        binary = wanted.get(out["name"], {}).get("binary_data", default) is True
        assert ("binary_data_size" in (out.get("parameters") or {})) == binary, out["name"]
        if case.model == "conv":
            assert out["shape"] == [sent["x"].shape[0], 4, 8, 8]
        else:  # an identity: exactly what was sent
            name = "in_" + out["name"].removeprefix("out_")
            assert out["datatype"] == datatypes[name]
            np.testing.assert_array_equal(arrays[out["name"]], sent[name])


def _output_names(model: str) -> list[str]:
    return [o.name for o in MODELS[model].graph.output]


def _fuzz(server: Server, strategy: st.SearchStrategy, examples: int) -> None:
    with server.client() as client:

        @given(case=strategy)
        @settings(FUZZ, max_examples=examples)
        def fuzz(case: Case) -> None:
            check(client.post(case.path, content=case.body, headers=case.headers), case)

        fuzz()
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/health/live").status_code == 200
    assert "Traceback" not in server.log.read_text(errors="replace")  # nothing unhandled


PATHS = ["fast path", "fastapi"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_valid_infer_bodies_are_answered_exactly(servers, path, binary):
    started, metadata = servers
    _fuzz(started[path], valid_cases(metadata, binary), 60)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_no_malformed_infer_body_is_a_server_error(servers, path, binary):
    started, metadata = servers
    _fuzz(started[path], mutated_cases(metadata, binary), 250)


# -- what the fuzzing found, each once over HTTP ----------------------------------------------


def _tensor(name: str, shape: list, datatype: str, data: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


@pytest.mark.parametrize("path", PATHS)
def test_empty_outputs_over_http_answer_every_output(servers, path):
    """``"outputs": []`` was run as onnxruntime's "every output" and then failed to pair the
    results with no names: a 500."""
    started, _ = servers
    body = {"inputs": [_tensor("in_x", [1, 2], "FP32", [1.5, -2.0])], "outputs": []}
    with started[path].client() as client:
        response = client.post("/v2/models/matrix/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == [_tensor("out_x", [1, 2], "FP32", [1.5, -2.0])]


REGRESSIONS = {
    "deep nesting": (
        "matrix", b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", None,
        "nested too deeply",
    ),
    "int past the digit limit": (
        "matrix", b'{"inputs": [{"name": "in_x", "shape": [' + b"7" * 5000 + b"]}]}", None,
        "not valid JSON",
    ),
    "empty tensor with a dimension past int64": (
        "matrix",
        json.dumps({"inputs": [{"name": "in_x", "shape": [0, 2**70], "datatype": "FP32",
                                "parameters": {"binary_data_size": 0}}]}).encode(),
        "header",
        "dimension above the limit",
    ),
    "JSON BYTES with a lone surrogate": (
        "identity_all",
        json.dumps({"inputs": [_tensor("in_BYTES", [1, 3], "BYTES", ["a", "\ud800", "b"])]}
                   ).encode(),
        None,
        "valid Unicode",
    ),
}  # fmt: skip


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("label", list(REGRESSIONS))
def test_what_was_a_server_error_is_a_bad_request(servers, path, label):
    started, _ = servers
    model, body, header, message = REGRESSIONS[label]
    headers = {HEADER: str(len(body))} if header else {}
    with started[path].client() as client:
        response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
