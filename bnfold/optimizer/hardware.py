"""The CPU's integer dot-product features, read once and put in every optimize report.

They say what INT8 can be expected to buy (VNNI: int8 dot products in one instruction; AMX: int8
matrix tiles), but they decide nothing: the candidates are timed on this machine and the
numbers choose.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

__all__ = ["cpu_features"]

# /proc/cpuinfo flag -> the name the report uses
_FLAGS = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
    "asimddp": "arm_dotprod",  # aarch64 SDOT/UDOT
    "i8mm": "arm_i8mm",
}


@functools.cache
def cpu_features() -> dict:
    """{"model": ..., "flags": [...], "int8": "amx" | "vnni" | "dotprod" | "none"}."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and value.strip():
            model = value.strip()
    found = sorted(name for flag, name in _FLAGS.items() if flag in flags)
    if "amx_int8" in found:
        int8 = "amx"
    elif "avx512_vnni" in found or "avx_vnni" in found:
        int8 = "vnni"
    elif "arm_dotprod" in found:
        int8 = "dotprod"
    else:
        int8 = "none"
    return {"model": model, "machine": platform.machine(), "flags": found, "int8": int8}
