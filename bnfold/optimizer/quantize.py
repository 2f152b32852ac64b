"""INT8 QDQ graphs from onnxruntime's quantizer, with ranges calibrated or computed.

Calibration stays apart from rewriting. Ranges reach ``quantize_static`` as data, through
its calibration cache (``TensorsData``: rmin / rmax per tensor): `calibrate` runs one of
onnxruntime's calibration methods once and keeps its ranges; `ranges_cache` writes ranges
computed from BN statistics in the same format. Every later quantization (the per-operator
variants of a candidate) reads the cache and calibrates nothing again.

Weights are per-channel symmetric int8, activations uint8 (the CPU recipe onnxruntime
documents); on a CPU without VNNI weights are 7-bit (``reduce_range``). The nodes onnxruntime's
quantizer gets wrong stay in fp32 in every INT8 graph, each with its reason (`unquantizable`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

from bnfold.optimizer.hardware import cpu_features
from bnfold.optimizer.ranges import TensorRange

__all__ = [
    "CALIBRATION_METHODS",
    "calibrate",
    "quantize",
    "ranges_cache",
    "reduced_range",
    "unquantizable",
    "weight_qmax",
]

# onnxruntime's calibration methods, by the name candidates carry, with the options used
CALIBRATION_METHODS = {
    "minmax": ("MinMax", {}),
    "percentile": ("Percentile", {"CalibPercentile": 99.999}),
    "entropy": ("Entropy", {}),
}


class _QuietPreprocessHint(logging.Filter):
    """onnxruntime logs "consider pre-processing" on the root logger at every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._next = iter(self._feeds)

    def get_next(self):
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)


def reduced_range() -> bool:
    """7-bit weights where the CPU has no VNNI: its u8 x s8 instruction (vpmaddubsw) saturates
    16-bit sums of full-range products, which onnxruntime avoids with ``reduce_range``."""
    return cpu_features()["int8"] == "none"


def weight_qmax() -> int:
    """The largest int8 weight onnxruntime's symmetric per-channel quantizer will use here."""
    from onnxruntime.quantization.quant_utils import QuantType, get_qmin_qmax_for_qType

    _, qmax = get_qmin_qmax_for_qType(
        QuantType.QInt8.tensor_type, reduce_range=reduced_range(), symmetric=True
    )
    return int(qmax)


def ranges_cache(ranges: dict[str, TensorRange], path: Path) -> Path:
    """Write computed ranges as onnxruntime's calibration cache (as if MinMax-calibrated)."""
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorsData,
        save_tensors_data,
    )

    data = {
        name: (np.array(min(r.rmin, 0.0), np.float32), np.array(max(r.rmax, 0.0), np.float32))
        for name, r in ranges.items()
    }
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), path)
    return path


def unquantizable(model: onnx.ModelProto) -> dict[str, str]:
    """Nodes onnxruntime's quantizer cannot quantize, by name, with the reason: a grouped
    ConvTranspose, whose weight [C_in, C_out / group, k...] it scales per channel along axis 1:
    C_out / group scales, where the bias needs C_out (quantize_static fails on the bias's
    broadcast)."""
    kept = {}
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "ConvTranspose" and group > 1:
            kept[node.name] = (
                f"a grouped ConvTranspose (group {group}): onnxruntime's per-channel quantizer "
                "scales its weight along axis 1, which holds C_out / group channels, not C_out"
            )
    return kept


def _quantize_static(model, cache: Path, method: str, feeds, exclude) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate_method, options = CALIBRATION_METHODS[method]
    quiet = _QuietPreprocessHint()
    logging.getLogger().addFilter(quiet)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        source, target = Path(tmp, "in.onnx"), Path(tmp, "out.onnx")
        onnx.save(model, source)
        quantize_static(
            str(source),
            str(target),
            _Reader(feeds) if feeds is not None else None,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduced_range(),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(set(exclude) | set(unquantizable(model))),
            calibrate_method=getattr(CalibrationMethod, calibrate_method),
            calibration_providers=["CPUExecutionProvider"],
            calibration_cache_path=str(cache),
            # a BN left unfolded has a rank-1 scale, whose channel axis is 0; onnxruntime's
            # default for normalizations is 1, which it rejects with a warning and then
            # quantizes the scale per tensor
            extra_options={
                "QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0},
                **options,
            },
        )
        quantized = onnx.load(str(target))
    logging.getLogger().removeFilter(quiet)
    return quantized


def calibrate(
    model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]], method: str, cache: Path
) -> onnx.ModelProto:
    """Calibrate `model` on `feeds` with onnxruntime's `method`, keep the ranges in `cache`,
    and return the quantized graph."""
    return _quantize_static(model, cache, method, feeds, ())


def quantize(
    model: onnx.ModelProto, cache: Path, *, method: str = "minmax", exclude: Iterable[str] = ()
) -> onnx.ModelProto:
    """`model` quantized with the ranges in `cache`; nodes in `exclude` stay in fp32."""
    return _quantize_static(model, cache, method, None, exclude)
