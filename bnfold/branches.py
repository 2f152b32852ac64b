"""Structural reparameterization: merge parallel affine branches of one input into one conv.

After BN folding, RepVGG / MobileOne / ACNet blocks compute a sum of branches of the same
input x: convs with the same stride, dilation and groups (kernel sizes may differ), a BN that
stayed because it has no producer (the identity branch, y = s*x + t), x itself, each possibly
behind eval-mode identities (Dropout, Identity, DropPath at 0). Every branch is a conv:

* a conv of kernel k and padding p reads input o*stride - p + j*dilation; placed at offset
  J0 = (P - p) / dilation inside a kernel of size K with padding P = max p, it reads the same
  positions, and its zeros multiply the extra padded border: exact;
* a BN branch is a 1x1 kernel holding s on the diagonal of each group, with bias t;
* x itself is that kernel with s = 1, t = 0.

Cases, each a guard below:
1. Only a sum (add, or the in-place += of the blocks) of at least two branches, one a conv.
2. Every branch reads the same input x, and every intermediate result has no other user.
3. Convs share stride, dilation, groups and output channels; zero padding mode only.
4. Paddings line up: 2P - d(K-1) == 2p - d(k-1) in every dim (same output size), J0 integral.
5. A BN / identity branch needs stride 1 and as many output as input channels.
6. The merged conv must not cost more multiply-adds per output than the branches did.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from bnfold.capture import BNSite, bn_site, fetch_attr, free_name, is_shape_only, node_shape
from bnfold.numerics import (
    bn_scale_shift,
    branch_sum_macs,
    merge_branch_kernels,
    merged_kernel_layout,
)
from bnfold.patterns.bn_consumer import is_eval_identity
from bnfold.report import MergeEntry

__all__ = ["merge_branches"]

_ADDS = {operator.add, operator.iadd, torch.add}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class _Branch:
    label: str
    conv: nn.modules.conv._ConvNd | None = None
    scale: Tensor | None = None  # BN / identity branch: per-channel s (float64)
    shift: Tensor | None = None


def _users(node: fx.Node) -> list[fx.Node]:
    """Users that read values (a shape read does not care which node computes the sum)."""
    return [u for u in node.users if not is_shape_only(u)]


def _is_add(node: fx.Node) -> bool:
    return (
        node.op == "call_function"
        and node.target in _ADDS
        and len(node.args) == 2
        and not node.kwargs
        and any(isinstance(a, fx.Node) for a in node.args)
        # a literal 0 is an absent branch (MobileOne without a scale branch: 0 + conv(x))
        and all(isinstance(a, fx.Node) or (type(a) in (int, float) and a == 0) for a in node.args)
    )


def _sum_terms(root: fx.Node, gm: fx.GraphModule) -> tuple[list[fx.Node], list[fx.Node]]:
    """The terms of a sum tree under `root` and the interior nodes (adds, identities)."""
    terms, interior = [], [root]
    stack = [a for a in root.args if isinstance(a, fx.Node)]
    while stack:
        node = stack.pop()
        while is_eval_identity(node, gm) and len(_users(node)) == 1:
            interior.append(node)
            node = node.args[0]
        if _is_add(node) and len(_users(node)) == 1:
            interior.append(node)
            stack.extend(a for a in node.args if isinstance(a, fx.Node))
        else:
            terms.append(node)
    return terms, interior


def _branch(term: fx.Node, gm: fx.GraphModule) -> tuple[_Branch, fx.Node] | str:
    """Describe one term as a branch of its input, or say why it is not one."""
    if term.op == "call_module":
        m = fetch_attr(gm, str(term.target))
        if type(m) in _CONVS:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                return f"'{term.target}' pads with mode {m.padding_mode!r} / {m.padding!r}"
            return _Branch(str(term.target), conv=m), term.args[0]
    site: BNSite | None = bn_site(term, gm)
    if site is not None:
        if site.foldable_reason:
            return f"BN '{term.name}' {site.foldable_reason}"
        s, t = bn_scale_shift(site.running_mean, site.running_var, site.weight, site.bias, site.eps)
        return _Branch(term.name, scale=s, shift=t), site.input
    return f"{term.op} '{term.name}' is not a conv, a BN or the shared input"


def _layout(branches: list[_Branch], dims: int, dilation: tuple[int, ...]):
    kernels = [b.conv.kernel_size if b.conv is not None else (1,) * dims for b in branches]
    pads = [tuple(b.conv.padding) if b.conv is not None else (0,) * dims for b in branches]
    return merged_kernel_layout(kernels, pads, pads, dilation)


def _branch_tensors(b: _Branch):
    if b.conv is not None:
        return b.conv.weight, b.conv.bias, None
    return None, b.shift, b.scale


def _macs(branches: list[_Branch], in_per_group: int, out_ch: int) -> int:
    kernels = [tuple(b.conv.kernel_size) if b.conv is not None else None for b in branches]
    return branch_sum_macs(kernels, [b.scale is not None for b in branches], in_per_group, out_ch)


def _try_merge(root: fx.Node, gm: fx.GraphModule) -> tuple[MergeEntry, callable | None] | None:
    terms, interior = _sum_terms(root, gm)
    if len(terms) < 2:
        return None
    raw = [_branch(term, gm) for term in terms]
    read = [d[1] for d in raw if not isinstance(d, str)]
    # a term that another branch reads is the identity branch (x itself)
    identity = {t for t in terms if t in read}
    if max((read.count(x) + (x in identity) for x in set(read)), default=0) < 2:
        return None  # not parallel branches of one input (a residual add, say): not a candidate
    described: list[_Branch | str | None] = []
    inputs = set()
    for term, d in zip(terms, raw, strict=True):
        if term in identity:
            described.append(_Branch("identity"))
            inputs.add(term)
        elif len(_users(term)) != 1:
            described.append(None)
        elif isinstance(d, str):
            described.append(d)
        else:
            described.append(d[0])
            inputs.add(d[1])
    convs = [b for b in described if isinstance(b, _Branch) and b.conv is not None]
    if not convs:
        return None  # not a reparameterizable block: say nothing about ordinary adds
    labels = [b.label if isinstance(b, _Branch) else "?" for b in described]
    entry = MergeEntry(name=root.name, branches=labels)
    problems = [d for d in described if isinstance(d, str)]
    if any(d is None for d in described):
        problems.append("a branch's output has other users")
    if len(inputs) != 1:
        problems.append("the branches do not all read the same input")
    if problems:
        entry.reason = problems[0]
        return entry, None
    branches: list[_Branch] = described
    first = convs[0].conv
    dims = len(first.kernel_size)
    for b in convs:
        c = b.conv
        same = (c.stride, c.dilation, c.groups, c.out_channels, c.in_channels) == (
            first.stride, first.dilation, first.groups, first.out_channels, first.in_channels
        )  # fmt: skip
        if not same:
            entry.reason = f"'{b.label}' differs from '{convs[0].label}' in stride, dilation, "
            entry.reason += "groups or channels"
            return entry, None
    if any(b.conv is None for b in branches):
        if any(s != 1 for s in first.stride) or first.in_channels != first.out_channels:
            entry.reason = "an identity/BN branch needs stride 1 and equal in/out channels"
            return entry, None
    layout = _layout(branches, dims, first.dilation)
    if isinstance(layout, str):
        entry.reason = layout
        return entry, None
    size, pad = layout.size, layout.pad_begin
    in_per_group = first.in_channels // first.groups
    entry.macs_before = _macs(branches, in_per_group, first.out_channels)
    entry.macs_after = math.prod(size) * in_per_group * first.out_channels
    if entry.macs_after > entry.macs_before:
        entry.reason = (
            f"the merged {tuple(size)} kernel costs {entry.macs_after} multiply-adds per output, "
            f"the branches {entry.macs_before}"
        )
        return entry, None
    x = next(iter(inputs))
    shape = node_shape(root)
    if shape is None or node_shape(x) is None or shape[1] != first.out_channels:
        entry.reason = "shapes unknown"
        return entry, None

    def apply() -> str:
        weight, bias = merge_branch_kernels(
            layout, first.out_channels, in_per_group, [_branch_tensors(b) for b in branches]
        )
        merged = type(first)(
            first.in_channels, first.out_channels, tuple(size), stride=first.stride,
            padding=tuple(pad), dilation=first.dilation, groups=first.groups, bias=True,
        )  # fmt: skip
        dtype = first.weight.dtype
        merged.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        merged.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        merged = merged.to(first.weight.device)
        name = free_name(gm, f"{convs[0].label}_merged")
        gm.add_submodule(name, merged)
        removed = [n for n in [*interior, *terms] if n is not x]
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        # before every removed node, so that their shape reads can move to the merged conv
        with gm.graph.inserting_before(min(removed, key=order.__getitem__)):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(root.meta)
        root.replace_all_uses_with(new)
        for node in removed:
            for user in list(node.users):
                if is_shape_only(user):
                    user.replace_input_with(node, new)
        for node in sorted(removed, key=order.__getitem__, reverse=True):
            if not node.users:
                gm.graph.erase_node(node)
        return name

    return entry, apply


def merge_branches(gm: fx.GraphModule) -> list[MergeEntry]:
    """Merge every reparameterizable sum in the graph, in place; one entry per candidate."""
    entries = []
    changed = True
    seen: set[str] = set()
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if not _is_add(node) or node.name in seen:
                continue
            # only the root of a sum tree: its user is not an add that would absorb it
            users = [_skip_identities_down(u, gm) for u in _users(node)]
            if len(users) == 1 and _is_add(users[0]):
                continue
            outcome = _try_merge(node, gm)
            if outcome is None:
                continue
            entry, apply = outcome
            seen.add(node.name)
            if apply is not None:
                entry.into = apply()
                changed = True
            entries.append(entry)
            if changed:
                break
    return entries


def _skip_identities_down(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    while is_eval_identity(node, gm) and len(_users(node)) == 1:
        node = _users(node)[0]
    return node
