"""Uploads with optimize=true: the model is served as bnfold.optimize's choice, and the record,
the v2 metadata and /metrics say its precision and why; bad optimize fields are 400s."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tritonclient.http as httpclient

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import bnfold  # noqa: E402
from models import digits  # noqa: E402
from service.runtime.sessions import op_types  # noqa: E402


@pytest.fixture(scope="module")
def digits_onnx() -> bytes:
    split = digits.load_split()
    model = bnfold.export_onnx(digits.build(), (split.train_x[:2],), dynamic_spatial=False)
    return model.SerializeToString()


def npz(**arrays) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def post(api, name: str, model: bytes, calibration: tuple[str, bytes] | None = None, **fields):
    files = {"file": ("model.onnx", model)}
    if calibration is not None:
        files["calibration"] = calibration
    form = {"name": name, **{k: str(v) for k, v in fields.items()}}
    return api.post("/v1/models", data=form, files=files)


def served(server, name: str, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.hostport, network_timeout=120)
    try:
        given = httpclient.InferInput("x", list(x.shape), "FP32")
        given.set_data_from_numpy(x, binary_data=True)
        return client.infer(name, [given]).as_numpy(
            client.get_model_metadata(name)["outputs"][0]["name"]
        )
    finally:
        client.close()


def test_optimized_upload_serves_the_chosen_candidate_and_says_why(api, server, digits_onnx):
    split = digits.load_split()
    calibration = npz(x=split.train_x[:64].numpy(), labels=split.train_y[:64].numpy())
    r = post(
        api,
        "digits-opt",
        digits_onnx,
        ("calib.npz", calibration),
        optimize="true",
        min_top1_agreement="0.98",
        max_accuracy_drop="1.0",
    )
    assert r.status_code == 201, r.text
    record = r.json()
    report = record["optimization"]
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert record["precision"]["precision"] == chosen["precision"]
    assert record["precision"]["candidate"] == report["chosen"]
    assert record["precision"]["why"] == report["why"]
    assert record["precision"]["calibration_samples"] == 64
    assert {c["name"] for c in report["candidates"]} >= {"fp32", "int8_data_free"}
    assert any(
        c["name"].startswith("int8_") and c["name"] != "int8_data_free"
        for c in report["candidates"]
    )
    assert chosen["budget_met"]
    assert report["cpu"]  # the CPU's features, as measured on

    # what is served is the chosen graph: quantized exactly when the choice was INT8
    # (op_types reads subgraphs too: a graph routed by batch holds its candidates in an If)
    ops = op_types(api.get("/v1/models/digits-opt/onnx").content)
    quantized = bool(ops & {"QuantizeLinear", "QLinearConv"})
    assert quantized == ("int8" in chosen["precision"].split("+"))

    metadata = api.get("/v2/models/digits-opt").json()
    assert metadata["precision"]["precision"] == chosen["precision"]
    metrics = api.get("/metrics").text
    line = next(
        ln
        for ln in metrics.splitlines()
        if ln.startswith("bnfold_model_info{") and 'model="digits-opt"' in ln
    )
    assert f'precision="{chosen["precision"]}"' in line

    # and it classifies the held-out digits as well as the budget promises
    logits = np.concatenate(
        [served(server, "digits-opt", split.test_x[i : i + 64].numpy()) for i in range(0, 539, 64)]
    )
    accuracy = float((logits.argmax(1) == split.test_y.numpy()).mean())
    assert accuracy >= digits.accuracy(digits.build(), split.test_x, split.test_y) - 0.02


def test_without_optimize_the_exact_fold_is_served_and_said_so(api, digits_onnx):
    r = post(api, "digits-exact", digits_onnx)
    assert r.status_code == 201, r.text
    precision = r.json()["precision"]
    assert precision["precision"] == "fp32" and precision["candidate"] == "folded"
    assert "optimize was not requested" in precision["why"]
    assert "optimization" not in r.json() or r.json()["optimization"] is None
    assert api.get("/v2/models/digits-exact").json()["precision"]["precision"] == "fp32"


@pytest.mark.parametrize(
    ("fields", "calibration", "says"),
    [
        ({"optimize": "maybe"}, None, "optimize must be true or false"),
        ({"min_top1_agreement": "0.9"}, None, "only apply with optimize=true"),
        ({"optimize": "true", "min_top1_agreement": "2"}, None, "between 0 and 1"),
        ({"optimize": "true", "max_rel_l2": "-1"}, None, "must be a finite number >= 0"),
        ({"optimize": "true", "max_accuracy_drop": "0.5"}, None, "needs labelled calibration"),
        ({"optimize": "true"}, ("calib.txt", b"1 2 3"), "send .npy, .npz or .safetensors"),
    ],
)
def test_bad_optimize_fields_are_refused_before_any_work(
    api, digits_onnx, fields, calibration, says
):
    r = post(api, "digits-bad", digits_onnx, calibration, **fields)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]
    assert api.get("/v1/models/digits-bad").status_code == 404


def test_calibration_data_that_does_not_fit_the_model_is_refused(api, digits_onnx):
    wrong = npz(x=np.zeros((16, 1, 9, 9), np.float32))
    r = post(api, "digits-bad2", digits_onnx, ("c.npz", wrong), optimize="true")
    assert r.status_code == 400, r.text
    assert "input 'x' has shape [16, 1, 9, 9]" in r.json()["error"]
    x = np.random.default_rng(0).random((16, 1, 8, 8), np.float32)  # all-zero is refused too
    labels = npz(x=x, labels=np.zeros(3, np.int64))
    r = post(api, "digits-bad3", digits_onnx, ("c.npz", labels), optimize="true")
    assert r.status_code == 400, r.text
    assert "3 labels for 16 samples" in r.json()["error"]
    assert api.get("/v1/models/digits-bad2").status_code == 404
