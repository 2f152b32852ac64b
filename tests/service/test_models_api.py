"""Management API over real HTTP: deploy (ONNX and safetensors), reports, refusals, auth."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.service.support import conv_bn_model, upload


def run_original(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def infer_json(client, name: str, x: np.ndarray, input_name: str = "x") -> dict:
    body = {
        "inputs": [
            {
                "name": input_name,
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    r = client.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_fresh_store_serves_the_zoo_defaults(server, api):
    print(f"\nserver ready {server.ready_after_s:.1f} s after start (fresh store, defaults)")
    listed = api.get("/v1/models").json()
    names = {m["name"] for m in listed["data"]}
    assert {"mlp_bn_after_act", "resnet_small"} <= names
    record = api.get("/v1/models/resnet_small").json()
    assert record["execution_provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert record["fold_report"]["counts"]["folded_backward"] > 0
    assert record["verification"]["ok"] is True
    x = np.random.default_rng(0).standard_normal((2, 300)).astype(np.float32)
    out = infer_json(api, "mlp_bn_after_act", x)
    assert out["outputs"][0]["shape"] == [2, 10]


def test_upload_onnx_is_folded_verified_and_served_like_the_original(api, conv_bn_bytes):
    r = upload(api, "convbn", conv_bn_bytes)
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["name"] == "convbn"
    assert record["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 8, 8]}]
    assert record["fold_report"]["counts"]["folded_backward"] == 1
    assert record["verification"]["ok"] is True
    assert record["execution_provider"] == api.get("/v1/models/convbn").json()["execution_provider"]

    folded = api.get("/v1/models/convbn/onnx")
    assert folded.status_code == 200
    assert record["version"] == hashlib.sha256(folded.content).hexdigest()[:16]
    ops = {n.op_type for n in onnx.load_model_from_string(folded.content).graph.node}
    assert "BatchNormalization" not in ops

    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    out = infer_json(api, "convbn", x)
    got = np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
    np.testing.assert_allclose(got, run_original(conv_bn_model(), x), rtol=1e-4, atol=1e-5)
    assert out["model_version"] == record["version"]


def test_an_upload_of_onnx_s_newest_ir_version_is_served(api):
    """onnx's helper writes its newest IR version by default, one onnxruntime may not read:
    lowered where the model needs nothing newer, and the record's source says so."""
    from bnfold.onnx.ir_version import ort_max_ir_version

    newest = ort_max_ir_version() + 1
    if newest > onnx.IR_VERSION:
        pytest.skip(f"onnx {onnx.__version__} writes no IR version onnxruntime cannot read")
    model = conv_bn_model(seed=3)
    model.ir_version = newest
    r = upload(api, "newest-ir", model.SerializeToString())
    assert r.status_code == 201, r.text
    note = r.json()["source"]["ir_version"]
    assert note.startswith(f"IR version {newest} lowered to {ort_max_ir_version()}"), note
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = infer_json(api, "newest-ir", x)
    got = np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
    model.ir_version = ort_max_ir_version()
    np.testing.assert_allclose(got, run_original(model, x), rtol=1e-4, atol=1e-5)


def test_upload_safetensors_for_a_zoo_architecture(api):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    import models

    module = models.build("mlp_bn_after_act")
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.9)  # not the zoo's own weights: the upload must really be used
    r = upload(
        api,
        "mlp-custom",
        save(module.state_dict()),
        "w.safetensors",
        architecture="mlp_bn_after_act",
    )
    assert r.status_code == 201, r.text
    assert r.json()["source"] == {"format": "safetensors", "architecture": "mlp_bn_after_act"}
    x = np.random.default_rng(2).standard_normal((4, 300)).astype(np.float32)
    out = infer_json(api, "mlp-custom", x)
    with torch.no_grad():
        want = module.eval()(torch.from_numpy(x)).numpy()
    # served by CUDA where a GPU is: its matmuls run in TF32 (about 5e-4 measured on an H100)
    on_gpu = r.json()["execution_provider"] == "CUDAExecutionProvider"
    tol = 5e-3 if on_gpu else 1e-4
    np.testing.assert_allclose(
        np.array(out["outputs"][0]["data"]).reshape(4, 10), want, rtol=tol, atol=tol
    )


def test_safetensors_that_do_not_fit_the_architecture_are_refused(api):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save

    r = upload(
        api,
        "bad-weights",
        save({"w": torch.zeros(3)}),
        "w.safetensors",
        architecture="mlp_bn_after_act",
    )
    assert r.status_code == 400
    assert "do not fit architecture" in r.json()["error"]
    r = upload(
        api, "bad-arch", save({"w": torch.zeros(3)}), "w.safetensors", architecture="no_such_net"
    )
    assert r.status_code == 400 and "unknown architecture" in r.json()["error"]


def test_failed_verification_is_422_with_reports_and_deploys_nothing(api, server, conv_bn_bytes):
    r = upload(api, "strict", conv_bn_bytes, rtol=0, atol=0)
    assert r.status_code == 422, r.text
    body = r.json()
    assert "verification failed" in body["error"]
    assert body["verification"]["ok"] is False and body["fold_report"]["counts"]["total"] == 1
    assert api.get("/v1/models/strict").status_code == 404
    assert api.get("/v2/models/strict/ready").status_code == 404
    assert not (server.store / "models" / "strict").exists()


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x80\x04garbage", "not a valid ONNX model"),
        (onnx.ModelProto(ir_version=8).SerializeToString(), "no nodes"),
        (b"", "is empty"),
    ],
)
def test_malformed_onnx_is_refused_clearly(api, data, message):
    r = upload(api, "malformed", data)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]


def test_bad_form_fields_are_400(api, conv_bn_bytes):
    assert "rtol" in upload(api, "m", conv_bn_bytes, rtol="abc").json()["error"]
    assert upload(api, "m", conv_bn_bytes, atol=-1).status_code == 400
    assert upload(api, "m", conv_bn_bytes, input_shape="[1,x]").status_code == 400
    r = api.post("/v1/models", data={"name": "m"})
    assert r.status_code == 400 and "file" in r.json()["error"]
    r = api.post("/v1/models", json={"name": "m"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]


def test_upload_sets_the_models_own_batching(api, conv_bn_bytes):
    r = upload(api, "batch4", conv_bn_bytes, max_batch_size=4, max_queue_delay_ms=5)
    assert r.status_code == 201, r.text
    policy = r.json()["batching"]
    assert (policy["max_batch_size"], policy["max_queue_delay_ms"]) == (4, 5.0)
    assert api.get("/v2/models/batch4/config").json()["max_batch_size"] == 4
    r = upload(api, "alone", conv_bn_bytes, dynamic_batching="false")
    assert r.status_code == 201, r.text
    policy = api.get("/v1/models/alone").json()["batching"]
    assert policy["dynamic_batching"] is False and "dynamic_batching=false" in policy["reason"]
    assert "dynamic_batching" not in api.get("/v2/models/alone/config").json()
    for field, value in [("dynamic_batching", "maybe"), ("max_batch_size", "0")]:
        r = upload(api, "bad", conv_bn_bytes, **{field: value})
        assert r.status_code == 400 and field in r.json()["error"], r.text
    assert api.get("/v1/models/bad").status_code == 404


def test_redeploy_swaps_atomically_while_requests_are_in_flight(api, server):
    first, second = conv_bn_model(seed=10), conv_bn_model(seed=11)
    v1 = upload(api, "swap", first.SerializeToString()).json()["version"]
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = {v1: run_original(first, x)}
    seen, errors, stop = [], [], threading.Event()

    def hammer():
        with server.client() as c:
            while not stop.is_set():
                try:
                    out = infer_json(c, "swap", x)
                    seen.append((out["model_version"], out["outputs"][0]["data"]))
                except AssertionError as exc:  # any non-200 fails the test
                    errors.append(str(exc))

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        r = upload(api, "swap", second.SerializeToString())
        assert r.status_code == 201
        v2 = r.json()["version"]
        want[v2] = run_original(second, x)
        n = len(seen)
        while len(seen) < n + 5:
            pass
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors and v1 != v2
    versions = [v for v, _ in seen]
    assert versions[-1] == v2 and v1 in versions
    for version, data in seen:  # every answer is entirely the old model's or the new one's
        np.testing.assert_allclose(
            np.array(data).reshape(2, 4, 8, 8), want[version], rtol=1e-4, atol=1e-5
        )
    meta = api.get("/v2/models/swap").json()
    assert meta["versions"] == [v2]
    assert api.get(f"/v2/models/swap/versions/{v1}/ready").status_code == 404
    listed = sorted(p.name for p in (server.store / "models" / "swap").iterdir())
    assert listed == sorted(["CURRENT", "PREVIOUS", v1, v2])  # the previous kept for a rollback


def test_delete_removes_model_everywhere(api, server, conv_bn_bytes):
    assert upload(api, "doomed", conv_bn_bytes).status_code == 201
    assert api.delete("/v1/models/doomed").status_code == 204
    for path in ["/v1/models/doomed", "/v2/models/doomed", "/v2/models/doomed/ready"]:
        r = api.get(path)
        assert r.status_code == 404 and "not deployed" in r.json()["error"]
    assert not (server.store / "models" / "doomed").exists()
    assert api.delete("/v1/models/doomed").status_code == 404


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/v1/models"),
        ("get", "/v1/models/resnet_small"),
        ("get", "/v1/models/resnet_small/onnx"),
        ("delete", "/v1/models/resnet_small"),
        ("post", "/v1/models"),
    ],
)
@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_management_requires_the_token(server, method, path, token):
    with server.client(token) as client:
        kwargs = (
            {"files": {"file": ("m.onnx", b"x")}, "data": {"name": "x"}} if method == "post" else {}
        )
        r = getattr(client, method)(path, **kwargs)
        assert r.status_code == 401
        assert "token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
    with server.client() as client:
        assert client.get("/v1/models/resnet_small").status_code == 200  # nothing changed
        assert client.get("/v1/models/x").status_code == 404


def test_unknown_routes_and_methods_answer_json(server):
    with server.client() as c:
        r = c.get("/nope")
        assert r.status_code == 404 and "no route" in r.json()["error"]
        r = c.put("/v2/health/live")
        assert r.status_code == 405 and "not allowed" in r.json()["error"]


def test_openapi_documents_the_management_schemas(server):
    with server.client() as c:
        schema = c.get("/openapi.json").json()
    assert {"ModelPublic", "ModelsPublic", "ErrorPublic"} <= set(schema["components"]["schemas"])
    assert "multipart/form-data" in schema["paths"]["/v1/models"]["post"]["requestBody"]["content"]


def test_safetensors_with_an_input_shape(api):
    pytest.importorskip("torch")
    from safetensors.torch import save

    import models

    weights = save(models.build("resnet_small").state_dict())
    r = upload(
        api,
        "resnet-8px",
        weights,
        "w.safetensors",
        architecture="resnet_small",
        input_shape="[2, 3, 8, 8]",
    )
    assert r.status_code == 201, r.text
    assert r.json()["input_shapes"] == {"x": [2, 3, 8, 8]}
    r = upload(
        api,
        "resnet-two",
        weights,
        "w.safetensors",
        architecture="resnet_small",
        input_shape='{"a": [2, 3, 8, 8], "b": [2, 3, 8, 8]}',
    )
    assert r.status_code == 400 and "takes 1 input(s)" in r.json()["error"]


def test_the_slim_image_refuses_uploads_naming_the_full_image(start_server, conv_bn_bytes):
    # BNFOLD_IMAGE_VARIANT=slim is what the serving-only image sets: it has no torch to fold with
    server = start_server(BNFOLD_IMAGE_VARIANT="slim")
    with server.client() as api:
        r = upload(api, "convbn", conv_bn_bytes)
        assert r.status_code == 403, r.text
        error = r.json()["error"]
        assert "serving-only image" in error and "full image bnfold:" in error
        assert api.get("/v1/models/convbn").status_code == 404
        assert api.get("/v2/health/ready").status_code == 200
