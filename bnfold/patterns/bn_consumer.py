"""Forward fold: BatchNorm -> affine layer(s), merged into the consumers
(W' = W * s[in], b' = b + W t[in]). Used when the BN has no foldable producer, e.g. when it
comes after the activation (Linear -> LeakyReLU -> BatchNorm1d -> Linear).

Cases, each a guard below:
1. Every user of the BN output must reach a stock Linear or Conv through nothing but
   eval-mode identities (Dropout, Identity) and at most one flatten.
2. A flatten must keep channel blocks: [N, C, *rest] -> [N, C * prod(rest)], so channel c
   covers the features [c * block, (c + 1) * block) of the Linear.
3. Without a flatten, a Linear reads the last dim; BN normalizes dim 1. Only a rank-2 tensor
   has them equal.
4. A Conv consumer is exact only if every input element it reads is a BN output. Zero
   padding reads zeros that the BN would have shifted to t: exact when there is no zero
   padding (padding 0, or reflect/replicate/circular) or when t is exactly 0.
4a. The same holds for a padding module or `F.pad` on the way (before the flatten, if any):
   reflect, replicate and circular copy values of the same channel, a crop drops some, and
   constant padding is exact only with value 0 and t exactly 0. Padding dim 0 or 1 (the
   batch or the channel axis) is refused.
5. A transposed conv adds t's contribution a different number of times at the borders: kept.
6. The BN input must not be written in place by another user, since the consumers now read
   it directly and would see the new values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnfold.capture import BNSite, fetch_attr, is_inplace, is_shape_only, node_shape
from bnfold.numerics import bn_scale_shift, channel_scale_for_features, fold_bn_into_consumer
from bnfold.patterns.base import FoldContext, Folded, Rejected, conv_is_transposed, describe

__all__ = ["fold_into_consumers", "is_eval_identity"]

_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout, nn.Identity)  # fmt: skip
# functional dropouts, with the default of their `training` argument (the third)
_DROPOUT_FUNCTIONS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
                      F.alpha_dropout: False, F.feature_alpha_dropout: False}  # fmt: skip
# methods that return their input's values (a copy or the tensor itself) when called bare
_VALUE_METHODS = {"contiguous", "clone", "detach"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


def is_eval_identity(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node returns its first argument's values unchanged in eval mode."""
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        return isinstance(m, _IDENTITY_MODULES) and (not m.training or isinstance(m, nn.Identity))
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        default = _DROPOUT_FUNCTIONS[node.target]
        return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else default) is False
    if node.op == "call_method" and node.target in _VALUE_METHODS:
        return len(node.args) == 1 and not node.kwargs
    return False


def _is_flatten_call(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(fetch_attr(gm, str(node.target)), nn.Flatten)
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.reshape)
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


# padding modules by mode; the constant ones (ZeroPad, ConstantPad) carry `value`
_PAD_MODULES = {
    nn.modules.padding._ReflectionPadNd: "reflect",
    nn.modules.padding._ReplicationPadNd: "replicate",
    nn.modules.padding._ConstantPadNd: "constant",
}
if hasattr(nn.modules.padding, "_CircularPadNd"):
    _PAD_MODULES[nn.modules.padding._CircularPadNd] = "circular"


def _padding(node: fx.Node, gm: fx.GraphModule) -> tuple[tuple, str, float] | None:
    """(widths in F.pad's order, mode, value) of a padding module or F.pad call, else None."""
    if node.op == "call_module":
        m = fetch_attr(gm, str(node.target))
        for cls, mode in _PAD_MODULES.items():
            if isinstance(m, cls):
                return tuple(m.padding), mode, float(getattr(m, "value", 0.0))
        return None
    if node.op != "call_function" or node.target is not F.pad:
        return None
    args = dict(zip(("input", "pad", "mode", "value"), node.args, strict=False)) | node.kwargs
    mode, value = args.get("mode", "constant"), args.get("value")
    return tuple(args.get("pad", ())), mode, 0.0 if value is None else value


def _pad_reason(node: fx.Node, pad: tuple[tuple, str, float], rank: int) -> str | None:
    """Why a padding on the way breaks the fold, or None (case 4a; the t == 0 condition of
    constant padding is checked by the caller)."""
    widths, mode, value = pad
    if not all(isinstance(w, int) for w in widths) or not isinstance(value, int | float):
        return f"{describe(node)} pads by values that are not constants"
    for j in range(len(widths) // 2):  # F.pad's order: the last dim first
        if rank - 1 - j <= 1 and (widths[2 * j] or widths[2 * j + 1]):
            return f"{describe(node)} pads the batch or channel axis"
    if mode == "constant" and value != 0 and any(w > 0 for w in widths):
        return f"{describe(node)} pads with {value}: the BN would have shifted those values"
    if mode not in ("constant", "reflect", "replicate", "circular"):
        return f"{describe(node)} pads in mode {mode!r}"
    return None


def _channel_block(before: tuple[int, ...], after: tuple[int, ...] | None) -> int | None:
    """Features per channel if `after` is `before` flattened from dim 1 on, else None."""
    if after is None or len(before) < 3 or len(after) != 2 or after[0] != before[0]:
        return None
    block = math.prod(before[2:])
    return block if after[1] == before[1] * block else None


def _route(start: fx.Node, bn_shape: tuple[int, ...], gm: fx.GraphModule):
    """Walk from a BN user to its consumer. Returns (consumer node, block, via_flatten,
    zero-padded on the way) or a rejection reason."""
    node, block, flattened, zero_padded = start, 1, False, False
    while True:
        pad = _padding(node, gm)
        if is_eval_identity(node, gm) or _is_flatten_call(node, gm) or pad is not None:
            if pad is not None:  # case 4a
                if flattened:
                    return f"{describe(node)} pads a flattened BN output"
                reason = _pad_reason(node, pad, len(bn_shape))
                if reason is not None:
                    return reason
                zero_padded |= pad[1] == "constant" and any(w > 0 for w in pad[0])
            elif _is_flatten_call(node, gm):
                if flattened:
                    return f"{describe(node)} reshapes the features a second time"
                b = _channel_block(bn_shape, node_shape(node))
                if b is None:
                    return f"{describe(node)} does not keep channel blocks together"
                block, flattened = b, True
            if len(node.users) != 1:
                return f"{describe(node)} has {len(node.users)} users"
            node = next(iter(node.users))
            continue
        return node, block, flattened, zero_padded


def _conv_reject(layer: nn.Module, t: torch.Tensor, name: str) -> str | None:
    if conv_is_transposed(layer):
        return f"consumer '{name}' is a transposed conv: the shift is not uniform at the borders"
    padding = layer.padding
    if isinstance(padding, str):
        zero_pad = padding == "valid" or all(k == 1 for k in layer.kernel_size)
    else:
        zero_pad = all(p == 0 for p in padding)
    if zero_pad or layer.padding_mode != "zeros" or bool(torch.all(t == 0)):
        return None
    return (
        f"consumer conv '{name}' pads with zeros (padding={layer.padding}): the padded border "
        "would not be shifted by the BN, so folding would be inexact at the borders"
    )


def fold_into_consumers(site: BNSite, ctx: FoldContext) -> Folded | Rejected:
    bn = site.node
    bn_shape = node_shape(bn)
    if bn_shape is None or len(bn_shape) < 2:
        return Rejected("its output shape is unknown")
    if all(is_shape_only(u) for u in bn.users):
        return Rejected("its output is not used")
    # case 6
    writers = [u.name for u in site.input.users if u is not bn and is_inplace(u, ctx.gm)]
    if writers:
        return Rejected(f"its input is modified in place by {', '.join(writers)}")
    s, t = bn_scale_shift(site.running_mean, site.running_var, site.weight, site.bias, site.eps)
    plans = []
    for user in list(bn.users):
        if is_shape_only(user):
            continue
        # case 1, 2
        route = _route(user, bn_shape, ctx.gm)
        if isinstance(route, str):
            return Rejected(route)
        consumer, block, flattened, zero_padded = route
        if zero_padded and not bool(torch.all(t == 0)):  # case 4a
            return Rejected(
                f"a zero padding before {describe(consumer)} would not be shifted by the BN: "
                "folding would be inexact at the borders"
            )
        layer = ctx.module(consumer)
        if not isinstance(layer, nn.Linear | nn.modules.conv._ConvNd):
            return Rejected(f"its output goes to {describe(consumer)}, not a Linear/Conv layer")
        if isinstance(layer, nn.Linear):
            in_shape = node_shape(consumer.args[0])
            # case 3
            if not flattened and len(bn_shape) != 2:
                return Rejected(
                    f"Linear '{consumer.target}' reads the last dim of a rank-{len(bn_shape)} "
                    "tensor; BN normalizes dim 1"
                )
            if in_shape is None or len(in_shape) != 2 or in_shape[1] != s.numel() * block:
                return Rejected(f"Linear '{consumer.target}' input does not match BN channels")
            plans.append((consumer, layer, block))
        else:
            if flattened:
                return Rejected(f"conv '{consumer.target}' reads a flattened BN output")
            # case 4, 5
            reason = _conv_reject(layer, t, str(consumer.target))
            if reason:
                return Rejected(reason)
            plans.append((consumer, layer, 1))
    targets, notes = [], []
    for consumer, layer, block in plans:
        s_in = channel_scale_for_features(s, block)
        t_in = channel_scale_for_features(t, block)
        weight, bias = fold_bn_into_consumer(
            layer.weight, layer.bias, s_in, t_in, groups=getattr(layer, "groups", 1)
        )
        target, layer_notes = ctx.replace_layer(consumer, weight, bias)
        targets.append(target)
        notes += layer_notes
    ctx.remove_bn(bn, site.input)
    return Folded(targets, notes)
