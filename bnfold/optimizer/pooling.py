"""ReduceMean over the spatial dims of a 4-D tensor, rewritten as GlobalAveragePool.

The two compute the same value: the mean over H and W of each (n, c), kept as [N, C, 1, 1].
They are not the same to onnxruntime's INT8 path. A QDQ ``DequantizeLinear ->
GlobalAveragePool -> QuantizeLinear`` becomes one ``QLinearGlobalAveragePool``, which runs on
the channels-last tensor the int8 convolutions produce; a ``ReduceMean`` stays in fp32 behind a
``DequantizeLinear`` of the whole feature map, and its reduction runs over the strided H and W
of that layout. On EfficientNet-B0 (16 squeeze-excitation blocks and the head, each a
``mean((2, 3), keepdim=True)`` in PyTorch, exported as ReduceMean) the rewrite took the INT8
graph from 1.01x / 0.90x of the fp32 graph's time to 0.83x / 0.81x at batch 1 / 8, and left the
fp32 graph as it was (0.99x / 1.01x) (docs/BENCHMARKS.md, issue 13). So every graph `optimize`
quantizes is rewritten first; output names are kept, so calibrated ranges still apply.

A node is rewritten when (the numbers match comments in the code):

1. it is a ReduceMean whose axes are a constant (the ``axes`` input from opset 18, the
   attribute before), not absent: with no axes ReduceMean reduces every dim;
2. its input has rank 4, from shape inference, and the axes are {2, 3} (negative axes
   counted from that rank);
3. ``keepdims`` is 1 (the default): GlobalAveragePool keeps the reduced dims as 1.

Any other ReduceMean stays, with its reason counted in the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from bnfold.optimizer.graph import attribute, value_types
from bnfold.optimizer.graph import constants as graph_constants

__all__ = ["PoolingResult", "reduce_mean_as_global_pool"]


@dataclass
class PoolingResult:
    rewritten: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def modified(self) -> bool:
        return bool(self.rewritten)

    def to_dict(self) -> dict:
        return {"rewritten": len(self.rewritten), "skipped": self.skipped}


def _reason(node: onnx.NodeProto, constants: dict, ranks: dict) -> str | None:
    """Why `node` (a ReduceMean) cannot be a GlobalAveragePool, or None when it can."""
    if len(node.input) > 1 and node.input[1]:  # case 1
        if node.input[1] not in constants:
            return "axes not a constant"
        axes = [int(a) for a in constants[node.input[1]].reshape(-1)]
    else:
        axes = attribute(node, "axes")
        if axes is None:
            return "no axes: reduces every dim"
    rank = ranks.get(node.input[0], (None,))[0]
    if rank is None:
        return "input rank unknown"
    if rank != 4 or sorted(a % rank for a in axes) != [2, 3]:  # case 2
        return "not the spatial dims of a 4-D input"
    if attribute(node, "keepdims", 1) != 1:  # case 3
        return "keepdims=0"
    return None


def reduce_mean_as_global_pool(model: onnx.ModelProto) -> PoolingResult:
    """Rewrite, in place, every ReduceMean that is a global average pool (module docstring)."""
    result = PoolingResult()
    reduce_means = [n for n in model.graph.node if n.op_type == "ReduceMean"]
    if not reduce_means:
        return result
    constants, ranks = graph_constants(model.graph), value_types(model)
    dropped: set[str] = set()
    for node in reduce_means:
        reason = _reason(node, constants, ranks)
        if reason is not None:
            result.skipped[reason] = result.skipped.get(reason, 0) + 1
            continue
        dropped.update(node.input[1:])
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        result.rewritten.append(node.name)
    # an axes initializer no other node reads goes too (onnxruntime warns about it otherwise)
    used = {name for node in model.graph.node for name in node.input}
    unused = [t for t in model.graph.initializer if t.name in dropped - used]
    for tensor in unused:
        model.graph.initializer.remove(tensor)
    return result
