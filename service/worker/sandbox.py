"""What every job runs inside: resource limits, staged imports, and the refusal it raises.

Limits are set in the worker itself rather than in a ``preexec_fn``, which is unsafe in the
threaded server. ``torch.load`` is disabled as a second line of defence: uploaded bytes are
parsed as protobuf or safetensors, never unpickled.
"""

from __future__ import annotations

import importlib
import resource
from typing import Any

__all__ = [
    "FOLDING",
    "LIMITS",
    "Refused",
    "disable_unpickling",
    "first_lines",
    "require",
    "set_limits",
]

LIMITS: dict[str, int] = {}


class Refused(Exception):
    """The upload cannot be deployed; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def set_limits(limits: dict[str, int]) -> None:
    LIMITS.update(limits)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.get("memory_bytes"):
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    if limits.get("cpu_s"):
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 5))
    if limits.get("file_bytes"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)


def _no_unpickling(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("unpickling is disabled in the ingest worker")


def disable_unpickling() -> None:
    import torch

    torch.load = _no_unpickling


def require(*modules: str) -> None:
    """Import libraries the job needs. Called in stages, so that a file that is not a model at
    all is refused before torch is loaded, and a limit too tight for the libraries themselves
    reads as a configuration problem rather than as a fault of the model."""
    limit = LIMITS.get("memory_bytes")
    for name in modules:
        try:
            importlib.import_module(name)
        except (ImportError, OSError, MemoryError) as exc:
            raise Refused(
                503,
                f"the ingest worker could not load {name} within its resource limits (memory "
                f"{limit} bytes, BNFOLD_WORKER_MEMORY_BYTES): {first_lines(exc, 1)}",
            ) from None


# what folding an ONNX graph needs; torch-side jobs need "torch" and "models" too
FOLDING = ("onnxruntime", "bnfold.onnx.fold", "bnfold.onnx.verify")


def first_lines(exc: BaseException | str, n: int = 3) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return " / ".join(lines[:n]) + (" ..." if len(lines) > n else "")
