"""An fp16 graph for CUDA: fp16 weights and compute, fp32 graph inputs and outputs.

onnxruntime's own converter (``onnxruntime.transformers.float16``) does the rewriting; this
module decides what stays in fp32:

1. the operators onnxruntime's converter keeps in fp32 by default (its op block list);
2. every node with a constant input beyond fp16's largest finite value (65504), which a
   folded BN can produce (W * gamma / sqrt(var + eps) with a tiny variance): cast, it would be
   infinite.

Correctness is checked like every candidate's, through onnxruntime (the CPU provider runs
fp16 graphs too); speed needs a CUDA device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["FP16_MAX", "Fp16Result", "to_fp16"]

FP16_MAX = 65504.0


@dataclass
class Fp16Result:
    model: onnx.ModelProto
    overflow_nodes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"overflow_nodes_kept_fp32": self.overflow_nodes}


def _overflow_nodes(model: onnx.ModelProto) -> list[str]:
    large = {
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
        and np.abs(numpy_helper.to_array(t)).max(initial=0.0) > FP16_MAX
    }
    return [n.name for n in model.graph.node if any(i in large for i in n.input)]


def to_fp16(model: onnx.ModelProto) -> Fp16Result:
    """`model` (named nodes) in fp16, fp32 at its inputs and outputs (steps 1 and 2)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    overflow = _overflow_nodes(model)
    converted = convert_float_to_float16(
        model, keep_io_types=True, node_block_list=overflow or None
    )
    return Fp16Result(converted, overflow)
