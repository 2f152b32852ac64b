"""Forward fold: BatchNormalization followed only by affine consumers disappears into them.

    W (s * x + t) + b  =  (W s) x + (b + W t)

Cases, matched by the numbered comments below:

1. The BN output may pass through Identity and inference-mode Dropout on its way.
2. It may be flattened once to [N, C * block] by Flatten(axis=1) or a Reshape that keeps
   dimension 0: channel c then covers features [c * block, (c + 1) * block). The block follows
   from the consumer's input width K = C * block, which a valid graph guarantees for Flatten
   and Reshape([0, -1]); a Reshape([-1, K]) needs the BN input shape to prove it. allowzero=1
   changes nothing unless the target shape holds a 0.
3. Gemm (transA=0) and MatMul (constant 2-D B) read features on the last axis: exact when the
   tensor is 2-D there (flattened, or a 2-D BN input).
4. Conv reads channels on axis 1 (unflattened only); exact when it pads nothing (the padded
   zeros are not shifted by t), or when the shift t is exactly zero.
5. A Pad on the way (unflattened only; the exporter writes a Conv's padding_mode="reflect"
   or "replicate" as Pad -> Conv) keeps the fold exact when it leaves axis 1 alone and every
   value it adds is a copy of one in the same channel (mode reflect, edge, wrap), or, in
   constant mode, when it only crops or pads zeros and t is exactly zero.

The BN folds only when *every* consumer can absorb it; otherwise it stays with the first
reason found. No value on the way may be a graph output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import torch

from bnfold.numerics import channel_scale_for_features, fold_bn_into_consumer
from bnfold.onnx.patterns.base import (
    BNAffine,
    FoldContext,
    Pattern,
    Plan,
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    from_torch,
    is_op,
    node_label,
    prod,
    to_torch64,
)
from bnfold.report import Action

__all__ = ["BNConsumer"]


@dataclass
class _Leaf:
    node: ir.Node
    index: int  # which input of `node` carries the (possibly flattened) BN output
    flat: bool  # passed a Flatten / Reshape on the way


def _flatten_reason(node: ir.Node, ctx: FoldContext, bn_input: ir.Value) -> str | None:
    """Why a Flatten / Reshape does not keep channel blocks (case 2), or None if it does."""
    if is_op(node, "Flatten"):
        axis = attr_int(node, "axis", 1)
        return None if axis == 1 else f"{node_label(node)} has axis={axis}, not 1"
    in_shape = ctx.shape(node.inputs[0]) or ctx.shape(bn_input)
    shape = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if shape is None:  # computed target (Shape -> Concat): trust inferred shapes only
        out_shape = ctx.shape(node.outputs[0])
        if out_shape and len(out_shape) == 2 and in_shape and in_shape[0] is not None:
            if out_shape[0] == in_shape[0]:
                return None
        return f"{node_label(node)}: computed target shape, cannot prove it keeps the batch axis"
    if shape.ndim != 1 or len(shape) != 2:
        return f"{node_label(node)}: target shape is not of length 2"
    if attr_int(node, "allowzero", 0) and not shape.all():
        # allowzero=1 makes a 0 a dimension of size 0 instead of a copy; without a 0 it is
        # the same Reshape (the exporter writes allowzero=1 everywhere)
        return f"{node_label(node)}: allowzero=1 with a 0 in the target shape"
    if shape[0] == 0:  # copies dimension 0
        return None
    if in_shape is None or any(not isinstance(d, int) for d in in_shape[1:]):
        return f"{node_label(node)}: input shape unknown, cannot prove it keeps the batch axis"
    if shape[1] == prod(in_shape[1:]) or (isinstance(in_shape[0], int) and shape[0] == in_shape[0]):
        return None
    return f"{node_label(node)}: reshapes to {shape.tolist()}, which splits samples"


def _pad_reason(node: ir.Node, ctx: FoldContext, bn_affine: BNAffine) -> str | None:
    """Why a Pad between the BN and its consumers breaks the fold, or None if it keeps it
    exact (case 5)."""
    label = node_label(node)
    mode = attr_str(node, "mode", "constant")
    if len(node.inputs) > 1:  # opset >= 11: pads, constant_value and axes are inputs
        inputs = [*node.inputs[1:], None, None][:3]
        arrays = [None if v is None else ctx.const(v) for v in inputs]
        missing = [v is not None and a is None for v, a in zip(inputs, arrays, strict=True)]
        if arrays[0] is None or any(missing):
            return f"{label}: its pads, value or axes are not constants"
        pads, value, axes = arrays
    else:
        pads, value, axes = np.array(attr_ints(node, "pads")), attr_float(node, "value", 0.0), None
    pads = np.asarray(pads).reshape(-1)
    value = np.zeros(()) if value is None else value
    if axes is None:
        axes = np.arange(len(pads) // 2)
    if len(pads) != 2 * len(axes):
        return f"{label}: {len(pads)} pads for {len(axes)} axes"
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if any(a < 0 for a in axes):
        rank = ctx.rank(bn_affine.x)
        if rank is None:
            return f"{label}: negative axes and the input rank is unknown"
        axes = [a % rank for a in axes]
    if 1 in axes and (pads[axes.index(1)] or pads[axes.index(1) + len(axes)]):
        return f"{label} pads the channel axis"
    if mode in ("reflect", "edge", "wrap") or not (pads > 0).any():
        return None  # every value it writes is one of the channel's own, or it only crops
    if mode != "constant":
        return f"{label}: unknown mode {mode!r}"
    if np.asarray(value).any() or bool(bn_affine.t.any()):
        return f"{label} pads a constant and BN shift is nonzero: not exact at the borders"
    return None


def dropout_reason(node: ir.Node, ctx: FoldContext) -> str | None:
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return f"{node_label(node)}: its mask output is used"
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        training = ctx.const(node.inputs[2])
        if training is None or bool(training.any()):
            return f"{node_label(node)}: training_mode may be true"
    return None


def _collect(
    value: ir.Value, flat: bool, ctx: FoldContext, bn_affine: BNAffine
) -> list[_Leaf] | str:
    """Walk from the BN output to the layers that read it (cases 1, 2, 5)."""
    if value.is_graph_output():
        return f"{value.name!r} is a graph output"
    if not value.uses():
        return f"{value.name!r} has no consumers"
    leaves: list[_Leaf] = []
    for node, index in value.uses():
        if node.graph is not value.graph:
            return f"read by {node_label(node)} inside a subgraph"
        if is_op(node, "Identity", "Dropout") and index == 0:
            reason = dropout_reason(node, ctx) if node.op_type == "Dropout" else None
            found = reason or _collect(node.outputs[0], flat, ctx, bn_affine)
        elif is_op(node, "Flatten", "Reshape") and index == 0:
            found = _flatten_reason(node, ctx, bn_affine.x) or _collect(
                node.outputs[0], True, ctx, bn_affine
            )
        elif is_op(node, "Pad") and index == 0 and not flat:
            found = _pad_reason(node, ctx, bn_affine) or _collect(
                node.outputs[0], flat, ctx, bn_affine
            )
        elif is_op(node, "Gemm", "MatMul", "Conv"):
            found = [_Leaf(node, index, flat)]
        else:
            found = f"feeds {node_label(node)}, which cannot absorb it"
        if isinstance(found, str):
            return found
        leaves.extend(found)
    return leaves


@dataclass
class _Edit:
    node: ir.Node
    weight_index: int
    weight: np.ndarray  # new weight in the node's own layout
    bias: np.ndarray | None  # new bias (None: the node needs no bias change)
    drop_beta: bool = False


def _feature_block(leaf: _Leaf, k: int, bn_affine: BNAffine, ctx: FoldContext) -> int | str:
    """Features per BN channel as `leaf` reads them on its last axis (cases 2, 3)."""
    c = bn_affine.s.numel()
    if not leaf.flat:
        rank = ctx.rank(bn_affine.x) if leaf.node.op_type == "MatMul" else 2  # Gemm input is 2-D
        if rank is None:
            return f"{node_label(leaf.node)}: input rank unknown, BN axis 1 may not be its features"
        if rank != 2:
            return (
                f"{node_label(leaf.node)}: input is rank {rank}; BN axis 1 is not its feature axis"
            )
        return 1 if k == c else f"{node_label(leaf.node)}: reads {k} features, BN has {c} channels"
    if k % c:
        return f"{node_label(leaf.node)}: {k} features do not split into {c} channel blocks"
    in_shape = ctx.shape(bn_affine.x)
    if in_shape is not None and all(isinstance(d, int) for d in in_shape[1:]):
        if prod(in_shape[1:]) != k:
            flat_width = prod(in_shape[1:])
            return (
                f"{node_label(leaf.node)}: reads {k} features, flattened BN output has {flat_width}"
            )
    return k // c


def _plan_linear(leaf: _Leaf, bn_affine: BNAffine, ctx: FoldContext) -> _Edit | str:
    node = leaf.node
    if leaf.index != 0 or (node.op_type == "Gemm" and attr_int(node, "transA", 0)):
        return f"{node_label(node)}: BN output is not its row-major data input"
    b_arr = ctx.float_constant(node.inputs[1])
    if isinstance(b_arr, str) or b_arr.ndim != 2:
        why = b_arr if isinstance(b_arr, str) else f"rank {b_arr.ndim}"
        return f"{node_label(node)}: weight is not a constant matrix: {why}"
    trans_b = node.op_type == "Gemm" and attr_int(node, "transB", 0)
    weight = b_arr if trans_b else b_arr.T  # torch layout [out, in]
    block = _feature_block(leaf, weight.shape[1], bn_affine, ctx)
    if isinstance(block, str):
        return block
    s = channel_scale_for_features(bn_affine.s, block)
    t = channel_scale_for_features(bn_affine.t, block)
    w_new, shift = fold_bn_into_consumer(to_torch64(weight), None, s, t)
    w_out = from_torch(w_new, b_arr)
    w_out = w_out if trans_b else np.ascontiguousarray(w_out.T)
    if node.op_type == "MatMul":
        return _Edit(node, 1, w_out, from_torch(shift, b_arr))
    alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
    c_in = node.inputs[2] if len(node.inputs) > 2 else None
    c_arr = ctx.float_constant(c_in) if c_in is not None else None
    if isinstance(c_arr, str):
        return f"{node_label(node)}: C is not a constant: {c_arr}"
    c64 = torch.zeros(1, dtype=torch.float64) if c_arr is None else to_torch64(c_arr)
    # alpha scales A·B, so the shift W t is scaled too; beta is absorbed into C
    return _Edit(node, 1, w_out, from_torch(beta * c64 + alpha * shift, b_arr), drop_beta=True)


def _plan_conv(leaf: _Leaf, bn_affine: BNAffine, ctx: FoldContext) -> _Edit | str:
    node = leaf.node
    if leaf.flat or leaf.index != 0:
        return f"{node_label(node)}: BN output is not its unflattened data input"
    weight = ctx.float_constant(node.inputs[1])
    if isinstance(weight, str):
        return f"{node_label(node)}: weight is not a constant: {weight}"
    b_in = node.inputs[2] if len(node.inputs) > 2 else None
    bias = ctx.float_constant(b_in) if b_in is not None else None
    if isinstance(bias, str):
        return f"{node_label(node)}: bias is not a constant: {bias}"
    groups = attr_int(node, "group", 1)
    if weight.shape[1] * groups != bn_affine.s.numel():
        channels = weight.shape[1] * groups
        return f"{node_label(node)}: reads {channels} channels, BN has {bn_affine.s.numel()}"
    pads = attr_ints(node, "pads")
    padded = any(pads) or attr_str(node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")
    if padded and bool(bn_affine.t.any()):  # case 4
        return f"{node_label(node)} zero-pads and BN shift is nonzero: not exact at the borders"
    w_new, b_new = fold_bn_into_consumer(
        to_torch64(weight),
        None if bias is None else to_torch64(bias),
        bn_affine.s,
        bn_affine.t,
        groups=groups,
    )
    return _Edit(
        node, 1, from_torch(w_new, weight), from_torch(b_new, weight if bias is None else bias)
    )


class BNConsumer(Pattern):
    action: ClassVar = Action.FOLDED_FORWARD
    description: ClassVar = "BN -> Gemm/MatMul/Conv"

    def match(self, bn: ir.Node, bn_affine: BNAffine, ctx: FoldContext) -> Plan | str | None:
        leaves = _collect(bn_affine.y, False, ctx, bn_affine)
        if isinstance(leaves, str):
            return leaves
        edits: list[_Edit] = []
        for leaf in leaves:
            plan = _plan_conv if leaf.node.op_type == "Conv" else _plan_linear
            edit = plan(leaf, bn_affine, ctx)
            if isinstance(edit, str):
                return edit
            edits.append(edit)

        def apply() -> None:
            for edit in edits:
                _apply_edit(edit, ctx)
            ctx.bypass(bn, bn_affine.x, keep_name=False)  # x keeps its name: y was internal

        return Plan(targets=[e.node.name or e.node.outputs[0].name for e in edits], apply=apply)


def _apply_edit(edit: _Edit, ctx: FoldContext) -> None:
    node, graph = edit.node, edit.node.graph
    w_in = node.inputs[edit.weight_index]
    node.replace_input_with(edit.weight_index, ctx.new_initializer(graph, w_in.name, edit.weight))
    ctx.release(w_in)
    if node.op_type == "MatMul":
        _add_after_matmul(node, edit.bias, ctx)
        return
    b_in = node.inputs[2] if len(node.inputs) > 2 else None
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    base = b_in.name if b_in is not None else f"{w_in.name}_bias"
    node.replace_input_with(2, ctx.new_initializer(graph, base, edit.bias))
    ctx.release(b_in)
    if edit.drop_beta:
        node.attributes.pop("beta", None)


def _add_after_matmul(matmul: ir.Node, shift: np.ndarray, ctx: FoldContext) -> None:
    """MatMul has no bias: fold the shift into a following constant Add, or add one."""
    if not shift.any():
        return
    out = matmul.outputs[0]
    uses = out.uses()
    if len(uses) == 1 and not out.is_graph_output() and is_op(uses[0].node, "Add"):
        add = uses[0].node
        other = 1 - uses[0].idx
        c_arr = ctx.float_const(add.inputs[other])
        if c_arr is not None and c_arr.ndim <= 1:
            c_in = add.inputs[other]
            new_c = (c_arr.astype(np.float64) + shift.astype(np.float64)).astype(c_arr.dtype)
            add.replace_input_with(other, ctx.new_initializer(add.graph, c_in.name, new_c))
            ctx.release(c_in)
            return
    shift_value = ctx.new_initializer(matmul.graph, f"{matmul.inputs[1].name}_shift", shift)
    new_add = ir.Node(
        "", "Add", [out, shift_value], name=ctx.unique(f"{matmul.name or 'matmul'}_add")
    )
    name, shape, type_ = out.name, out.shape, out.type
    out.replace_all_uses_with(new_add.outputs[0], replace_graph_outputs=True)
    new_add.replace_input_with(0, out)  # replace_all_uses_with rewired the Add's own input too
    matmul.graph.insert_after(matmul, new_add)
    out.name = ctx.unique(f"{name}_matmul")
    new_add.outputs[0].name, new_add.outputs[0].shape, new_add.outputs[0].type = name, shape, type_
