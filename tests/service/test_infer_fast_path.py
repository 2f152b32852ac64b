"""The infer fast path (service/routes/infer_asgi.py) answers exactly as the FastAPI route.

Two real servers on one seeded store, one with ``BNFOLD_INFER_FAST_PATH=0``, get the same
requests, good and bad; status, body and the headers a client reads must agree.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tests.service.support import conv_bn_model, seed_store


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from tests.service.support import TEST_ENV, TOKEN, Server

    root = tmp_path_factory.mktemp("fastpath")
    seed_store(root / "store", "conv", conv_bn_model())
    env = {**TEST_ENV, "BNFOLD_API_TOKEN": TOKEN, "BNFOLD_DEPLOY_DEFAULTS": "0"}
    fast = Server(root / "store", env).start()
    slow = Server(root / "store", {**env, "BNFOLD_INFER_FAST_PATH": "0"}).start()
    yield fast, slow
    fast.stop()
    slow.stop()


INFER = "/v2/models/conv/infer"


def _binary(x: np.ndarray, name: str = "x", datatype: str = "FP32", out_binary: bool = True):
    raw = x.tobytes()
    doc = {
        "id": "r1",
        "inputs": [
            {
                "name": name,
                "shape": list(x.shape),
                "datatype": datatype,
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": out_binary},
    }
    head = json.dumps(doc).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def _cases(conv_input: str):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    body, headers = _binary(x, conv_input)
    as_json = json.dumps(
        {
            "inputs": [
                {
                    "name": conv_input,
                    "shape": [2, 3, 8, 8],
                    "datatype": "FP32",
                    "data": x.reshape(-1).tolist(),
                }
            ]
        }  # fmt: skip
    ).encode()
    return {
        "binary": ("/v2/models/conv/infer", body, headers),
        "json": ("/v2/models/conv/infer", as_json, {"Content-Type": "application/json"}),
        "gzip json": (INFER, gzip.compress(as_json), {"Content-Encoding": "gzip"}),
        "binary in, json out": (INFER, *_binary(x, conv_input, out_binary=False)),
        "unknown model": ("/v2/models/nope/infer", body, headers),
        "wrong version": ("/v2/models/conv/versions/0000/infer", body, headers),
        "not json": ("/v2/models/conv/infer", b"{nope", {}),
        "header length past the body": (
            "/v2/models/conv/infer", body, {"Inference-Header-Content-Length": "999999999"}
        ),
        "bad encoding": ("/v2/models/conv/infer", as_json, {"Content-Encoding": "br"}),
        "too large": ("/v2/models/conv/infer", b"0" * (2 << 20), {}),
        "wrong shape": ("/v2/models/conv/infer", *_binary(x[:, :2], conv_input)),
    }  # fmt: skip


def test_fast_path_answers_like_the_fastapi_route(servers):
    fast, slow = servers
    with fast.client() as f, slow.client() as s:
        meta = f.get("/v2/models/conv").json()
        version = meta["versions"][0]
        cases = _cases(meta["inputs"][0]["name"])
        cases["right version"] = (f"/v2/models/conv/versions/{version}/infer", *cases["binary"][1:])
        statuses = {}
        for label, (path, body, headers) in cases.items():
            a, b = (
                f.post(path, content=body, headers=headers),
                s.post(path, content=body, headers=headers),
            )
            assert a.status_code == b.status_code, label
            assert a.content == b.content, label
            for header in ("content-type", "inference-header-content-length", "retry-after"):
                assert a.headers.get(header) == b.headers.get(header), (label, header)
            statuses[label] = a.status_code
    assert statuses["binary"] == statuses["json"] == statuses["gzip json"] == 200
    assert statuses["right version"] == statuses["binary in, json out"] == 200
    assert statuses["unknown model"] == statuses["wrong version"] == 404
    assert statuses["too large"] == 413
    for label in ("not json", "header length past the body", "bad encoding", "wrong shape"):
        assert statuses[label] == 400, label


def test_fast_path_leaves_other_methods_and_paths_to_fastapi(servers):
    fast, slow = servers
    with fast.client() as f, slow.client() as s:
        for method, path in [
            ("GET", "/v2/models/conv/infer"),
            ("PUT", "/v2/models/conv/infer"),
            ("POST", "/v2/models/conv/infer/extra"),
            ("POST", "/v2/models/conv/ready"),
        ]:
            a, b = f.request(method, path), s.request(method, path)
            assert (a.status_code, a.content) == (b.status_code, b.content), (method, path)
            assert a.status_code in (404, 405), (method, path)
