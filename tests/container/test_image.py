"""The images themselves, run with podman: what a `docker run` user meets.

Every container runs as the image says (uid 10001, `/store` a volume) with a read-only root
filesystem and `/tmp` a tmpfs, on the host network with the server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import re

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
from onnx import TensorProto, helper, numpy_helper

from tests.container.conftest import FULL, SLIM, podman
from tests.container.load import stream_during_stop
from tests.service.support import conv_bn_model

TOKEN = "container-token-0123456789"
QUICK = {"BNFOLD_DEPLOY_DEFAULTS": "0"}  # the zoo's defaults are deployed in one test only


def run_original(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def upload(client: httpx.Client, name: str, data: bytes, filename: str, **form) -> httpx.Response:
    return client.post(
        "/v1/models", data={"name": name, **form}, files={"file": (filename, data)}, timeout=300
    )


def infer_triton(url: str, model: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    try:
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer(model, [inp])
        return result.as_numpy("y"), result.get_response()["model_version"]
    finally:
        client.close()


def infer_grpc(port: int, model: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    with triton_grpc.InferenceServerClient(f"127.0.0.1:{port}") as client:
        inp = triton_grpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(model, [inp])
        return result.as_numpy("y"), result.get_response().model_version


def test_images_carry_no_build_tools_and_say_how_to_run(full_image, slim_image):
    for image in (full_image, slim_image):
        config = image["Config"]
        assert config["User"] == "10001:10001"
        assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp"}
        assert "/store" in config["Volumes"]
        assert image["Healthcheck"]["Test"] == ["CMD", "python", "-m", "service.healthcheck"]
        assert config["StopSignal"] == "SIGTERM"
    probe = (
        "import importlib.util as u, pathlib as p, shutil as s;"
        "print([m for m in ('torch', 'triton') if u.find_spec(m)],"
        " [c for c in ('gcc', 'cc', 'g++', 'make') if s.which(c)],"
        " sorted(str(f) for f in p.Path('/usr/local/share/ca-certificates').rglob('*')),"
        " p.Path('/etc/ssl/certs').exists(), p.Path('/root/.cache/pip').exists())"
    )
    found = {}
    for tag in (FULL, SLIM):
        out = podman(
            "run", "--rm", "--network=none", "--user=0", "--entrypoint=python", tag, "-c", probe
        )
        found[tag] = out.stdout.strip()
    # torch in the full image only, triton in neither; no compiler, no CA, no pip cache
    assert found[FULL] == "['torch'] [] [] False False", found
    assert found[SLIM] == "[] [] [] False False", found


def test_full_image_uploads_serves_restarts_and_stops_gracefully(full_image, volume, run_container):
    box = run_container(FULL, volume, env={"BNFOLD_API_TOKEN": TOKEN, **QUICK})
    ready_s = box.wait_healthy()
    log = box.logs()
    provider = [ln for ln in log.splitlines() if "execution provider" in ln]
    assert provider and "CPUExecutionProvider" in provider[0], log  # and why: no usable GPU
    assert "no usable GPU" in provider[0] or "serving on the CPU" in provider[0], provider[0]
    assert TOKEN not in log  # a token given by environment is not printed

    # uid 10001 for the server (PID 1); the root filesystem read-only, /tmp and /store writable
    status = podman("exec", box.name, "cat", "/proc/1/status").stdout
    assert re.search(r"^Uid:\s+10001\s", status, re.M), status
    write = "import pathlib as p; [p.Path(d, 'w').write_text('') for d in ('/tmp', '/store')]"
    assert podman("exec", box.name, "python", "-c", write, check=False).returncode == 0
    ro = podman("exec", box.name, "python", "-c", "open('/app/x', 'w')", check=False)
    assert "Read-only file system" in ro.stderr

    # an ONNX upload, inferred through tritonclient, and the folded graph downloaded
    with box.client(TOKEN) as api:
        r = upload(api, "convbn", conv_bn_model().SerializeToString(), "m.onnx")
        assert r.status_code == 201, r.text
        version = r.json()["version"]
        folded = api.get("/v1/models/convbn/onnx")
        assert folded.status_code == 200
        assert hashlib.sha256(folded.content).hexdigest()[:16] == version
        ops = {n.op_type for n in onnx.load_model_from_string(folded.content).graph.node}
        assert "BatchNormalization" not in ops
        # a safetensors upload needs torch, which only the full image has
        r = upload(api, "mlp", mlp_safetensors(), "w.safetensors", architecture="mlp_bn_after_act")
        assert r.status_code == 201, r.text
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    got, served = infer_triton(box.url, "convbn", x)
    np.testing.assert_allclose(got, run_original(conv_bn_model(), x), rtol=1e-4, atol=1e-5)
    assert served == version

    assert box.stop() == 0
    # a new container on the same volume serves the same version again
    again = run_container(FULL, volume, env={"BNFOLD_API_TOKEN": TOKEN, **QUICK})
    restart_s = again.wait_healthy()
    with again.client() as c:
        assert c.get("/v2/models/convbn").json()["versions"] == [version]
    got, served = infer_triton(again.url, "convbn", x)
    assert served == version

    # SIGTERM while clients stream requests: each is answered, until the port is closed
    outcome = stream_during_stop(again.url, "convbn", x, again.stop)
    assert outcome["failures"] == [], outcome
    assert outcome["answered_after_stop"] > 0, outcome  # the stop did meet requests in flight
    assert outcome["exit_code"] == 0 and outcome["stop_s"] < 10, outcome
    print(f"\nready {ready_s:.1f} s, restart ready {restart_s:.1f} s, stop {outcome}")


def mlp_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    import models

    module = models.build("mlp_bn_after_act")
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(0.9)
    return save(module.state_dict())


def test_fresh_store_deploys_defaults_and_prints_its_token(full_image, volume, run_container):
    box = run_container(FULL, volume)
    box.wait_healthy()
    log = box.logs()
    found = re.search(r"generated API token [^\n]*\n([\w-]{32,})\n", log)
    assert found, log
    token = found.group(1)
    with box.client(token) as api:
        names = {m["name"] for m in api.get("/v1/models").json()["data"]}
        assert {"mlp_bn_after_act", "resnet_small"} <= names
        r = upload(api, "convbn", conv_bn_model(seed=3).SerializeToString(), "m.onnx")
        assert r.status_code == 201, r.text
    with box.client("wrong-token") as api:
        assert api.get("/v1/models").status_code == 401
    assert box.stop() == 0


def big_model(features: int = 4096, out: int = 6144) -> onnx.ModelProto:
    """x[N,features] -> MatMul -> BatchNormalization -> y: a 96 MiB weight to fold."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((features, out), dtype=np.float32) * 0.01).astype(np.float32)
    stats = [rng.uniform(0.5, 2, out).astype(np.float32) for _ in range(4)]
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(a, n) for a, n in zip(stats, "stmv", strict=True)
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("BatchNormalization", ["h", "s", "t", "m", "v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_upload_too_big_for_the_memory_limit_is_refused_and_the_server_stays_up(
    full_image, volume, run_container
):
    box = run_container(
        FULL, volume, env={"BNFOLD_API_TOKEN": TOKEN, **QUICK}, args=["--memory", "768m"]
    )
    box.wait_healthy()
    with box.client(TOKEN) as api:
        r = upload(api, "small", conv_bn_model().SerializeToString(), "m.onnx")
        assert r.status_code == 201, r.text
        data = io.BytesIO(big_model().SerializeToString()).getvalue()
        r = upload(api, "big", data, "big.onnx")
        assert 400 <= r.status_code < 500 or r.status_code == 503, (r.status_code, r.text)
        print(f"\nbig upload under --memory 768m: {r.status_code} {r.text[:300]}")
        assert api.get("/v2/health/ready").status_code == 200
    assert box.state()["Running"] and box.state()["OOMKilled"] is False
    x = np.zeros((1, 3, 8, 8), np.float32)
    got, _ = infer_triton(box.url, "small", x)
    assert got.shape == (1, 4, 8, 8)
    assert box.stop() == 0


def test_slim_image_serves_the_full_writers_store_read_only(
    full_image, slim_image, volume, run_container
):
    writer = run_container(FULL, volume, env={"BNFOLD_API_TOKEN": TOKEN, **QUICK})
    writer.wait_healthy()
    with writer.client(TOKEN) as api:
        r = upload(api, "convbn", conv_bn_model().SerializeToString(), "m.onnx")
        assert r.status_code == 201, r.text
        version = r.json()["version"]
    # a replica as deploy/kserve/bnfold.yaml runs it: the slim image, the store mounted read-only
    replica = run_container(
        SLIM,
        volume,
        env={"BNFOLD_API_TOKEN": TOKEN, "BNFOLD_STORE_READONLY": "1"},
        args=["-v", f"{volume}:/store:ro"],
    )
    replica.wait_healthy()
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got, served = infer_triton(replica.url, "convbn", x)
    assert served == version
    np.testing.assert_allclose(got, run_original(conv_bn_model(), x), rtol=1e-4, atol=1e-5)
    # and over gRPC, as the bnfold-grpc InferenceService serves it: the same answer
    got_grpc, served = infer_grpc(replica.grpc_port, "convbn", x)
    assert served == version
    np.testing.assert_array_equal(got_grpc, got)
    assert replica.stop() == 0 and writer.stop() == 0


def test_slim_image_refuses_uploads_naming_the_full_image(slim_image, volume, run_container):
    """No torch in the slim image, so no upload can be folded there: ONNX ones neither, since
    bnfold's fold numerics are torch. Each is refused with a 4xx that names the full image."""
    box = run_container(SLIM, volume, env={"BNFOLD_API_TOKEN": TOKEN})
    box.wait_healthy()
    with box.client(TOKEN) as api:
        refused = [
            upload(api, "mlp", mlp_safetensors(), "w.safetensors", architecture="mlp_bn_after_act"),
            upload(api, "convbn", conv_bn_model().SerializeToString(), "m.onnx"),
        ]
    for r in refused:
        assert 400 <= r.status_code < 500, r.text
        assert re.search(re.escape(FULL) + r"(?!-slim)", r.json()["error"]), r.text
