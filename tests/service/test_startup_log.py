"""Start-up says where models run, and why, once and in our words: no onnxruntime log lines."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from service.runtime.sessions import cuda_unusable_reason
from tests.service.support import cuda_usable


@pytest.mark.skipif(cuda_usable(), reason="this machine serves on the GPU")
def test_cpu_start_explains_the_fallback_without_onnxruntime_errors(start_server):
    server = start_server()
    server.stop()
    log = server.log.read_text()
    assert "[E:onnxruntime" not in log and "[W:onnxruntime" not in log, log
    assert "libonnxruntime_providers_cuda" not in log or "CUDA provider cannot load" in log
    (line,) = [ln for ln in log.splitlines() if "execution provider:" in ln]
    assert "CPUExecutionProvider: no usable GPU (" in line
    assert cuda_unusable_reason(ort) in line or "no CUDA execution provider" in line


@pytest.mark.skipif(cuda_usable(), reason="this machine serves on the GPU")
def test_the_fallback_reason_names_what_is_missing():
    reason = cuda_unusable_reason(ort)
    assert "libcuda.so.1" in reason or "CUDA provider cannot load (" in reason
