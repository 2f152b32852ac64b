"""Bad calibration and recalibration data through a real server: each is a 400 that names the
problem, and the version served before stays served."""

from __future__ import annotations

import numpy as np
import pytest

from tests.array_bytes import npy_bytes, npz_bytes, zip_bytes
from tests.service.support import upload

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import bnfold  # noqa: E402
from models import digits  # noqa: E402


@pytest.fixture(scope="module")
def split():
    return digits.load_split()


@pytest.fixture(scope="module")
def digits_onnx(split) -> bytes:
    x = split.train_x[:2]
    return bnfold.export_onnx(digits.build(), (x,), dynamic_batch=True).SerializeToString()


@pytest.fixture(scope="module")
def deployed(server, digits_onnx) -> str:
    """The version of ``digits-guarded``, deployed once without optimize."""
    with server.client() as api:
        r = upload(api, "digits-guarded", digits_onnx, input_shape="[2,1,8,8]")
    assert r.status_code == 201, r.text
    return r.json()["version"]


def _served_version(api) -> str:
    return api.get("/v1/models/digits-guarded").json()["version"]


def _calibration_cases(x: np.ndarray, y: np.ndarray) -> list:
    return [
        ("c.npz", zip_bytes(**{"readme.txt": b"hello"}), {}, "['readme.txt'] are not .npy arrays"),
        ("c.npz", zip_bytes(**{"x.npy": b"not an array"}), {}, "['x'] are not .npy arrays"),
        ("c.npy", npz_bytes(x=x), {}, "named .npy but is a zip archive"),
        ("c.npz", npz_bytes(x=x * np.float32(1e30)), {}, "values up to 1e+30 in magnitude"),
        ("c.npz", npz_bytes(x=np.zeros_like(x)), {}, "all 64 samples are identical"),
        ("c.npz", npz_bytes(x=np.repeat(x[:1], 64, 0)), {}, "all 64 samples are identical"),
        (
            "c.npz",
            npz_bytes(x=x, labels=-1 - y),
            {"max_accuracy_drop": "1"},
            "class indices 0..9 (the model scores 10), got values from -10",
        ),
        (
            "c.npz",
            npz_bytes(x=x, labels=y + 10),
            {"max_accuracy_drop": "1"},
            "class indices 0..9 (the model scores 10), got values from 10 to 19",
        ),
    ]


def test_each_bad_calibration_file_is_refused_with_its_reason(split, digits_onnx):
    """Every case, through the optimize job's own reading of the file (no server: each upload
    over HTTP costs a worker process), each a 400 naming the file."""
    import onnx

    from service.worker.optimize_job import _calibration
    from service.worker.sandbox import Refused

    original = onnx.load_from_string(digits_onnx)
    x, y = split.train_x[:64].numpy(), split.train_y[:64].numpy()
    for filename, data, _fields, says in _calibration_cases(x, y):
        with pytest.raises(Refused) as refused:
            settings = {"format": filename.rsplit(".", 1)[1]}
            _calibration(original, data, settings, {"x": [2, 1, 8, 8]})
        assert refused.value.status == 400, says
        assert str(refused.value).startswith("the calibration file: "), str(refused.value)
        assert says in str(refused.value), (says, str(refused.value))


def test_bad_calibration_files_are_refused_and_keep_the_served_version(
    api, split, digits_onnx, deployed
):
    """Over HTTP, one case of each kind: the file (bnfold.array_files), its samples
    (service/worker/input_data.py) and its labels (bnfold.optimizer.accuracy)."""
    x, y = split.train_x[:64].numpy(), split.train_y[:64].numpy()
    cases = _calibration_cases(x, y)
    for filename, data, fields, says in (cases[0], cases[4], cases[6]):
        form = {"name": "digits-guarded", "optimize": "true", "input_shape": "[2,1,8,8]"}
        files = {"file": ("model.onnx", digits_onnx), "calibration": (filename, data)}
        r = api.post("/v1/models", data={**form, **fields}, files=files)
        assert r.status_code == 400, (says, r.text)
        assert says in r.json()["error"], r.text
        assert r.json()["error"].startswith("the calibration file: "), r.text
        assert _served_version(api) == deployed


def test_a_bad_calibration_file_is_refused_before_the_model_is_folded(api, split, digits_onnx):
    """With rtol = atol = 0 the fold's own verification fails (folding rounds differently),
    so only a calibration check made before folding can be the refusal the client sees."""
    files = {
        "file": ("model.onnx", digits_onnx),
        "calibration": ("c.npz", npz_bytes(x=np.zeros_like(split.train_x[:8].numpy()))),
    }
    form = {"name": "digits-unfoldable", "optimize": "true", "input_shape": "[2,1,8,8]"}
    r = api.post("/v1/models", data={**form, "rtol": "0", "atol": "0"}, files=files)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("the calibration file: all 8 samples are identical")
    # the same upload with a good file fails where it should: at the exact verification
    files["calibration"] = ("c.npz", npz_bytes(x=split.train_x[:8].numpy()))
    r = api.post("/v1/models", data={**form, "rtol": "0", "atol": "0"}, files=files)
    assert r.status_code == 422, r.text
    assert "calibration" not in r.json()["error"], r.text
    assert api.get("/v1/models/digits-unfoldable").status_code == 404


def test_degenerate_recalibration_data_is_refused_and_keeps_the_served_version(
    api, split, deployed
):
    x = split.train_x[:64].numpy()
    cases = [
        (np.zeros_like(x), "all 64 samples are identical"),
        (np.ones_like(x), "all 64 samples are identical"),
        (np.repeat(x[:1], 64, 0), "all 64 samples are identical"),
        (x * np.float32(1e30), "their squares overflow"),
    ]
    for data, says in cases:
        for align in ("true", "false"):
            r = api.post(
                "/v1/models/digits-guarded/recalibrate",
                data={"align_input": align},
                files={"file": ("data.npy", npy_bytes(data))},
            )
            assert r.status_code == 400, (says, r.text)
            assert says in r.json()["error"], r.text
            assert _served_version(api) == deployed


def test_a_form_field_sent_twice_is_refused(api, digits_onnx, deployed):
    r = api.post(
        "/v1/models",
        data={"name": ["digits-guarded", "digits-other"], "optimize": ["true", "false"]},
        files={"file": ("model.onnx", digits_onnx)},
    )
    assert r.status_code == 400, r.text
    assert "['name', 'optimize'] given more than once" in r.json()["error"]
    assert api.get("/v1/models/digits-other").status_code == 404
    r = api.post(
        "/v1/models/digits-guarded/recalibrate",
        data={"batch_size": ["8", "64"]},
        files={"file": ("data.npy", npy_bytes(np.zeros((4, 1, 8, 8), np.float32)))},
    )
    assert r.status_code == 400, r.text
    assert "['batch_size'] given more than once" in r.json()["error"]
    assert _served_version(api) == deployed
