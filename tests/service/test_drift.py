"""Drift monitoring, recalibration and rollback through real servers, on the digits CNN.

Every request is sampled here (BNFOLD_DRIFT_SAMPLE=1) so that a window fills with a few
requests; the default rate's cost is measured by bench/drift.py --serving, not asserted.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from tests.service.support import TEST_ENV, TOKEN, Server, upload

torch = pytest.importorskip("torch")

DRIFT_ENV = {
    **TEST_ENV,
    "BNFOLD_API_TOKEN": TOKEN,
    "BNFOLD_DEPLOY_DEFAULTS": "0",
    "BNFOLD_DRIFT_SAMPLE": "1",
    "BNFOLD_DRIFT_WINDOW": "32",
    "BNFOLD_DRIFT_KEEP_SAMPLES": "64",
}


def _shift(x: np.ndarray) -> np.ndarray:
    """A quarter inverted: bench/drift.py's moderate inversion (accuracy falls to ~11%)."""
    return (0.75 * x + 0.25 * (1 - x)).astype(np.float32)


@pytest.fixture(scope="module")
def digits_data():
    from models import digits

    split = digits.load_split()
    return split.train_x.numpy(), split.test_x.numpy(), split.test_y.numpy()


@pytest.fixture(scope="module")
def digits_bytes(digits_data):
    import bnfold
    from models import digits

    x = torch.from_numpy(digits_data[1][:2])
    return bnfold.export_onnx(digits.build(), (x,), dynamic_batch=True).SerializeToString()


@pytest.fixture(scope="module")
def drift_server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("drift") / "store", DRIFT_ENV).start()
    yield server
    server.stop()


@pytest.fixture
def api(drift_server):
    with drift_server.client() as client:
        yield client


def _deploy(api, name: str, data: bytes) -> dict:
    r = upload(api, name, data, input_shape="[2,1,8,8]")
    assert r.status_code == 201, r.text
    return r.json()


def _infer(api, name: str, x: np.ndarray) -> np.ndarray:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    body = {"inputs": [tensor]}
    r = api.post(f"/v2/models/{name}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def _send(api, name: str, x: np.ndarray, rows: int = 8) -> None:
    for i in range(0, len(x), rows):
        _infer(api, name, x[i : i + rows])


def _drift_after(api, name: str, samples: int, timeout: float = 60) -> dict:
    """The drift report once the monitor has observed ``samples`` rows in all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = api.get("/metrics")
        line = next(
            (ln for ln in r.text.splitlines()
             if ln.startswith(f'bnfold_drift_samples_total{{model="{name}"}}')),
            None,
        )  # fmt: skip
        if line is not None and float(line.split()[-1]) >= samples:
            r = api.get(f"/v1/models/{name}/drift")
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(0.1)
    raise TimeoutError(f"the monitor did not observe {samples} samples of {name}")


def _npy(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    return buffer.getvalue()


def _recalibrate(api, name: str, data: bytes | None, filename="data.npy", **fields):
    files = {"file": (filename, data)} if data is not None else None
    return api.post(
        f"/v1/models/{name}/recalibrate",
        data={k: str(v) for k, v in fields.items()},
        files=files,
    )


def test_drift_is_low_on_clean_windows_and_high_on_shifted_ones(
    api, drift_server, digits_data, digits_bytes
):
    _, test_x, _ = digits_data
    _deploy(api, "digits-monitor", digits_bytes)
    empty = api.get("/v1/models/digits-monitor/drift").json()
    assert empty["samples"] == 0 and not empty["drifting"]
    assert [s["name"] for s in empty["sites"]] == ["features.1", "features.4", "features.8"]

    _send(api, "digits-monitor", test_x[:32])
    clean = _drift_after(api, "digits-monitor", 32)
    assert set(clean) == {"score", "threshold", "drifting", "samples", "window", "sites"}
    assert clean["samples"] == clean["window"] == 32
    assert clean["score"] < clean["threshold"] and not clean["drifting"]

    _send(api, "digits-monitor", _shift(test_x[32:64]))
    shifted = _drift_after(api, "digits-monitor", 64)
    assert shifted["drifting"] and shifted["score"] > 2 * shifted["threshold"]
    assert shifted["samples"] == 32  # the window holds the last 32 rows only

    metrics = api.get("/metrics").text
    assert 'bnfold_input_drift_score{model="digits-monitor"}' in metrics
    assert 'bnfold_drift_samples_total{model="digits-monitor"} 64.0' in metrics
    assert "digits-monitor version" in drift_server.log.read_text()  # started drifting
    assert "started drifting" in drift_server.log.read_text()


def test_recalibrate_deploys_a_verified_version_that_repairs_accuracy_then_rollback(
    api, digits_data, digits_bytes
):
    train_x, test_x, test_y = digits_data
    before = _deploy(api, "digits-repair", digits_bytes)
    shifted_test = _shift(test_x[:64])
    accuracy_before = (_infer(api, "digits-repair", shifted_test).argmax(1) == test_y[:64]).mean()

    r = _recalibrate(api, "digits-repair", _npy(_shift(train_x[:128])), batch_size=32)
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["version"] != before["version"]
    assert record["recalibrated_from"] == before["version"]
    assert record["recalibration"]["samples"] == 128
    assert record["recalibration"]["batches"] == 4
    assert record["verification"]["ok"]
    assert record["fold_report"]["counts"]["kept"] == 0
    accuracy_after = (_infer(api, "digits-repair", shifted_test).argmax(1) == test_y[:64]).mean()
    assert accuracy_before < 0.5 < 0.9 < accuracy_after

    # the new version's statistics describe the shifted inputs: no drift on them. The window
    # may already hold the 64-row accuracy request above (one entry): it leaves the window
    # only once the 32 rows sent now are in, so wait for exactly 32
    _send(api, "digits-repair", _shift(test_x[128:160]))
    after = api.get("/v1/models/digits-repair/drift").json()
    deadline = time.monotonic() + 30
    while after["samples"] != 32 and time.monotonic() < deadline:
        time.sleep(0.1)
        after = api.get("/v1/models/digits-repair/drift").json()
    assert after["samples"] == 32 and not after["drifting"], after

    r = api.post("/v1/models/digits-repair/rollback")
    assert r.status_code == 200, r.text
    assert r.json()["version"] == before["version"]
    assert api.get("/v2/models/digits-repair").json()["versions"] == [before["version"]]
    # a second rollback undoes the first
    assert api.post("/v1/models/digits-repair/rollback").json()["version"] == record["version"]


def test_recalibrate_undoes_a_full_inversion_with_the_input_map_and_says_so(
    api, digits_data, digits_bytes
):
    """Re-estimation alone cannot flip a sign (accuracy stays near 14%); the fitted input map
    in front of the graph can, and the record says what it fitted and why it was kept."""
    train_x, test_x, test_y = digits_data
    inverted_train, inverted_test = 1 - train_x[:64], 1 - test_x[:128]

    def accuracy(name: str) -> float:
        logits = np.concatenate([_infer(api, name, inverted_test[i : i + 64]) for i in (0, 64)])
        return float((logits.argmax(1) == test_y[:128]).mean())

    _deploy(api, "digits-plain", digits_bytes)
    r = _recalibrate(api, "digits-plain", _npy(inverted_train), align_input="false")
    assert r.status_code == 201, r.text
    assert "input_alignment" not in r.json()["recalibration"]
    assert accuracy("digits-plain") < 0.4

    _deploy(api, "digits-inverted", digits_bytes)
    r = _recalibrate(api, "digits-inverted", _npy(inverted_train))
    assert r.status_code == 201, r.text
    record = r.json()
    alignment = record["recalibration"]["input_alignment"]
    assert alignment["applied"] and alignment["gain"][0] < 0, alignment
    changes = alignment["statistics_change"]
    assert changes["aligned"] < changes["plain"]
    denoising = record["recalibration"]["input_denoising"]  # inversion is not noise
    assert not denoising["applied"] and "not additive noise" in denoising["reason"], denoising
    assert record["verification"]["ok"]
    assert accuracy("digits-inverted") > 0.9
    r = _recalibrate(api, "digits-inverted", _npy(inverted_train), align_input="maybe")
    assert r.status_code == 400 and "align_input must be true or false" in r.json()["error"]


def test_recalibrate_refuses_bad_data_and_keeps_serving_the_old_version(
    api, digits_data, digits_bytes
):
    train_x, _, _ = digits_data
    version = _deploy(api, "digits-bad", digits_bytes)["version"]
    nan = train_x[:8].copy()
    nan[3, 0, 2, 2] = np.nan
    cases = [
        (_npy(train_x[:8, :, :7, :7]), 400, "shape"),
        (_npy(train_x[:8].astype(np.float64)), 400, "float32"),
        (_npy(train_x[:1]), 400, "one sample has no variance"),
        (_npy(nan), 400, "NaN"),
        (b"\x93NUMPY not really", 400, "not a valid .npy"),
        (_npy(np.zeros((5000, 1, 8, 8), np.float32)), 413, "too large"),  # over 1 MiB
    ]
    for data, status, words in cases:
        r = _recalibrate(api, "digits-bad", data)
        assert r.status_code == status, r.text
        assert words in r.json()["error"], r.text
        assert api.get("/v1/models/digits-bad").json()["version"] == version
    r = api.post("/v1/models/digits-bad/rollback")  # nothing was deployed: nowhere to go back
    assert r.status_code == 404, r.text
    assert _recalibrate(api, "digits-bad", None).status_code == 400  # neither file nor source
    assert _recalibrate(api, "nothing-here", _npy(train_x[:8])).status_code == 404


def test_recalibrate_from_kept_traffic(api, digits_data, digits_bytes):
    train_x, _, _ = digits_data
    before = _deploy(api, "digits-traffic", digits_bytes)
    _send(api, "digits-traffic", _shift(train_x[:96]))
    _drift_after(api, "digits-traffic", 96)
    r = _recalibrate(api, "digits-traffic", None, source="traffic")
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["recalibrated_from"] == before["version"]
    assert record["recalibration"]["samples"] == 64  # BNFOLD_DRIFT_KEEP_SAMPLES


def test_recalibrate_a_safetensors_upload(api):
    from safetensors.torch import save

    from models.registry import build as build_zoo

    model = build_zoo("cnn_conv_bn_relu")
    weights = save(model.state_dict())
    r = upload(api, "cnn-weights", weights, "w.safetensors", architecture="zoo:cnn_conv_bn_relu")
    assert r.status_code == 201, r.text
    data = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32) * 2 + 1
    buffer = io.BytesIO()
    np.savez(buffer, x=data)
    name = r.json()["inputs"][0]["name"]
    if name != "x":
        buffer = io.BytesIO()
        np.savez(buffer, **{name: data})
    r = _recalibrate(api, "cnn-weights", buffer.getvalue(), filename="data.npz", batch_size=8)
    assert r.status_code == 201, r.text
    assert r.json()["recalibration"]["batches"] == 2


def test_monitoring_off_samples_nothing(start_server, digits_bytes, digits_data):
    server = start_server(BNFOLD_DRIFT_SAMPLE="0")
    with server.client() as api:
        _deploy(api, "digits-off", digits_bytes)
        _send(api, "digits-off", digits_data[1][:16])
        r = api.get("/v1/models/digits-off/drift")
        assert r.status_code == 409 and "off" in r.json()["error"]
        assert 'bnfold_drift_samples_total{model="digits-off"}' not in api.get("/metrics").text
        r = _recalibrate(api, "digits-off", None, source="traffic")
        assert r.status_code == 403 and "BNFOLD_DRIFT_KEEP_SAMPLES" in r.json()["error"]


def test_an_upload_sets_its_own_sampling_rate(start_server, digits_bytes, digits_data):
    # the server samples nothing by default; one model asks for every request, one for none
    server = start_server(BNFOLD_DRIFT_SAMPLE="0", BNFOLD_DRIFT_WINDOW="16")
    with server.client() as api:
        r = upload(api, "digits-on", digits_bytes, input_shape="[2,1,8,8]", drift_sample="1")
        assert r.status_code == 201, r.text
        assert r.json()["drift_sample"] == 1.0
        _deploy(api, "digits-default", digits_bytes)
        _send(api, "digits-on", digits_data[1][:16])
        _send(api, "digits-default", digits_data[1][:16])
        report = _drift_after(api, "digits-on", 16)
        assert report["samples"] >= 16 and report["window"] == 16
        r = api.get("/v1/models/digits-default/drift")
        assert r.status_code == 409 and "off" in r.json()["error"]
        assert 'bnfold_drift_samples_total{model="digits-default"}' not in api.get("/metrics").text
        r = upload(api, "digits-bad", digits_bytes, drift_sample="1.5")
        assert r.status_code == 400 and "drift_sample is a fraction" in r.json()["error"]


def test_the_monitor_observes_in_its_own_process_and_a_killed_one_is_replaced(
    start_server, digits_bytes, digits_data
):
    import os
    import signal

    server = start_server(**DRIFT_ENV)
    with server.client() as api:
        _deploy(api, "digits-proc", digits_bytes)
        _send(api, "digits-proc", digits_data[1][:16])
        assert _drift_after(api, "digits-proc", 16)["samples"] == 16
        pids = _monitor_pids(server.proc.pid)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while "ended with exit code -9" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.1)
        # meanwhile a report says the monitor is restarting (503), then starts a new process:
        # its window is empty, the counter goes on
        r = api.get("/v1/models/digits-proc/drift")
        while r.status_code == 503:
            assert "starts in" in r.json()["error"] and time.monotonic() < deadline + 10
            time.sleep(0.2)
            r = api.get("/v1/models/digits-proc/drift")
        assert r.status_code == 200 and r.json()["samples"] == 0, r.text
        _send(api, "digits-proc", digits_data[1][16:24])
        assert _drift_after(api, "digits-proc", 24)["samples"] == 8
        assert api.get("/v2/health/ready").status_code == 200
        assert len(_monitor_pids(server.proc.pid)) == 1
    assert "Traceback" not in server.log.read_text()


def _monitor_pids(server_pid: int) -> list[int]:
    """The server's child processes started by multiprocessing's spawn (the drift monitor;
    its resource tracker is started by spawn too, and named so)."""
    from pathlib import Path

    pids = set()
    for children in Path(f"/proc/{server_pid}/task").glob("*/children"):
        pids.update(int(p) for p in children.read_text().split())
    found = []
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return found
