"""tritonclient.http, unchanged, against the service: health, metadata, config, infer in JSON,
binary and mixed modes for every datatype; errors come back as InferenceServerException."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.service.support import ONNX_TYPES

NP = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


@pytest.fixture
def triton(server):
    client = httpclient.InferenceServerClient(server.hostport, network_timeout=60)
    yield client
    client.close()


def sample(datatype: str, rng) -> np.ndarray:
    if datatype == "BYTES":
        return np.array([[b"a", b"bc", "\u00e9".encode()], [b"", b"xyz", b"0"]], dtype=object)
    if datatype == "BOOL":
        return rng.integers(0, 2, (2, 3)).astype(bool)
    dtype = np.dtype(NP[datatype])
    if dtype.kind == "f":
        return rng.standard_normal((2, 3)).astype(dtype)
    return rng.integers(0, 100, (2, 3)).astype(dtype)


def test_health_and_server_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    assert "statistics" not in meta["extensions"]
    assert triton.is_model_ready("resnet_small")
    assert not triton.is_model_ready("no_such_model")


def test_model_metadata_and_config(triton):
    meta = triton.get_model_metadata("resnet_small")
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"][0] == -1
    assert meta["execution_provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    version = meta["versions"][0]
    assert triton.get_model_metadata("resnet_small", model_version=version) == meta
    assert triton.is_model_ready("resnet_small", model_version=version)
    assert not triton.is_model_ready("resnet_small", model_version="0000")
    config = triton.get_model_config("resnet_small")
    assert config["max_batch_size"] > 0
    assert [i["name"] for i in config["input"]] == [i["name"] for i in meta["inputs"]]
    assert [o["name"] for o in config["output"]] == [o["name"] for o in meta["outputs"]]
    assert config["input"][0]["dims"] == meta["inputs"][0]["shape"][1:]


@pytest.mark.parametrize("mode", ["json", "binary", "mixed"])
def test_every_datatype_round_trips(triton, mode):
    rng = np.random.default_rng(0)
    inputs, outputs, sent = [], [], {}
    for i, datatype in enumerate(ONNX_TYPES):
        x = sample(datatype, rng)
        assert np_to_triton_dtype(x.dtype) == datatype
        binary = mode == "binary" or (mode == "mixed" and i % 2 == 0)
        inp = httpclient.InferInput(f"in_{datatype}", list(x.shape), datatype)
        inp.set_data_from_numpy(x, binary_data=binary)
        inputs.append(inp)
        outputs.append(httpclient.InferRequestedOutput(f"out_{datatype}", binary_data=not binary))
        sent[datatype] = x
    result = triton.infer("identity_all", inputs, outputs=outputs, request_id=f"req-{mode}")
    assert result.get_response()["id"] == f"req-{mode}"
    for datatype, x in sent.items():
        got = result.as_numpy(f"out_{datatype}")
        if datatype == "BYTES":
            got = np.array(
                [v if isinstance(v, bytes) else v.encode() for v in got.ravel()], dtype=object
            ).reshape(x.shape)
        np.testing.assert_array_equal(got, x)
        assert got.dtype == x.dtype


def test_infer_defaults_binary_outputs_and_matches_json(triton, server):
    x = np.random.default_rng(4).standard_normal((3, 3, 16, 16)).astype(np.float32)
    results = []
    for binary in (True, False):
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        results.append(triton.infer("resnet_small", [inp]))  # no outputs: binary by default
    meta = triton.get_model_metadata("resnet_small")
    (out_name,) = [o["name"] for o in meta["outputs"]]
    np.testing.assert_array_equal(results[0].as_numpy(out_name), results[1].as_numpy(out_name))
    pinned = triton.infer("resnet_small", [inp], model_version=meta["versions"][0])
    np.testing.assert_array_equal(pinned.as_numpy(out_name), results[0].as_numpy(out_name))
    assert pinned.get_response()["model_version"] == meta["versions"][0]
    assert results[0].as_numpy(out_name).shape == (3, 10)


def test_errors_reach_the_client_as_messages(triton):
    x = np.zeros((2, 5), np.float32)
    inp = httpclient.InferInput("x", [2, 5], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="does not fit the model") as err:
        triton.infer("mlp_bn_after_act", [inp])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match="not deployed"):
        triton.infer("no_such_model", [inp])
    wrong = httpclient.InferInput("x", [2, 300], "FP64")
    wrong.set_data_from_numpy(np.zeros((2, 300)))
    with pytest.raises(InferenceServerException, match="expects datatype FP32"):
        triton.infer("mlp_bn_after_act", [wrong])


def test_compressed_requests_are_accepted(triton):
    x = np.ones((1, 300), np.float32)
    plain = httpclient.InferInput("x", [1, 300], "FP32")
    plain.set_data_from_numpy(x)
    want = triton.infer("mlp_bn_after_act", [plain]).as_numpy("linear_3")
    for algorithm in ("gzip", "deflate"):
        got = triton.infer(
            "mlp_bn_after_act",
            [plain],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        np.testing.assert_array_equal(got.as_numpy("linear_3"), want)
