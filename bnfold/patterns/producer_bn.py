"""Backward fold: affine layer -> BatchNorm, merged into the layer (W' = s*W, b' = s*b + t).

Cases, each a guard below:
1. The BN input must come from a stock Conv / ConvTranspose / Linear call.
2. That output must have no user but the BN: any other user needs the unnormalized values.
3. The BN must normalize the layer's output features. BN normalizes dim 1. A conv's output
   channels are dim 1 of its batched output; a Linear's features are the *last* dim, which is
   dim 1 only for a rank-2 output. This is proven from the propagated shapes, never assumed
   from module types (Linear -> BatchNorm1d on a [N, C, L] tensor normalizes C, not the
   Linear's features).
"""

from __future__ import annotations

from torch import nn

from bnfold.capture import AFFINE_TYPES, BNSite, is_shape_only, node_shape
from bnfold.numerics import bn_scale_shift, fold_bn_into_producer
from bnfold.patterns.base import FoldContext, Folded, Rejected, conv_is_transposed, describe

__all__ = ["fold_into_producer"]


def fold_into_producer(site: BNSite, ctx: FoldContext) -> Folded | Rejected:
    producer = site.input
    layer = ctx.module(producer)
    # case 1
    if not isinstance(layer, AFFINE_TYPES):
        return Rejected(f"its input comes from {describe(producer)}, not a Conv/Linear layer")
    # case 2
    others = [u for u in producer.users if u is not site.node and not is_shape_only(u)]
    if others:
        names = ", ".join(u.name for u in others)
        return Rejected(f"the output of '{producer.target}' is also used by {names}")
    # case 3
    shape = node_shape(producer)
    if shape is None:
        return Rejected(f"the output shape of '{producer.target}' is unknown")
    if isinstance(layer, nn.Linear):
        if len(shape) != 2:
            return Rejected(
                f"BN normalizes dim 1 of the rank-{len(shape)} output of Linear "
                f"'{producer.target}', whose features are its last dim"
            )
    elif len(shape) != layer.weight.dim():
        return Rejected(f"'{producer.target}' runs on an unbatched input (channels not on dim 1)")
    s, t = bn_scale_shift(site.running_mean, site.running_var, site.weight, site.bias, site.eps)
    if s.numel() != shape[1]:
        return Rejected(f"BN has {s.numel()} channels, the layer produces {shape[1]}")
    groups = getattr(layer, "groups", 1)
    weight, bias = fold_bn_into_producer(
        layer.weight, layer.bias, s, t, groups=groups, transposed=conv_is_transposed(layer)
    )
    target, notes = ctx.replace_layer(producer, weight, bias)
    ctx.remove_bn(site.node, producer)
    return Folded([target], notes)
