"""onnxruntime's refusals as bnfold reports them: its own reason, first line, without the status
prefix ("[ONNXRuntimeError] : 1 : FAIL : ") and the C++ function it came from."""

from __future__ import annotations

import re

__all__ = ["is_runtime_error", "runtime_reason"]

_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_LOCATION = re.compile(r"^/\S+:\d+ [^(]*\([^)]*\) ")  # "/onnxruntime_src/...cc:256 f(args) "


def is_runtime_error(exc: BaseException) -> bool:
    """Raised by onnxruntime itself (its exception types derive from Exception only)."""
    return type(exc).__module__.startswith("onnxruntime")


def runtime_reason(exc: BaseException) -> str:
    text = _LOCATION.sub("", _STATUS.sub("", str(exc).strip()))
    return text.splitlines()[0] if text else type(exc).__name__
