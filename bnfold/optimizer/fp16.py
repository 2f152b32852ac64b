"""An fp16 graph for CUDA: fp16 weights and compute, fp32 graph inputs and outputs.

onnxruntime's own converter (``onnxruntime.transformers.float16``) does the rewriting, with
``keep_io_types`` so that the graph's edges stay fp32 (a Cast at each); this module decides
what stays in fp32, each node with its reason in the report:

1. the operators onnxruntime's converter keeps in fp32 by default (its op block list: ML
   operators, TopK, NonMaxSuppression, Range, CumSum, Min, Max, Upsample, ...);
2. the operators known to lose accuracy in fp16 (``FP32_OPS``): results that overflow fp16's
   65504 or need more than its 11 significant bits. Exp overflows from x > 11.1; Pow and the
   sums of squares (ReduceSumSquare, ReduceL2) overflow from values near 256; ReduceSum,
   ReduceProd and the log-sum-exps accumulate rounding over their whole extent; Softmax and
   LogSoftmax are the class probabilities a top-1 is read from, where fp16 cannot tell 0.9995
   from 1. They are rare in convolution networks, so keeping them costs two Casts each. The
   normalizations (LayerNormalization and kin) are not kept: onnxruntime's CUDA kernels for
   them accumulate in fp32 already, and they are most of a transformer's fp16 speed;
3. every node with a constant input (an initializer or a Constant node's value) beyond fp16's
   largest finite value (65504), which a folded BN can produce: W * gamma / sqrt(var + eps)
   with a tiny running variance. Cast, it would be infinite; kept, the node computes in fp32
   and its output, a normalized activation again, is cast back to fp16 for the next node;
4. no fp32 value makes a round trip through fp16 between two fp32 nodes, or on its way to a
   graph output (``_drop_round_trips``).

Correctness is checked like every candidate's, against the fp32 original through onnxruntime
(the CPU provider runs fp16 graphs too), and a candidate with a non-finite output fails the
budget whatever its limits (``Budget.check``); speed needs a CUDA device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.optimizer.graph import constants

__all__ = ["FP16_MAX", "FP32_OPS", "Fp16Result", "to_fp16"]

FP16_MAX = 65504.0
FP32_OPS = frozenset(
    {
        "Exp",
        "Pow",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceSum",
        "ReduceProd",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "Softmax",
        "LogSoftmax",
    }
)


@dataclass
class Fp16Result:
    model: onnx.ModelProto
    overflow_nodes: list[str] = field(default_factory=list)  # step 3
    kept_fp32: dict[str, str] = field(default_factory=dict)  # node name -> why (steps 2, 3)

    def to_dict(self) -> dict:
        return {"overflow_nodes_kept_fp32": self.overflow_nodes, "kept_fp32": self.kept_fp32}


def _kept_nodes(model: onnx.ModelProto) -> tuple[list[str], dict[str, str]]:
    """(overflowing nodes, every node kept in fp32 with its reason): steps 2 and 3."""
    peaks = {
        name: float(np.abs(a).max(initial=0.0))
        for name, a in constants(model.graph).items()
        if a.dtype == np.float32 and np.abs(a).max(initial=0.0) > FP16_MAX
    }
    overflow, why = [], {}
    for node in model.graph.node:
        big = [i for i in node.input if i in peaks]
        if node.op_type == "Constant" and node.output[0] in peaks:
            overflow.append(node.name)  # else its value is cast to fp16 before any consumer
            why[node.name] = f"its value reaches {peaks[node.output[0]]:.3g}, beyond 65504"
        elif big:
            overflow.append(node.name)
            why[node.name] = (
                f"constant {big[0]!r} reaches {peaks[big[0]]:.3g}, beyond fp16's 65504 "
                "(a folded BN with a tiny running variance)"
            )
        elif node.op_type in FP32_OPS:
            why[node.name] = f"{node.op_type} loses accuracy in fp16 (overflow or rounding)"
    return overflow, why


def _drop_round_trips(model: onnx.ModelProto, fp32_nodes: set[str], fp32_ops: set[str]) -> None:
    """Step 4: the converter casts every fp32 node's output to fp16 and back for a next fp32
    node or a graph output, which would undo steps 2 and 3 (exp(12) and a folded 1e5 weight
    are infinite in between). Such a Cast(fp16) -> Cast(fp32) pair becomes one Identity of the
    fp32 value; a Cast(fp16) left without consumers goes."""
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    graph_inputs = {v.name for v in model.graph.input}

    def is_cast(node: onnx.NodeProto, to: int) -> bool:
        return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)

    def fp32_source(name: str) -> bool:
        node = producer.get(name)
        if node is None:
            return name in graph_inputs
        return node.name in fp32_nodes or node.op_type in fp32_ops

    for node in nodes:
        first = producer.get(node.input[0]) if node.input else None
        if (
            is_cast(node, onnx.TensorProto.FLOAT)
            and first is not None
            and is_cast(first, onnx.TensorProto.FLOAT16)
            and fp32_source(first.input[0])
        ):
            node.op_type, node.input[0] = "Identity", first.input[0]
            del node.attribute[:]
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dead = [n for n in model.graph.node if n.op_type == "Cast" and n.output[0] not in used]
    for node in dead:
        model.graph.node.remove(node)


def to_fp16(model: onnx.ModelProto) -> Fp16Result:
    """`model` (named nodes) in fp16, fp32 at its inputs and outputs (steps 1 to 4)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    overflow, kept = _kept_nodes(model)
    fp32_ops = set(DEFAULT_OP_BLOCK_LIST) | FP32_OPS
    converted = convert_float_to_float16(
        model,
        keep_io_types=True,
        op_block_list=sorted(fp32_ops),
        node_block_list=overflow or None,
    )
    _drop_round_trips(converted, set(overflow), fp32_ops)
    return Fp16Result(converted, overflow, kept)
