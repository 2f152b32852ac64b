"""Backward fold: affine layer -> BatchNorm, merged into the layer (W' = s*W, b' = s*b + t).

Cases, each a guard below:
1. The BN input must come from a stock Conv / ConvTranspose / Linear call.
2. That output must have no user but the BN: any other user needs the unnormalized values.
3. The BN must normalize the layer's output features. BN normalizes dim 1. A conv's output
   channels are dim 1 of its batched output; a Linear's features are the *last* dim, which is
   dim 1 only for a rank-2 output. This is proven from the propagated shapes, never assumed
   from module types (Linear -> BatchNorm1d on a [N, C, L] tensor normalizes C, not the
   Linear's features). A permute / transpose between a Linear and the BN may bring the
   features to dim 1: the axis is followed through it.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from bnfold.capture import AFFINE_TYPES, BNSite, is_shape_only, node_shape
from bnfold.numerics import bn_scale_shift, fold_bn_into_producer
from bnfold.patterns.base import FoldContext, Folded, Rejected, conv_is_transposed, describe

__all__ = ["fold_into_producer"]


_PERMUTES = {"permute", "transpose", "swapaxes"}


def _moved_axis(node: fx.Node, axis: int, rank: int) -> int | None:
    """Where a permute/transpose node moves input `axis` to, or None if it is not one."""
    if node.op == "call_method" and node.target in _PERMUTES:
        name, args = node.target, node.args[1:]
    elif node.op == "call_function" and node.target in (torch.permute, torch.transpose):
        name, args = node.target.__name__, node.args[1:]
    else:
        return None
    if node.kwargs or not all(isinstance(a, int) for a in _flat(args)):
        return None
    if name == "permute":
        order = [a % rank for a in _flat(args)]
        return order.index(axis % rank) if sorted(order) == list(range(rank)) else None
    a, b = (x % rank for x in args)
    return b if axis == a else a if axis == b else axis


def _flat(args) -> list:
    return list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else list(args)


def _through_permutes(site: BNSite, gm: fx.GraphModule) -> tuple[fx.Node, int] | None:
    """Walk back from the BN input through single-user permutes to a Linear: returns the
    Linear's node and the axis that its features (its last dim) end up on at the BN."""
    chain = []
    node = site.input
    while isinstance(node, fx.Node) and len([u for u in node.users if not is_shape_only(u)]) == 1:
        shape = node_shape(node.args[0]) if node.args else None
        if shape is None or _moved_axis(node, 0, len(shape)) is None:
            break
        chain.append((node, len(shape)))
        node = node.args[0]
    if not chain or node.op != "call_module":
        return None
    axis = len(node_shape(node) or ()) - 1
    for permute, rank in reversed(chain):
        axis = _moved_axis(permute, axis, rank)
    return node, axis


def fold_into_producer(site: BNSite, ctx: FoldContext) -> Folded | Rejected:
    producer = site.input
    layer = ctx.module(producer)
    permuted = _through_permutes(site, ctx.gm)
    if permuted is not None and isinstance(ctx.module(permuted[0]), nn.Linear):
        # Linear on [N, L, F] -> transpose(1, 2) -> BatchNorm1d(F): the features reach dim 1
        linear, axis = permuted
        if axis != 1:
            return Rejected(f"the features of Linear '{linear.target}' do not reach BN's dim 1")
        others = [u for u in linear.users if not is_shape_only(u)]
        if len(others) != 1:
            return Rejected(f"the output of '{linear.target}' has other users")
        layer = ctx.module(linear)
        s, t = bn_scale_shift(site.running_mean, site.running_var, site.weight, site.bias, site.eps)
        if s.numel() != layer.out_features:
            return Rejected(f"BN has {s.numel()} channels, the Linear {layer.out_features}")
        weight, bias = fold_bn_into_producer(layer.weight, layer.bias, s, t)
        target, notes = ctx.replace_layer(linear, weight, bias)
        ctx.remove_bn(site.node, site.input)
        return Folded([target], [*notes, "through a permute of the Linear's output"])
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
