"""Compose sequential affine layers with nothing nonlinear between them, when it is cheaper.

A forward fold can leave Linear -> Linear (the BN between them is gone); a 1x1 conv can feed
a conv directly. Two affine maps compose into one:

* Linear(W1, b1) -> Linear(W2, b2):  W = W2 W1,  b = W2 b1 + b2
* Conv1x1(W1, b1) -> Conv(W2, b2):   W[o, i, k] = sum_m W2[o, m, k] W1[m, i],
                                     b = b2 + sum_{m, k} W2[o, m, k] b1[m]

Cases, each a guard below:
1. The first layer's output has no other user (eval identities between are allowed).
2. Linear -> Linear: both on the last dim (any rank); no guard on shapes beyond that.
3. 1x1 conv -> conv: the 1x1 has stride 1, no padding, groups 1, dilation 1, and the second
   conv groups 1. The second conv's zero padding pads the 1x1's *output* with zeros; the
   composed conv pads x with zeros, which the 1x1 would have mapped to b1. Exact when the
   second conv has no zero padding or b1 is exactly zero.
4. Only when the composed layer needs fewer multiply-adds per output than the two did.
"""

from __future__ import annotations

import copy
import math

from torch import fx, nn

from bnfold.capture import fetch_attr, free_name, is_shape_only
from bnfold.numerics import compose_conv1x1_then_conv, compose_linear
from bnfold.patterns.bn_consumer import is_eval_identity
from bnfold.report import ComposeEntry

__all__ = ["compose_affine"]


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_shape_only(u)]


def _stock(gm: fx.GraphModule, node: fx.Node, types: tuple) -> nn.Module | None:
    if node.op != "call_module":
        return None
    m = fetch_attr(gm, str(node.target))
    return m if type(m) in types else None


def _producer(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node]]:
    """The node feeding `node`'s input through eval identities, and those identities."""
    between = []
    prev = node.args[0]
    while isinstance(prev, fx.Node) and is_eval_identity(prev, gm) and len(_users(prev)) == 1:
        between.append(prev)
        prev = prev.args[0]
    return prev, between


def _linear_pair(first: nn.Linear, second: nn.Linear):
    weight, bias = compose_linear(first.weight, first.bias, second.weight, second.bias)
    return weight, bias, first.weight.numel() + second.weight.numel(), weight.numel()


def _conv_pair(first: nn.Module, second: nn.Module) -> tuple | str:
    plain = (
        all(k == 1 for k in first.kernel_size)
        and all(s == 1 for s in first.stride)
        and not isinstance(first.padding, str)
        and all(p == 0 for p in first.padding)
    )
    if not plain:
        return f"'{first}' is not a plain 1x1 conv"
    if first.groups != 1 or second.groups != 1 or any(d != 1 for d in first.dilation):
        return "grouped or dilated 1x1"
    zero_pad = isinstance(second.padding, str) or any(p != 0 for p in second.padding)
    b1 = first.bias
    if zero_pad and second.padding_mode == "zeros" and b1 is not None and bool(b1.any()):
        return "the second conv pads with zeros and the 1x1 has a bias: inexact at the borders"
    weight, bias = compose_conv1x1_then_conv(first.weight, b1, second.weight, second.bias)
    k = math.prod(second.kernel_size)
    mid, cin, cout = first.out_channels, first.in_channels, second.out_channels
    return weight, bias, cin * mid + mid * cout * k, cin * cout * k


def _try(node: fx.Node, gm: fx.GraphModule) -> tuple[ComposeEntry, callable | None] | None:
    second = _stock(gm, node, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if second is None:
        return None
    prev, between = _producer(node, gm)
    first = _stock(gm, prev, (type(second),)) if isinstance(prev, fx.Node) else None
    if first is None:
        return None
    entry = ComposeEntry(name=node.name, layers=[str(prev.target), str(node.target)])
    if any(len(n.users) != 1 for n in [prev, *between]):
        entry.reason = f"the output of '{prev.target}' has other users"
        return entry, None
    pair = (
        _linear_pair(first, second) if isinstance(second, nn.Linear) else _conv_pair(first, second)
    )
    if isinstance(pair, str):
        entry.reason = pair
        return entry, None
    weight, bias, entry.macs_before, entry.macs_after = pair
    if entry.macs_after >= entry.macs_before:
        entry.reason = "composing would not reduce the multiply-adds"
        return entry, None

    def apply() -> str:
        new = copy.deepcopy(second)
        if isinstance(new, nn.Linear):
            new.in_features = first.in_features
        else:
            new.in_channels = first.in_channels
        dtype = second.weight.dtype
        new.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        new.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        name = free_name(gm, f"{node.target}_composed")
        gm.add_submodule(name, new)
        node.target = name
        node.args = (prev.args[0], *node.args[1:])
        for n in [*between, prev]:  # each had exactly one user, the next in this chain
            gm.graph.erase_node(n)
        return name

    return entry, apply


def compose_affine(gm: fx.GraphModule) -> list[ComposeEntry]:
    """Compose every cheaper pair, in place, to a fixpoint; one entry per candidate pair."""
    entries: list[ComposeEntry] = []
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            outcome = _try(node, gm)
            if outcome is None:
                continue
            entry, apply = outcome
            if apply is None:
                if all(e.name != entry.name for e in entries):
                    entries.append(entry)
                continue
            entry.into = apply()
            entries.append(entry)
            changed = True
            break
    return entries
