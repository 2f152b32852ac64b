"""Precompute: a BatchNormalization whose input is a constant is itself a constant.

    y = s * x + t   per channel on axis 1, in float64, cast back to x's dtype

Weight standardization (timm's ScaledStdConv2d, NF-Nets) normalises a conv's *weight*: the
exporter writes it as a BatchNormalization over Reshape(W), with the weight's statistics
computed by ReduceMean nodes. The exporter folds such constants itself only below a size
limit, so larger weights (nf_resnet26's) reach the graph as BN over a constant. Its output
becomes an initializer (the graph's other constant nodes around it are onnxruntime's to fold
at load), as `bnfold.fold` precomputes the same BN in torch.

Cases, matched by the numbered comments below:

1. The input is a constant (``FoldContext.constant``); anything else is another pattern's.
2. It has at least 2 dims and axis 1 holds the BN's channels.
3. Its output is not a graph output (an initializer named after it takes its place).
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from bnfold.numerics import apply_bn
from bnfold.onnx.patterns.base import BNAffine, FoldContext, Pattern, Plan, from_torch, to_torch64
from bnfold.report import Action

__all__ = ["ConstantBN"]


class ConstantBN(Pattern):
    action: ClassVar = Action.PRECOMPUTED
    description: ClassVar = "its input is a constant: its output was computed once"

    def match(self, bn: ir.Node, bn_affine: BNAffine, ctx: FoldContext) -> Plan | str | None:
        x = ctx.float_constant(bn_affine.x)
        if isinstance(x, str):  # case 1
            return None
        channels = bn_affine.s.numel()
        if x.ndim < 2 or x.shape[1] != channels:  # case 2
            return f"constant input of shape {list(x.shape)}: axis 1 is not its {channels} channels"
        if bn_affine.y.is_graph_output():  # case 3
            return f"its output {bn_affine.y.name!r} is a graph output"
        y = from_torch(apply_bn(to_torch64(x), bn_affine.s, bn_affine.t), x)
        name = bn_affine.y.name or "bn_output"

        def apply() -> None:
            ctx.bypass(bn, ctx.new_initializer(bn.graph, name, y), keep_name=False)
            ctx.release(bn_affine.x)  # the Reshape of the weight, if nothing else reads it

        return Plan(targets=[name], apply=apply)
