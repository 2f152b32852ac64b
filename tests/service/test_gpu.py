"""The service on a real GPU: models are served by the CUDA provider and say so, the GPU's
divergence from the CPU reference is reported, and batched GPU runs answer each request as its
own run would. Skipped where onnxruntime cannot give a session the CUDA provider (CI has no GPU);
run on the lent GPU machine by ``bench/device_gpu.sh``."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.service.support import conv_bn_model, cuda_usable, upload

CUDA = "CUDAExecutionProvider"

pytestmark = pytest.mark.skipif(not cuda_usable(), reason="no GPU usable by onnxruntime here")


def infer_body(x: np.ndarray, binary: bool) -> tuple[bytes, dict[str, str]]:
    """A v2 request for input ``x``, as Triton's binary extension or as plain JSON (tritonclient
    is not on the GPU machine, so the tests build the few bytes themselves)."""
    spec = {"name": "x", "shape": list(x.shape), "datatype": "FP32"}
    if not binary:
        spec["data"] = x.reshape(-1).tolist()
        return json.dumps({"inputs": [spec]}).encode(), {"Content-Type": "application/json"}
    raw = np.ascontiguousarray(x, "<f4").tobytes()
    spec["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [spec], "parameters": {"binary_data_output": True}}).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def parse(response: httpx.Response) -> np.ndarray:
    """Output ``y`` of a v2 answer, binary or JSON."""
    assert response.status_code == 200, response.text
    length = response.headers.get("Inference-Header-Content-Length")
    head = json.loads(response.content[: int(length)] if length else response.content)
    (out,) = head["outputs"]
    if length:
        values = np.frombuffer(response.content[int(length) :], "<f4")
    else:
        values = np.asarray(out["data"], np.float32)
    return values.reshape(out["shape"])


def metric(text: str, series: str) -> float:
    (line,) = [line for line in text.splitlines() if line.startswith(series + " ")]
    return float(line.split()[-1])


def test_models_are_served_by_cuda_and_say_so(start_server):
    server = start_server(defaults=True, BNFOLD_REQUIRE_GPU="1")
    model = conv_bn_model(channels=16)
    with server.client() as api:
        r = upload(api, "conv", model.SerializeToString(), input_shape="[2, 3, 8, 8]")
        assert r.status_code == 201, r.text
        records = {m["name"]: api.get(f"/v1/models/{m['name']}").json()
                   for m in api.get("/v1/models").json()["data"]}  # fmt: skip
        assert len(records) >= 3  # the zoo defaults and the upload
        for name, record in records.items():
            assert record["execution_provider"] == CUDA, name
            divergence = record["gpu_divergence"]
            assert divergence["provider"] == CUDA, name
            # TF32 convolutions and matmuls: about 1e-3 relative, far below a folding mistake
            assert all(o["max_rel_err"] < 1e-2 for o in divergence["outputs"]), divergence
        # convolutions are re-planned at every new batch size on CUDA: batching off, saying why
        for name in ("conv", "resnet_small"):
            assert not records[name]["batching"]["dynamic_batching"], name
            assert "re-plans" in records[name]["batching"]["reason"]
        assert records["mlp_bn_after_act"]["batching"]["dynamic_batching"]
        metrics = api.get("/metrics").text
        (info,) = [line for line in metrics.splitlines() if line.startswith("bnfold_model_info{")
                   and 'model="conv"' in line]  # fmt: skip
        assert f'execution_provider="{CUDA}"' in info, info

        x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
        body, headers = infer_body(x, binary=True)
        got = parse(api.post("/v2/models/conv/infer", content=body, headers=headers))
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = want.run(["y"], {"x": x})[0]
    assert np.max(np.abs(got - want)) <= 1e-2 * np.max(np.abs(want))


def test_batched_gpu_runs_match_each_request_run_alone(start_server):
    """The bit-identity the batcher promises on the CPU, checked on the GPU: each request's
    answer from a shared batch equals its answer when it is sent alone (batching forced on:
    a convolution model has it off by default on the GPU)."""
    server = start_server(BNFOLD_MAX_QUEUE_DELAY_MS="20", BNFOLD_REQUIRE_GPU="1")
    model = conv_bn_model(channels=16)
    with server.client() as api:
        r = upload(api, "conv", model.SerializeToString(), dynamic_batching="true")
        assert r.status_code == 201 and r.json()["batching"]["dynamic_batching"], r.text
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1 + i % 3, 3, 8, 8)).astype(np.float32) for i in range(24)]
    bodies = [infer_body(x, binary=i % 2 == 0) for i, x in enumerate(xs)]

    async def send(together: bool) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            posts = [client.post("/v2/models/conv/infer", content=b, headers=h) for b, h in bodies]
            if together:
                return await asyncio.gather(*posts)
            return [await post for post in posts]

    alone = asyncio.run(send(together=False))
    together = asyncio.run(send(together=True))
    with server.client() as api:
        runs = metric(api.get("/metrics").text, 'bnfold_batch_rows_count{model="conv"}')
    assert runs < 2 * len(xs)  # sent alone: one run each; together: fewer, shared runs
    for a, t in zip(alone, together, strict=True):
        assert a.status_code == t.status_code == 200
        assert np.array_equal(parse(a), parse(t))
