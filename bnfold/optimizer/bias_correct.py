"""Analytic bias correction of convs (the math: `dfq.bias_shift`).

For each Conv with a constant weight of its own and a known mean per input channel (from the
BN statistics propagated by `ranges.propagate_ranges`), the expected output shift that
per-channel int8 weight quantization will cause is subtracted from the bias (a bias of zeros
is added when the conv has none). Gemm / MatMul are left as they are (reported).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.optimizer.dfq import bias_shift, quantize_weight_per_channel
from bnfold.optimizer.graph import GraphIndex, attribute
from bnfold.optimizer.quantize import weight_qmax
from bnfold.optimizer.ranges import TensorRange

__all__ = ["BiasCorrectionResult", "correct_biases"]


@dataclass
class BiasCorrectionResult:
    corrected: int = 0
    skipped: int = 0
    max_shift: float = 0.0

    def to_dict(self) -> dict:
        return {"corrected": self.corrected, "skipped": self.skipped, "max_shift": self.max_shift}


def correct_biases(
    model: onnx.ModelProto, ranges: dict[str, TensorRange], exclude: set[str] = frozenset()
) -> BiasCorrectionResult:
    """Correct in place the biases of the convs that will be quantized (not in `exclude`)."""
    index = GraphIndex(model.graph)
    result = BiasCorrectionResult()
    for conv in [n for n in model.graph.node if n.op_type == "Conv"]:
        if conv.name in exclude:
            continue
        info = ranges.get(conv.input[0])
        w = index.weight(conv.input[1])
        if info is None or info.channel_mean is None or w is None:
            result.skipped += 1
            continue
        groups = attribute(conv, "group", 1)
        if info.channel_mean.shape[0] != w.shape[1] * groups:
            result.skipped += 1
            continue
        # the weights as onnxruntime will quantize them here (7-bit on a CPU without VNNI)
        quantized = quantize_weight_per_channel(w, qmax=weight_qmax())
        shift = bias_shift(w, quantized, info.channel_mean, groups)
        has_bias = len(conv.input) > 2 and conv.input[2]
        if has_bias and not index.private_weight(conv.input[2]):
            result.skipped += 1
            continue
        bias = index.weight(conv.input[2]) if has_bias else np.zeros(w.shape[0])
        new = np.asarray(bias, np.float64) - shift
        if has_bias:
            index.set_weight(conv.input[2], new)
        else:
            name = index.add_weight(f"{conv.name}__bnfold_bias", new)
            conv.input.append(name) if len(conv.input) == 2 else conv.input.__setitem__(2, name)
        result.corrected += 1
        result.max_shift = max(result.max_shift, float(np.abs(shift).max()))
    return result
