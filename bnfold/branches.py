"""Structural reparameterization: merge parallel affine branches of one input into one conv.

After BN folding, RepVGG / MobileOne / ACNet / RepGhost blocks compute a sum of branches of
the same input x: convs with the same stride, dilation and groups (kernel sizes may differ), a
BN that stayed because it has no producer (the identity branch, y = s*x + t; RepGhost's
`fusion_bn(nn.Identity()(x))`), x itself, each possibly behind eval-mode identities (Dropout,
Identity, DropPath at 0), on either side of the branch. Every branch is a conv:

* a conv of kernel k and padding p reads input o*stride - p + j*dilation; placed at offset
  J0 = (P - p) / dilation inside a kernel of size K with padding P = max p, it reads the same
  positions, and its zeros multiply the extra padded border: exact;
* a BN branch is a 1x1 kernel holding s on the diagonal of each group, with bias t;
* x itself is that kernel with s = 1, t = 0.

Cases, each a guard below:
1. Only a sum (`+`, `torch.add`, `x.add(y)`, or in place: `+=`, `x.add_(y)`) of at least two
   branches, one a conv. A sum that does not merge as a whole may hold sub-sums that do (a
   residual add around a RepGhost sum): those merge, then the whole is tried again.
2. Every branch reads the same input x (through eval identities), and every intermediate
   result has no other user.
2a. Nothing writes x in place while the branches read it, and the sum is not written in
   place into x (or a tensor x is a view of): the merged conv reads x once and writes nothing.
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

from bnfold.capture import (
    BNSite,
    bn_site,
    fetch_attr,
    free_name,
    is_inplace,
    is_shape_only,
    node_shape,
)
from bnfold.numerics import (
    bn_scale_shift,
    branch_sum_macs,
    merge_branch_kernels,
    merged_kernel_layout,
)
from bnfold.patterns.bn_consumer import is_eval_identity
from bnfold.report import MergeEntry

__all__ = ["merge_branches"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
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
    if node.op == "call_function":
        is_sum = node.target in _ADD_FUNCTIONS
    else:
        is_sum = node.op == "call_method" and node.target in _ADD_METHODS
    return (
        is_sum
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


def _source(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, list[fx.Node]]:
    """The node whose values `node` has, through eval identities (any number of users), and
    the identities passed on the way."""
    chain = []
    while isinstance(node, fx.Node) and is_eval_identity(node, gm):
        chain.append(node)
        node = node.args[0]
    return node, chain


def _branch(term: fx.Node, gm: fx.GraphModule) -> tuple[_Branch, fx.Node, list[fx.Node]] | str:
    """Describe one term as a branch of its input (with the identities between them), or say
    why it is not one."""
    if term.op == "call_module":
        m = fetch_attr(gm, str(term.target))
        if type(m) in _CONVS:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                return f"'{term.target}' pads with mode {m.padding_mode!r} / {m.padding!r}"
            return _Branch(str(term.target), conv=m), *_source(term.args[0], gm)
    site: BNSite | None = bn_site(term, gm)
    if site is not None:
        if site.foldable_reason:
            return f"BN '{term.name}' {site.foldable_reason}"
        s, t = bn_scale_shift(site.running_mean, site.running_var, site.weight, site.bias, site.eps)
        # a BN of x through nn.Identity (RepGhost's fusion_conv) is still s*x + t
        return _Branch(term.name, scale=s, shift=t), *_source(site.input, gm)
    return f"{term.op} '{term.name}' is not a conv, a BN or the shared input"


def _aliases(x: fx.Node, gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that hold x's tensor itself: eval identities and in-place ops, up and down."""

    def same_tensor(n: fx.Node) -> bool:
        return (is_eval_identity(n, gm) or is_inplace(n, gm)) and bool(n.args)

    seen: set[fx.Node] = set()
    stack = [x]
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if same_tensor(node):
            stack.append(node.args[0])
        stack += [u for u in node.users if same_tensor(u) and u.args[0] is node]
    return seen


def _inplace_reason(
    x: fx.Node, tree: list[fx.Node], removed: list[fx.Node], gm: fx.GraphModule
) -> str | None:
    """Case 2a: why computing the sum as one conv of x, placed before the first removed node,
    would read or leave different values than the branches did."""
    aliases = _aliases(x, gm)
    for node in tree:
        if is_inplace(node, gm) and not is_eval_identity(node, gm) and node.args[0] in aliases:
            return f"the sum is written in place into its input '{x.name}' by '{node.name}'"
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first, last = min(order[n] for n in removed), max(order[n] for n in tree)
    for node in aliases:
        if node in removed or is_eval_identity(node, gm) or not is_inplace(node, gm):
            continue
        if first < order[node] < last:
            return f"its input '{x.name}' is modified in place by '{node.name}' between branches"
    return None


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
    # a term that another branch reads (through identities) is the identity branch (x itself)
    sources = {t: _source(t, gm)[0] for t in terms}
    identity = {t for t in terms if sources[t] in read}
    readers = [*read, *(sources[t] for t in identity)]
    if max((readers.count(x) for x in set(readers)), default=0) < 2:
        return None  # not parallel branches of one input (a residual add, say): not a candidate
    described: list[_Branch | str | None] = []
    inputs = set()
    chains: list[fx.Node] = []  # identities between x and a branch, removed with it if unused
    for term, d in zip(terms, raw, strict=True):
        if term in identity:
            described.append(_Branch("identity"))
            inputs.add(sources[term])
        elif len(_users(term)) != 1:
            described.append(None)
        elif isinstance(d, str):
            described.append(d)
        else:
            described.append(d[0])
            inputs.add(d[1])
            chains += d[2]
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
    x = next(iter(inputs))
    removed = [n for n in [*interior, *terms] if n is not x]
    reason = _inplace_reason(x, [*interior, *terms], removed, gm)
    if reason:
        entry.reason = reason
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
        for node in sorted({*removed, *chains}, key=order.__getitem__, reverse=True):
            if not node.users:
                gm.graph.erase_node(node)
        return name

    return entry, apply


def _child_sums(root: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The sums directly under `root` in its tree (read only by it, through identities)."""
    children = []
    for arg in root.args:
        node = arg
        while isinstance(node, fx.Node) and is_eval_identity(node, gm) and len(_users(node)) == 1:
            node = node.args[0]
        if isinstance(node, fx.Node) and _is_add(node) and len(_users(node)) == 1:
            children.append(node)
    return children


def _merge_tree(root: fx.Node, gm: fx.GraphModule) -> list[MergeEntry]:
    """Merge the tree under `root`; when it does not merge as a whole, merge its sub-sums (a
    RepGhost sum inside a residual add) and try `root` again. Entries of the merged sums and
    of `root`: a sub-sum that does not merge either is not reported on its own."""
    outcome = _try_merge(root, gm)
    merged: list[MergeEntry] = []
    if outcome is None or outcome[1] is None:
        for child in _child_sums(root, gm):
            merged += [e for e in _merge_tree(child, gm) if e.into]
        if merged:
            outcome = _try_merge(root, gm)
    if outcome is None:
        return merged
    entry, apply = outcome
    if apply is not None:
        entry.into = apply()
    return [*merged, entry]


def merge_branches(gm: fx.GraphModule) -> list[MergeEntry]:
    """Merge every reparameterizable sum in the graph, in place; one entry per candidate."""
    entries: list[MergeEntry] = []
    alive = set(gm.graph.nodes)
    for node in list(gm.graph.nodes):
        if node not in alive or not _is_add(node):
            continue  # erased by a merge before, or not a sum
        # only the root of a sum tree: its user is not an add that would absorb it
        users = [_skip_identities_down(u, gm) for u in _users(node)]
        if len(users) == 1 and _is_add(users[0]):
            continue
        outcome = _merge_tree(node, gm)
        if any(e.into for e in outcome):
            alive = set(gm.graph.nodes)
        entries += outcome
    return entries


def _skip_identities_down(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    while is_eval_identity(node, gm) and len(_users(node)) == 1:
        node = _users(node)[0]
    return node
