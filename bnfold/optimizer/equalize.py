"""Cross-layer equalization of Conv -> ReLU -> Conv pairs (the math: `dfq.equalization_scales`).

A pair is equalized when it is exact to do so:

1. the first conv's output feeds only a ReLU, whose output feeds only the second conv;
2. both weights (and the first bias) are initializers used by that conv alone;
3. the second conv is ungrouped or depthwise (one input channel per group) and the first
   is ungrouped or depthwise, so channel i of the one is input channel i of the other.

Skips are reasons in the result: ReLU6 (Clip) and hard-swish are not positively homogeneous,
so scaling through them would change the function (DFQ replaces ReLU6 by ReLU; we do not
change what the model computes). The BN statistics of the scaled tensor are scaled with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.optimizer.bn_stats import ChannelStats
from bnfold.optimizer.dfq import equalization_scales
from bnfold.optimizer.graph import GraphIndex, attribute

__all__ = ["EqualizeResult", "equalize"]

_NOT_HOMOGENEOUS = {"Clip", "HardSwish", "HardSigmoid", "Sigmoid", "Mul", "Silu", "Gelu"}


@dataclass
class EqualizeResult:
    pairs: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    modified: bool = False

    def to_dict(self) -> dict:
        return {"pairs": len(self.pairs), "skipped": self.skipped}


def _channel_layout(conv: onnx.NodeProto, w: np.ndarray) -> str | None:
    groups = attribute(conv, "group", 1)
    if groups == 1:
        return "dense"
    if w.shape[1] == 1 and groups == w.shape[0]:
        return "depthwise"
    return None


def _pair(index: GraphIndex, conv1: onnx.NodeProto) -> tuple | str:
    """(act, conv2) for an equalizable pair, else the reason it is not one."""
    act = index.only_consumer(conv1.output[0])
    if act is None:
        return "conv output has several users"
    if act.op_type != "Relu":
        return (
            f"{act.op_type} between the convs is not scale-invariant"
            if (act.op_type in _NOT_HOMOGENEOUS)
            else "no activation-conv pair"
        )
    conv2 = index.only_consumer(act.output[0])
    if conv2 is None or conv2.op_type != "Conv" or conv2.input[0] != act.output[0]:
        return "no activation-conv pair"
    names = [conv1.input[1], conv2.input[1]] + ([conv1.input[2]] if len(conv1.input) > 2 else [])
    if not all(index.private_weight(n) for n in names):
        return "weights shared or not constant"
    return act, conv2


def equalize(model: onnx.ModelProto, stats: dict[str, ChannelStats]) -> EqualizeResult:
    """Equalize in place; `stats` (by tensor name) are rescaled where a tensor is scaled."""
    index = GraphIndex(model.graph)
    result = EqualizeResult()
    for conv1 in [n for n in model.graph.node if n.op_type == "Conv"]:
        pair = _pair(index, conv1)
        if isinstance(pair, str):
            if pair != "no activation-conv pair":
                result.skipped[pair] = result.skipped.get(pair, 0) + 1
            continue
        _act, conv2 = pair
        w1, w2 = index.weight(conv1.input[1]), index.weight(conv2.input[1])
        l1, l2 = _channel_layout(conv1, w1), _channel_layout(conv2, w2)
        if l1 is None or l2 is None:
            reason = "grouped conv (not dense, not depthwise)"
            result.skipped[reason] = result.skipped.get(reason, 0) + 1
            continue
        channels = w1.shape[0]
        r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
        # input channel i of conv2: column i (dense) or its filter i (depthwise)
        w2_in = np.moveaxis(w2, 1, 0) if l2 == "dense" else w2
        r2 = np.abs(w2_in.reshape(channels, -1)).max(axis=1)
        s = equalization_scales(r1, r2)
        shape = (-1,) + (1,) * (w1.ndim - 1)
        index.set_weight(conv1.input[1], w1 / s.reshape(shape))
        if len(conv1.input) > 2 and conv1.input[2]:
            index.set_weight(conv1.input[2], index.weight(conv1.input[2]) / s)
        if l2 == "dense":
            index.set_weight(conv2.input[1], w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2)))
        else:
            index.set_weight(conv2.input[1], w2 * s.reshape(shape))
        if conv1.output[0] in stats:
            stats[conv1.output[0]] = stats[conv1.output[0]].scaled(s)
        result.pairs.append(conv1.name)
        result.modified = True
    return result
