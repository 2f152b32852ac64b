"""Provider choice without a GPU: onnxruntime is faked where CUDA would be needed."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

from service.errors import ServiceUnavailable
from service.runtime import sessions
from service.runtime.sessions import (
    CPU,
    CUDA,
    LoadedSession,
    SessionFactory,
    cpu_session,
    gpu_divergence,
    signature_of,
)
from tests.service.support import conv_bn_model


class FakeOrt:
    """onnxruntime as it behaves with CUDA listed: the session says which provider it got."""

    def __init__(self, cuda_works: bool) -> None:
        self.cuda_works = cuda_works
        self.asked: list[list[str]] = []
        self.cuda_options: list[dict] = []
        self.SessionOptions = ort.SessionOptions

    def get_available_providers(self) -> list[str]:
        return [CUDA, CPU]

    def InferenceSession(self, model, options, providers):  # noqa: N802 (onnxruntime's name)
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.asked.append(names)
        self.cuda_options += [p[1] for p in providers if isinstance(p, tuple) and p[0] == CUDA]
        session = ort.InferenceSession(model, providers=[CPU])
        got = CUDA if CUDA in names and self.cuda_works else CPU
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
    fake = fake_ort(cuda_works=True)
    loaded = SessionFactory(require_gpu=True).create(MODEL)
    assert loaded.provider == CUDA
    # cuDNN's heuristics by default: an exhaustive search per new batch size stalls batching
    assert fake.cuda_options == [{"cudnn_conv_algo_search": "HEURISTIC"}]
    SessionFactory(cudnn_conv_algo_search="EXHAUSTIVE").create(MODEL)
    assert fake.cuda_options[-1] == {"cudnn_conv_algo_search": "EXHAUSTIVE"}


def test_convolutions_on_cuda_are_marked_as_replanned_at_new_batch_sizes(fake_ort):
    fake_ort(cuda_works=True)
    assert SessionFactory().create(MODEL).replans_on_new_batch  # Conv on CUDA
    fake_ort(cuda_works=False)
    assert not SessionFactory().create(MODEL).replans_on_new_batch  # the CPU keeps no plans


def test_op_types_reach_into_subgraphs():
    from onnx import TensorProto, helper

    inner = helper.make_graph(
        [helper.make_node("Conv", ["a", "w"], ["b"])], "inner", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
    )  # fmt: skip
    node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    graph = helper.make_graph(
        [node], "outer", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph).SerializeToString()
    assert sessions.op_types(model) == {"If", "Conv"}


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
    session = cpu_session(MODEL)  # stands in for the GPU session
    loaded = LoadedSession(session, CPU, signature_of(session))
    report = gpu_divergence(MODEL, loaded, {"x": [2, 3, 8, 8]})
    assert report["reference"].startswith("original graph on CPUExecutionProvider")
    assert report["input_shapes"] == {"x": [2, 3, 8, 8]}
    assert report["max_abs_err"] == 0.0


def test_string_inputs_reach_onnxruntime_as_text():
    array = np.array([b"a", "\u00e9".encode()], dtype=object)
    assert sessions._text("x", array).tolist() == ["a", "\u00e9"]
    with pytest.raises(Exception, match="UTF-8"):
        sessions._text("x", np.array([b"\xff"], dtype=object))


def test_no_cuda_libraries_are_loaded_without_a_driver():
    """Preloading CUDA and cuDNN only helps where NVIDIA's driver is: elsewhere it cost a
    process 187 MiB of resident memory for nothing."""
    import subprocess

    from tests.service.support import ROOT

    if sessions._cuda_driver_present():
        pytest.skip("NVIDIA's driver is here")
    code = (
        "from service.runtime.sessions import SessionFactory; SessionFactory().probe(); "
        "print(any('libcublas' in line or 'libcudnn' in line for line in open('/proc/self/maps')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("spinning", [True, False])
def test_sessions_spin_or_sleep_as_the_settings_say(spinning):
    factory = SessionFactory(intra_op_threads=2, intra_op_spinning=spinning)
    loaded = factory.create(conv_bn_model().SerializeToString())
    options = loaded.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == str(int(spinning))
    assert options.intra_op_num_threads == 2
