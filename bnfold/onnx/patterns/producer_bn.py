"""Backward folds: an affine producer followed by BatchNormalization becomes the producer alone.

    y = s * (W x + b) + t  =  (s W) x + (s b + t)

Cases, matched by the numbered comments below:

1. Conv / ConvTranspose -> BN: the BN channel axis is the conv output channel (axis 1) for any
   rank and any groups; a ConvTranspose weight is [in, out/groups, *k] (``transposed=True``).
2. Gemm -> BN: Gemm's output is [M, N] and BN normalises axis 1 = N, the output feature.
   alpha stays on the node; beta is folded into the new bias C.
3. MatMul (+ Add with a constant) -> BN: only when BN's axis 1 provably holds the MatMul's
   features, its last axis: a 2-D output, or Transposes between them that bring the last
   axis to 1 ([N, L, F] -> Transpose(0, 2, 1) -> BatchNorm1d). On [N, L, F] with nothing
   between, BN's axis 1 is L, not F. A shift with no Add to take it goes into a new Add
   right after the MatMul, where the features are still last.

Common guards: the producer's output feeds only this BN and is not a graph output, and its
weight (and bias) are constants (an initializer, or computed from initializers alone:
``FoldContext.constant``). Weights are always written to new initializers, so a weight
shared with another node is never changed under it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir

from bnfold.numerics import fold_bn_into_producer
from bnfold.onnx.patterns.base import (
    BNAffine,
    FoldContext,
    Pattern,
    Plan,
    attr_float,
    attr_int,
    attr_ints,
    from_torch,
    is_op,
    node_label,
    to_torch64,
)
from bnfold.report import Action

__all__ = ["ConvBN", "GemmBN", "MatMulBN", "producer_guard"]


def producer_guard(bn_affine: BNAffine, op_types: tuple[str, ...]) -> ir.Node | str | None:
    """The producer of the BN input if it is one of `op_types` and feeds only the BN."""
    producer = bn_affine.x.producer()
    if not is_op(producer, *op_types):
        return None
    if producer.graph is not bn_affine.y.producer().graph:
        # the producer lives in an enclosing graph: rewriting it would change that scope
        return f"producer {node_label(producer)} is in an enclosing graph"
    reason = FoldContext.sole_consumer(bn_affine.x)
    if reason is not None:
        return f"producer {node_label(producer)}: {reason}"
    return producer


class ConvBN(Pattern):
    action: ClassVar = Action.FOLDED_BACKWARD
    description: ClassVar = "Conv/ConvTranspose -> BN"

    def match(self, bn: ir.Node, bn_affine: BNAffine, ctx: FoldContext) -> Plan | str | None:
        conv = producer_guard(bn_affine, ("Conv", "ConvTranspose"))
        if conv is None or isinstance(conv, str):
            return conv
        transposed = conv.op_type == "ConvTranspose"  # case 1
        groups = attr_int(conv, "group", 1)
        w_in = conv.inputs[1] if len(conv.inputs) > 1 else None
        b_in = conv.inputs[2] if len(conv.inputs) > 2 else None
        weight = ctx.float_constant(w_in)
        if isinstance(weight, str):
            return f"{node_label(conv)}: weight is not a constant: {weight}"
        bias = ctx.float_constant(b_in) if b_in is not None else None
        if isinstance(bias, str):
            return f"{node_label(conv)}: bias is not a constant: {bias}"
        out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
        if out_channels != bn_affine.s.numel() or (transposed and weight.shape[0] % groups):
            return (
                f"{node_label(conv)}: {out_channels} output channels, BN has {bn_affine.s.numel()}"
            )
        w_new, b_new = fold_bn_into_producer(
            to_torch64(weight),
            None if bias is None else to_torch64(bias),
            bn_affine.s,
            bn_affine.t,
            groups=groups,
            transposed=transposed,
        )

        def apply() -> None:
            graph = conv.graph
            conv.replace_input_with(
                1, ctx.new_initializer(graph, w_in.name, from_torch(w_new, weight))
            )
            if len(conv.inputs) < 3:
                conv.resize_inputs(3)
            base = b_in.name if b_in is not None else f"{w_in.name}_bias"
            like = weight if bias is None else bias
            conv.replace_input_with(2, ctx.new_initializer(graph, base, from_torch(b_new, like)))
            ctx.release(w_in)
            ctx.release(b_in)
            ctx.bypass(bn, bn_affine.x)

        return Plan(targets=[conv.name or conv.outputs[0].name], apply=apply)


class GemmBN(Pattern):
    action: ClassVar = Action.FOLDED_BACKWARD
    description: ClassVar = "Gemm -> BN"

    def match(self, bn: ir.Node, bn_affine: BNAffine, ctx: FoldContext) -> Plan | str | None:
        gemm = producer_guard(bn_affine, ("Gemm",))
        if gemm is None or isinstance(gemm, str):
            return gemm
        b_in = gemm.inputs[1]
        c_in = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        b_arr = ctx.float_constant(b_in)
        if isinstance(b_arr, str) or b_arr.ndim != 2:
            why = b_arr if isinstance(b_arr, str) else f"rank {b_arr.ndim}"
            return f"{node_label(gemm)}: B is not a constant matrix: {why}"
        c_arr = ctx.float_constant(c_in) if c_in is not None else None
        if isinstance(c_arr, str):
            return f"{node_label(gemm)}: C is not a constant: {c_arr}"
        trans_b = attr_int(gemm, "transB", 0)
        weight = b_arr if trans_b else b_arr.T  # case 2: torch layout [out, in]
        if weight.shape[0] != bn_affine.s.numel():
            return f"{node_label(gemm)}: {weight.shape[0]} outputs, BN has {bn_affine.s.numel()}"
        beta = attr_float(gemm, "beta", 1.0)
        bias = None if c_arr is None else beta * to_torch64(c_arr)
        w_new, b_new = fold_bn_into_producer(to_torch64(weight), bias, bn_affine.s, bn_affine.t)
        b_out = from_torch(w_new, b_arr)
        b_out = b_out if trans_b else np.ascontiguousarray(b_out.T)

        def apply() -> None:
            graph = gemm.graph
            gemm.replace_input_with(1, ctx.new_initializer(graph, b_in.name, b_out))
            if len(gemm.inputs) < 3:
                gemm.resize_inputs(3)
            base = c_in.name if c_in is not None else f"{b_in.name}_bias"
            gemm.replace_input_with(2, ctx.new_initializer(graph, base, from_torch(b_new, b_arr)))
            gemm.attributes.pop("beta", None)
            ctx.release(b_in)
            ctx.release(c_in)
            ctx.bypass(bn, bn_affine.x)

        return Plan(targets=[gemm.name or gemm.outputs[0].name], apply=apply)


class MatMulBN(Pattern):
    action: ClassVar = Action.FOLDED_BACKWARD
    description: ClassVar = "MatMul(+Add) -> BN"

    def match(self, bn: ir.Node, bn_affine: BNAffine, ctx: FoldContext) -> Plan | str | None:
        head = producer_guard(bn_affine, ("MatMul", "Add", "Transpose"))
        if head is None or isinstance(head, str):
            return head
        transposes = []  # nearest the BN first
        while is_op(head, "Transpose"):
            reason = FoldContext.sole_consumer(head.inputs[0])
            if reason is not None:
                return f"{node_label(head)}: {reason}"
            transposes.append(head)
            head = head.inputs[0].producer()
        if not is_op(head, "MatMul", "Add"):
            return None  # Transposes of something else: no affine producer here
        if head.graph is not bn.graph:
            return f"producer {node_label(head)} is in an enclosing graph"
        produced = head.outputs[0]  # what the Transposes (or the BN) read
        add, matmul, c_in, c_arr = None, head, None, None
        if is_op(head, "Add"):  # case 3 with a bias: one Add input from a MatMul, one constant
            add = head
            for i, j in ((0, 1), (1, 0)):
                if (
                    is_op(add.inputs[i].producer(), "MatMul")
                    and ctx.float_const(add.inputs[j]) is not None
                ):
                    matmul, c_in = add.inputs[i].producer(), add.inputs[j]
                    break
            else:
                return None  # an Add that is not a Linear's bias: no affine producer here
            reason = FoldContext.sole_consumer(matmul.outputs[0])
            if reason is not None:
                return f"producer {node_label(matmul)}: {reason}"
            c_arr = ctx.float_const(c_in)
        b_in = matmul.inputs[1]
        b_arr = ctx.float_constant(b_in)
        if isinstance(b_arr, str) or b_arr.ndim != 2:
            why = b_arr if isinstance(b_arr, str) else f"rank {b_arr.ndim}"
            return f"{node_label(matmul)}: weight is not a constant matrix: {why}"
        axis = _feature_axis_at_bn(produced, matmul, transposes, ctx)
        if isinstance(axis, str):
            return axis
        if axis != 1:
            through = f", after {len(transposes)} Transpose(s)," if transposes else ""
            return (
                f"{node_label(matmul)}: output is rank {ctx.rank(produced) or '?'}; its features "
                f"(the last axis) are axis {axis} at the BN{through} and BN normalises axis 1"
            )
        if b_arr.shape[1] != bn_affine.s.numel():
            return f"{node_label(matmul)}: {b_arr.shape[1]} outputs, BN has {bn_affine.s.numel()}"
        bias = None if c_arr is None else to_torch64(c_arr)
        w_new, b_new = fold_bn_into_producer(to_torch64(b_arr.T), bias, bn_affine.s, bn_affine.t)
        b_out = np.ascontiguousarray(from_torch(w_new, b_arr).T)
        c_out = from_torch(b_new, b_arr if c_arr is None else c_arr)

        def apply() -> None:
            graph = matmul.graph
            matmul.replace_input_with(1, ctx.new_initializer(graph, b_in.name, b_out))
            ctx.release(b_in)
            if add is not None:
                add.replace_input_with(
                    add.inputs.index(c_in), ctx.new_initializer(graph, c_in.name, c_out)
                )
                ctx.release(c_in)
                ctx.bypass(bn, bn_affine.x)
                return
            if not c_out.any():  # zero shift: the MatMul alone is the fold
                ctx.bypass(bn, bn_affine.x)
                return
            shift = ctx.new_initializer(graph, f"{b_in.name}_bias", c_out)
            new_add = ir.Node(
                "",
                "Add",
                [matmul.outputs[0], shift],
                name=ctx.unique(f"{matmul.name or 'matmul'}_add"),
            )
            graph.insert_after(matmul, new_add)
            if not transposes:
                ctx.bypass(bn, new_add.outputs[0])
                return
            transposes[-1].replace_input_with(0, new_add.outputs[0])  # features still last
            ctx.bypass(bn, bn_affine.x)

        targets = [n.name or n.outputs[0].name for n in (matmul, add) if n is not None]
        return Plan(targets=targets, apply=apply)


def _feature_axis_at_bn(
    produced: ir.Value, matmul: ir.Node, transposes: list[ir.Node], ctx: FoldContext
) -> int | str:
    """The axis that the last axis of `produced` (the MatMul's features, after its bias Add)
    is at when it reaches the BN (case 3)."""
    rank = ctx.rank(produced)
    if rank is None and transposes:
        rank = len(attr_ints(transposes[-1], "perm")) or None
    if rank is None:
        return f"{node_label(matmul)}: output rank unknown, BN axis 1 may not be its features"
    axis = rank - 1
    for node in reversed(transposes):  # from the MatMul towards the BN
        perm = attr_ints(node, "perm") or list(reversed(range(rank)))  # no perm: reverse
        if sorted(perm) != list(range(rank)):
            return f"{node_label(node)}: perm {perm} is not a permutation of {rank} axes"
        axis = perm.index(axis)  # output axis i reads input axis perm[i]
    return axis
