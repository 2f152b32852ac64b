"""Weights for torchvision and timm architectures: folded in torch, verified, served; every bad
name, argument or weights file is a 400 naming the problem, and nothing is deployed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.service.support import upload

torch = pytest.importorskip("torch")
from safetensors.torch import save  # noqa: E402

from bnfold.architectures import parse_architecture  # noqa: E402


def trained_looking(spec: str, seed: int, **args) -> torch.nn.Module:
    """The architecture with random weights and BN statistics far from 0 / 1."""
    model = parse_architecture(spec, args).build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.3, 0.3, generator=generator)
    return model.eval()


def served_output(server, name: str, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.hostport, network_timeout=120)
    try:
        metadata = client.get_model_metadata(name)
        (given,) = [httpclient.InferInput(metadata["inputs"][0]["name"], list(x.shape), "FP32")]
        given.set_data_from_numpy(x, binary_data=True)
        result = client.infer(name, [given])
        return result.as_numpy(metadata["outputs"][0]["name"])
    finally:
        client.close()


@pytest.mark.parametrize(
    ("spec", "args", "shape"),
    [
        ("torchvision:shufflenet_v2_x0_5", {"num_classes": 10}, [1, 3, 64, 64]),
        # timm's own small test net: mobilenetv3_small_050 took 100 s here in CI, mostly its
        # exports; its torch fold is checked in tests/bnfold/test_architectures.py
        ("timm:test_resnet", {"num_classes": 5, "in_chans": 1}, [1, 1, 64, 64]),
    ],
)
def test_weights_for_an_architecture_are_folded_in_torch_and_served(api, server, spec, args, shape):
    model = trained_looking(spec, seed=3, **args)
    name = spec.replace(":", "-").replace("_", "-")
    r = upload(
        api,
        name,
        save(model.state_dict()),
        "w.safetensors",
        architecture=spec,
        arch_args=json.dumps(args),
        input_shape=str(shape),
    )
    assert r.status_code == 201, r.text
    record = r.json()
    assert record["source"] == {"format": "safetensors", "architecture": spec, "arch_args": args}
    assert record["fold_report"]["counts"]["kept"] == 0, record["fold_report"]
    assert record["savings"]["folded_batchnorm"] == 0
    assert record["savings"]["original_batchnorm"] > 0

    x = np.random.default_rng(4).standard_normal([2, *shape[1:]]).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(served_output(server, name, x), want, rtol=1e-3, atol=1e-4)


def refused(api, name: str, weights: bytes, **fields) -> str:
    r = upload(api, name, weights, "w.safetensors", **fields)
    assert r.status_code == 400, r.text
    assert api.get(f"/v1/models/{name}").status_code == 404  # nothing deployed
    return r.json()["error"]


@pytest.fixture(scope="module")
def shufflenet_weights() -> bytes:
    return save(
        parse_architecture("torchvision:shufflenet_v2_x0_5", {"num_classes": 10})
        .build()
        .state_dict()
    )


def test_bad_names_arguments_and_weights_are_refused_naming_the_problem(api, shufflenet_weights):
    # one upload per kind of mistake; every case of each kind is in tests/bnfold/test_architectures
    error = refused(api, "bad1", shufflenet_weights, architecture="torchvision:shufflenet_v2_x05")
    assert "unknown architecture torchvision:shufflenet_v2_x05" in error
    assert "did you mean shufflenet_v2_x0_5" in error
    error = refused(
        api,
        "bad2",
        shufflenet_weights,
        architecture="torchvision:shufflenet_v2_x0_5",
        arch_args='{"num_classes": 10, "pretrained": true}',
    )
    assert "arch_args['pretrained'] is not accepted for torchvision architectures" in error
    # 10-class weights against the default 1000-class head
    error = refused(api, "bad3", shufflenet_weights, architecture="torchvision:shufflenet_v2_x0_5")
    assert "do not fit architecture torchvision:shufflenet_v2_x0_5" in error
    assert "fc.weight [10, 1024] (expected [1000, 1024])" in error


def test_arch_args_are_refused_before_any_work_when_they_cannot_be_right(api, conv_bn_bytes):
    r = upload(api, "bad-onnx", conv_bn_bytes, arch_args='{"num_classes": 10}')
    assert r.status_code == 400
    assert "arch_args is given without an architecture" in r.json()["error"]
    r = upload(api, "bad-json", conv_bn_bytes, architecture="timm:resnet18", arch_args="[10]")
    assert r.status_code == 400
    assert "arch_args must be a JSON object" in r.json()["error"]
