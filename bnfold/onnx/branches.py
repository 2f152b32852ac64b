"""Structural reparameterization on ONNX graphs: a sum of parallel branches becomes one Conv.

The ONNX twin of ``bnfold.branches``, run by ``fold_onnx`` after the BN folds. RepVGG /
MobileOne / ACNet blocks then compute, with Add (or Sum) nodes, a sum of branches of one
input x: Conv nodes with constant weights, a BatchNormalization of x that stayed because it
has no affine neighbour (the identity branch, y = s*x + t), and x itself. Every branch is a
conv (see ``bnfold.numerics.merged_kernel_layout`` for why placing the kernels is exact), so
the sum is one Conv whose kernel and bias ``bnfold.numerics.merge_branch_kernels`` computes.

Cases, each a guard below:
1. Only the root of a tree of Add / Sum nodes, of at least two terms, one a Conv. Interior
   sums and the terms have no other consumer and are no graph output; the root's output
   keeps its name (the merged Conv produces it). A constant 0 term is dropped. A tree that
   does not merge as a whole may hold sub-sums that do (a residual add around a block).
2. Every term reads the same input x; nodes of the tree live in the root's graph.
3. Convs have constant W (and B), no auto_pad, the same strides, dilations, group and
   channels.
4. Paddings line up: same output size in every dim, offsets a whole number of dilations.
5. A BN / identity term needs stride 1 and as many output as input channels.
6. The merged Conv must not cost more multiply-adds per output than the branches did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from bnfold.numerics import branch_sum_macs, merge_branch_kernels, merged_kernel_layout
from bnfold.onnx.patterns.base import (
    FoldContext,
    attr_int,
    attr_ints,
    attr_str,
    bn_label,
    from_torch,
    is_op,
    node_label,
    to_torch64,
)
from bnfold.report import MergeEntry

__all__ = ["merge_branches"]

_SUMS = ("Add", "Sum")


@dataclass
class _Conv:
    """The attributes of a Conv term that the merge compares, with defaults filled in."""

    weight: np.ndarray  # [out, in/group, *k]
    bias: np.ndarray | None
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    group: int

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def signature(self) -> tuple:
        return (self.strides, self.dilations, self.group, self.weight.shape[:2])


@dataclass
class _Branch:
    term: ir.Value  # the value that enters the sum
    label: str
    node: ir.Node | None = None  # the Conv / BN computing it; None for x itself
    conv: _Conv | None = None
    scale: torch.Tensor | None = None  # BN branch: per-channel s, t (float64)
    shift: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(weight, bias, scale) as merge_branch_kernels takes them."""
        if self.conv is not None:
            bias = None if self.conv.bias is None else to_torch64(self.conv.bias)
            return to_torch64(self.conv.weight), bias, None
        return None, self.shift, self.scale


def _is_sum(node: ir.Node | None) -> bool:
    return is_op(node, *_SUMS) and all(v is not None for v in node.inputs)


def _is_zero(value: ir.Value, ctx: FoldContext) -> bool:
    """A constant 0 (timm's MobileOne starts its sum at 0): adding it changes nothing, as long
    as it cannot broadcast the sum to more dims (a Conv output has rank >= 3)."""
    arr = ctx.float_const(value)
    return arr is not None and arr.size == 1 and arr.ndim <= 3 and not arr.any()


@dataclass
class _SumTree:
    root: ir.Node
    terms: list[ir.Value]
    interior: list[ir.Node]  # the sums, root included
    zeros: list[ir.Value]  # constant zero terms, dropped


def _inner_sum(value: ir.Value, root: ir.Node) -> ir.Node | None:
    """The sum computing `value` when it belongs to the tree of `root` (read only there)."""
    producer = value.producer()
    if _is_sum(producer) and producer.graph is root.graph:
        return producer if FoldContext.sole_consumer(value) is None else None
    return None


def _sum_tree(root: ir.Node, ctx: FoldContext) -> _SumTree:
    tree = _SumTree(root, [], [root], [])
    stack = list(reversed(root.inputs))
    while stack:
        value = stack.pop()
        producer = value.producer()
        if _is_zero(value, ctx):
            tree.zeros.append(value)
        elif _inner_sum(value, root) is not None:
            tree.interior.append(producer)
            stack.extend(reversed(producer.inputs))
        else:
            tree.terms.append(value)
    return tree


def _conv(node: ir.Node, ctx: FoldContext) -> _Conv | str:
    if attr_str(node, "auto_pad", "NOTSET") not in ("NOTSET", ""):
        return f"{node_label(node)} has auto_pad={attr_str(node, 'auto_pad', '')}"
    weight = ctx.float_const(node.inputs[1] if len(node.inputs) > 1 else None)
    if weight is None or weight.ndim < 3:
        return f"{node_label(node)}: weight is not a constant"
    b_in = node.inputs[2] if len(node.inputs) > 2 else None
    bias = ctx.float_const(b_in) if b_in is not None else None
    if b_in is not None and bias is None:
        return f"{node_label(node)}: bias is not a constant"
    dims = weight.ndim - 2
    pads = attr_ints(node, "pads") or [0] * (2 * dims)
    return _Conv(
        weight=weight,
        bias=bias,
        strides=tuple(attr_ints(node, "strides") or [1] * dims),
        dilations=tuple(attr_ints(node, "dilations") or [1] * dims),
        pads_begin=tuple(pads[:dims]),
        pads_end=tuple(pads[dims:]),
        group=attr_int(node, "group", 1),
    )


def _branch(term: ir.Value, ctx: FoldContext) -> tuple[_Branch | str, ir.Value | None]:
    """Describe one term as a branch, or say why it is not one; with the input it reads."""
    node = term.producer()
    if is_op(node, "Conv") and term is node.outputs[0]:
        conv = _conv(node, ctx)
        if isinstance(conv, str):
            return conv, node.inputs[0]
        return _Branch(term, node.name or term.name, node, conv=conv), node.inputs[0]
    if is_op(node, "BatchNormalization") and term is node.outputs[0]:
        affine = ctx.bn_affine(node)
        if isinstance(affine, str):
            return f"BN {bn_label(node)!r}: {affine}", node.inputs[0]
        return _Branch(term, bn_label(node), node, scale=affine.s, shift=affine.t), affine.x
    source = node_label(node) if node is not None else "a graph input"
    return f"{term.name!r} (from {source}) is not a Conv, a BN or the shared input", None


def _macs(branches: list[_Branch], in_per_group: int, out_ch: int) -> int:
    kernels = [tuple(b.conv.kernel) if b.conv is not None else None for b in branches]
    return branch_sum_macs(kernels, [b.scale is not None for b in branches], in_per_group, out_ch)


def _branches(tree: _SumTree, ctx: FoldContext) -> list[_Branch | str] | None:
    """Cases 1 and 2: each term as a branch of the shared input, or why it is not one. None
    when the sum is not a reparameterizable block at all (a residual add, a bias add)."""
    if len(tree.terms) < 2:
        return None
    raw = [_branch(term, ctx) for term in tree.terms]
    read = [x for _, x in raw if x is not None]
    # a term that another branch reads is the identity branch (x itself)
    identity = {id(t) for t in tree.terms if any(t is r for r in read)}
    if max((sum(r is x for r in read) + (id(x) in identity) for x in read), default=0) < 2:
        return None
    described: list[_Branch | str] = []
    for term, (d, _) in zip(tree.terms, raw, strict=True):
        if id(term) in identity:
            described.append(_Branch(term, "identity"))
        elif isinstance(d, str):
            described.append(d)
        elif (reason := FoldContext.sole_consumer(term)) is not None:
            described.append(f"branch {d.label!r}: {reason}")
        elif d.node.graph is not tree.root.graph:
            described.append(f"branch {d.label!r} is computed in an enclosing graph")
        else:
            described.append(d)
    if not any(is_op(t.producer(), "Conv") for t in tree.terms if id(t) not in identity):
        return None  # no conv branch: an ordinary sum, say nothing about it
    return described


def _input(branches: list[_Branch]) -> ir.Value | None:
    """The one value every branch reads, if there is one."""
    reads = {id(v): v for v in (b.node.inputs[0] if b.node else b.term for b in branches)}
    return next(iter(reads.values())) if len(reads) == 1 else None


def _try_merge(root: ir.Node, ctx: FoldContext) -> tuple[MergeEntry, Callable | None] | None:
    """The entry for the sum under `root`, with the edit that merges it when allowed."""
    tree = _sum_tree(root, ctx)
    branches = _branches(tree, ctx)
    if branches is None:
        return None
    entry = MergeEntry(
        name=root.name or root.outputs[0].name,
        branches=[b.label if isinstance(b, _Branch) else "?" for b in branches],
    )
    problems = [b for b in branches if isinstance(b, str)]
    x = None if problems else _input(branches)
    if problems or x is None:
        entry.reason = problems[0] if problems else "the branches do not all read the same input"
        return entry, None
    convs = [b for b in branches if b.conv is not None]
    first = convs[0].conv
    for b in convs:  # case 3
        if b.conv.signature != first.signature:
            entry.reason = (
                f"{b.label!r} differs from {convs[0].label!r} in strides, dilations, group "
                "or channels"
            )
            return entry, None
    out_ch, in_per_group = first.weight.shape[:2]
    others = [b for b in branches if b.conv is None]
    if others and (any(s != 1 for s in first.strides) or in_per_group * first.group != out_ch):
        entry.reason = "an identity/BN branch needs stride 1 and equal in/out channels"  # case 5
        return entry, None
    if any(b.scale is not None and b.scale.numel() != out_ch for b in others):
        entry.reason = f"a BN branch does not have {out_ch} channels"
        return entry, None
    ones, zeros = (1,) * len(first.kernel), (0,) * len(first.kernel)
    layout = merged_kernel_layout(  # case 4
        [b.conv.kernel if b.conv else ones for b in branches],
        [b.conv.pads_begin if b.conv else zeros for b in branches],
        [b.conv.pads_end if b.conv else zeros for b in branches],
        first.dilations,
    )
    if isinstance(layout, str):
        entry.reason = layout
        return entry, None
    entry.macs_before = _macs(branches, in_per_group, out_ch)  # case 6
    entry.macs_after = math.prod(layout.size) * in_per_group * out_ch
    if entry.macs_after > entry.macs_before:
        entry.reason = (
            f"the merged {layout.size} kernel costs {entry.macs_after} multiply-adds per output, "
            f"the branches {entry.macs_before}"
        )
        return entry, None
    weight, bias = merge_branch_kernels(
        layout, out_ch, in_per_group, [b.tensors() for b in branches]
    )
    head = convs[0].node
    attributes = [
        ir.AttrInt64s("kernel_shape", list(layout.size)),
        ir.AttrInt64s("pads", [*layout.pad_begin, *layout.pad_end]),
        ir.AttrInt64s("strides", list(first.strides)),
        ir.AttrInt64s("dilations", list(first.dilations)),
        ir.AttrInt64("group", first.group),
    ]

    def apply() -> str:
        graph, w_name = root.graph, head.inputs[1].name
        w_new = ctx.new_initializer(graph, f"{w_name}_merged", from_torch(weight, first.weight))
        b_new = ctx.new_initializer(graph, f"{w_name}_merged_bias", from_torch(bias, first.weight))
        name = ctx.unique(f"{head.name or 'conv'}_merged")
        merged = ir.Node("", "Conv", [x, w_new, b_new], attributes, name=name)
        graph.insert_before(root, merged)
        _replace_sum(tree, [b.node for b in branches if b.node is not None], merged, ctx)
        return name

    return entry, apply


def _replace_sum(tree: _SumTree, nodes: list[ir.Node], merged: ir.Node, ctx: FoldContext) -> None:
    """`merged` takes the place (and the output name) of the root; the branch nodes, the
    interior sums and their now unused constants go."""
    y = tree.root.outputs[0]
    name, shape, type_ = y.name, y.shape, y.type
    y.replace_all_uses_with(merged.outputs[0], replace_graph_outputs=True)
    params = [v for n in nodes for v in n.inputs[1:]] + tree.zeros
    tree.root.graph.remove([*tree.interior, *nodes], safe=True)
    for value in params:
        ctx.release(value)
    out = merged.outputs[0]
    out.name, out.shape, out.type = name, shape, type_ or merged.inputs[0].type


def _merge_tree(root: ir.Node, ctx: FoldContext) -> list[MergeEntry]:
    """Merge the tree under `root`; when it does not merge as a whole, merge its sub-sums (a
    RepGhost sum inside a residual add) and try `root` again. Entries of the merged sums and
    of `root`: a sub-sum that does not merge either is not reported on its own."""
    outcome = _try_merge(root, ctx)
    merged: list[MergeEntry] = []
    if outcome is None or outcome[1] is None:
        for child in [c for v in root.inputs if (c := _inner_sum(v, root)) is not None]:
            merged += [e for e in _merge_tree(child, ctx) if e.into]
        if merged:
            outcome = _try_merge(root, ctx)
    if outcome is None:
        return merged
    entry, apply = outcome
    if apply is not None:
        entry.into = apply()
    return [*merged, entry]


def merge_branches(graph: ir.Graph, ctx: FoldContext) -> list[MergeEntry]:
    """Merge every reparameterizable sum in `graph` and its subgraphs, in place; one entry
    per candidate, with `into` set when merged and `reason` when not."""
    entries: list[MergeEntry] = []
    sums = [n for n in ir.traversal.RecursiveGraphIterator(graph) if _is_sum(n)]
    for node in sums:
        if node.graph is None:  # an interior sum of a tree merged before
            continue
        # only the root of a tree: a sum feeding only another sum is part of that one's tree
        uses = node.outputs[0].uses()
        if len(uses) == 1 and _is_sum(uses[0].node):
            if _inner_sum(node.outputs[0], uses[0].node) is not None:
                continue
        entries += _merge_tree(node, ctx)
    return entries
