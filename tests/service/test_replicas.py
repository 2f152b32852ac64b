"""Replicas on one shared store: a writer deploys, read-only replicas follow it, never write."""

from __future__ import annotations

import time

import numpy as np

from tests.service.support import conv_bn_model, upload


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def infer(client, x: np.ndarray):
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32"}]}
    body["inputs"][0]["data"] = x.reshape(-1).tolist()
    return client.post("/v2/models/conv/infer", json=body)


def test_read_only_replica_follows_the_writer_and_refuses_writes(start_server, tmp_path):
    writer = start_server()
    in_progress = writer.store / "tmp" / "upload-in-progress"
    in_progress.mkdir()  # what the writer holds while an upload is being processed
    reader = start_server(store=writer.store, BNFOLD_STORE_READONLY="1", BNFOLD_STORE_POLL_S="0.2")
    assert in_progress.is_dir()  # a reader's start cleans nothing
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    with writer.client() as w, reader.client() as r:
        data = conv_bn_model().SerializeToString()
        refused = upload(r, "conv", data)
        assert refused.status_code == 403 and "read-only" in refused.json()["error"]
        assert upload(w, "conv", data).status_code == 201
        wait_for(lambda: r.get("/v2/models/conv/ready").status_code == 200)
        got, want = infer(r, x), infer(w, x)
        assert got.status_code == 200 and got.json()["outputs"] == want.json()["outputs"]

        new = upload(w, "conv", conv_bn_model(seed=1).SerializeToString()).json()["version"]
        wait_for(lambda: r.get("/v2/models/conv").json()["versions"] == [new])

        assert r.delete("/v1/models/conv").status_code == 403
        assert w.delete("/v1/models/conv").status_code == 204
        wait_for(lambda: r.get("/v2/models/conv/ready").status_code == 404)
        assert r.get("/v2/health/ready").status_code == 200
