"""Provider choice without a GPU: onnxruntime is faked where CUDA would be needed."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

from service.errors import ServiceUnavailable
from service.runtime import sessions
from service.runtime.sessions import CPU, CUDA, SessionFactory, gpu_divergence
from tests.service.support import conv_bn_model


class FakeOrt:
    """onnxruntime as it behaves with CUDA listed: the session says which provider it got."""

    def __init__(self, cuda_works: bool) -> None:
        self.cuda_works = cuda_works
        self.asked: list[list[str]] = []
        self.SessionOptions = ort.SessionOptions

    def get_available_providers(self) -> list[str]:
        return [CUDA, CPU]

    def InferenceSession(self, model, options, providers):  # noqa: N802 (onnxruntime's name)
        self.asked.append(list(providers))
        session = ort.InferenceSession(model, providers=[CPU])
        got = CUDA if CUDA in providers and self.cuda_works else CPU
        session.get_providers = lambda: [got, CPU] if got == CUDA else [CPU]
        return session


@pytest.fixture
def fake_ort(monkeypatch):
    def install(cuda_works: bool) -> FakeOrt:
        fake = FakeOrt(cuda_works)
        monkeypatch.setitem(sys.modules, "onnxruntime", fake)
        return fake

    return install


MODEL = conv_bn_model().SerializeToString()


def test_cuda_is_reported_when_the_session_really_gets_it(fake_ort):
    fake_ort(cuda_works=True)
    loaded = SessionFactory(require_gpu=True).create(MODEL)
    assert loaded.provider == CUDA


def test_silent_fallback_is_detected_and_not_retried(fake_ort):
    fake = fake_ort(cuda_works=False)
    factory = SessionFactory()
    assert factory.create(MODEL).provider == CPU
    assert factory.create(MODEL).provider == CPU
    assert fake.asked == [[CUDA, CPU], [CPU]]  # CUDA tried once, then the CPU directly


def test_require_gpu_refuses_a_silent_fallback(fake_ort):
    fake_ort(cuda_works=False)
    with pytest.raises(ServiceUnavailable, match="require_gpu"):
        SessionFactory(require_gpu=True).create(MODEL)


def test_gpu_divergence_compares_against_the_original_on_cpu():
    loaded = SessionFactory().create(MODEL)  # stands in for the GPU session
    report = gpu_divergence(MODEL, loaded, {"x": [2, 3, 8, 8]})
    assert report["reference"].startswith("original graph on CPUExecutionProvider")
    assert report["input_shapes"] == {"x": [2, 3, 8, 8]}
    assert report["max_abs_err"] == 0.0


def test_string_inputs_reach_onnxruntime_as_text():
    array = np.array([b"a", "\u00e9".encode()], dtype=object)
    assert sessions._text("x", array).tolist() == ["a", "\u00e9"]
    with pytest.raises(Exception, match="UTF-8"):
        sessions._text("x", np.array([b"\xff"], dtype=object))
