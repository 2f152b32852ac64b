"""Compose sequential affine layers of an ONNX graph into one, when that is exact and cheaper.

The ONNX twin of ``bnfold.compose``, run by ``fold_onnx`` after the folds and merges: a
forward fold can leave Gemm -> Gemm (the BN between them is gone), a 1x1 Conv can feed a Conv
directly. Two affine maps compose into one (``bnfold.numerics`` computes the weights):

* Linear(W1, b1) -> Linear(W2, b2):  W = W2 W1,  b = W2 b1 + b2
* Conv1x1(W1, b1) -> Conv(W2, b2):   W[o, i, k] = sum_m W2[o, m, k] W1[m, i],
                                     b = b2 + sum_{m, k} W2[o, m, k] b1[m]

A linear layer is a Gemm (transA=0, constant B, constant C per output feature; alpha and
beta read into W and b) or a MatMul with a constant 2-D B on the last dim of an input of any
rank, with an optional Add of a constant 1-D bias. Either kind composes with either; the
composed layer is of the second's kind (a Gemm normalised to transB=1, alpha=beta=1).
Layers without constant weights (attention's MatMuls) are not candidates at all.

Cases, each a guard below:
1. Between the layers only Identity and inference-mode Dropout. The first layer's output and
   every value between have exactly one consumer and are no graph output; all the nodes live
   in one graph. The second layer's output keeps its name (graph outputs survive).
2. Linear -> linear: the first's outputs are the second's inputs.
3. 1x1 Conv -> Conv: the 1x1 has stride 1, no pads, group 1, dilation 1; both have
   auto_pad NOTSET, and the second group 1. The second conv's zero padding pads the 1x1's
   *output* with zeros; the composed conv pads x with zeros, which the 1x1 would have mapped
   to b1. Exact when the second conv pads nothing or b1 is exactly zero.
4. Only when the composed layer needs fewer multiply-adds per output than the two did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from bnfold.numerics import compose_conv1x1_then_conv, compose_linear
from bnfold.onnx.patterns.base import (
    FoldContext,
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    from_torch,
    is_op,
    node_label,
    to_torch64,
)
from bnfold.onnx.patterns.bn_consumer import dropout_reason
from bnfold.report import ComposeEntry

__all__ = ["compose_affine"]

_LINEAR = ("Gemm", "MatMul")


@dataclass
class _Layer:
    """One affine layer: its nodes (the head, then a bias Add) and its map in torch layout."""

    nodes: list[ir.Node]
    # views of the stored constants, read in float64 only for a compose that happens
    weight: np.ndarray  # [out, in] or [out, in, *k]
    bias: np.ndarray | None  # [out] or [1]
    params: list[ir.Value] = field(default_factory=list)  # constants released after a compose
    alpha: float = 1.0  # Gemm: y = alpha * x W^T + beta * C
    beta: float = 1.0

    def float64(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """W and b of the map x -> W x + b, in float64."""
        weight = self.alpha * to_torch64(self.weight)
        if self.bias is None:
            return weight, None
        return weight, self.beta * to_torch64(self.bias).expand(self.weight.shape[0])

    @property
    def head(self) -> ir.Node:
        return self.nodes[0]

    @property
    def x(self) -> ir.Value:
        return self.head.inputs[0]

    @property
    def y(self) -> ir.Value:
        return self.nodes[-1].outputs[0]

    @property
    def label(self) -> str:
        return self.head.name or self.head.outputs[0].name


def _bias_add(
    node: ir.Node, out_features: int, ctx: FoldContext
) -> tuple[ir.Node, ir.Value] | None:
    """The Add of a constant per-feature bias that alone reads `node`'s output, if any."""
    y = node.outputs[0]
    uses = y.uses()
    if y.is_graph_output() or len(uses) != 1 or not is_op(uses[0].node, "Add"):
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    arr = ctx.float_const(other)
    # 1-D: broadcasting it over [..., out] changes no shape
    if arr is None or other is y or arr.ndim != 1 or arr.size not in (1, out_features):
        return None
    return add, other


def _linear(node: ir.Node, ctx: FoldContext) -> _Layer | None:
    """A Gemm / MatMul (+ bias Add) with constant weights as W [out, in], b [out]."""
    b_arr = ctx.float_const(node.inputs[1] if len(node.inputs) > 1 else None)
    if b_arr is None or b_arr.ndim != 2 or node.inputs[0] is None:
        return None
    if is_op(node, "MatMul"):
        layer = _Layer([node], b_arr.T, None, [node.inputs[1]])
        if (found := _bias_add(node, b_arr.shape[1], ctx)) is not None:
            add, bias = found
            layer.nodes.append(add)
            layer.bias = ctx.float_const(bias)
            layer.params.append(bias)
        return layer
    if attr_int(node, "transA", 0):
        return None
    weight = b_arr if attr_int(node, "transB", 0) else b_arr.T
    alpha, beta = attr_float(node, "alpha", 1.0), attr_float(node, "beta", 1.0)
    layer = _Layer([node], weight, None, [node.inputs[1]], alpha, beta)
    c_in = node.inputs[2] if len(node.inputs) > 2 else None
    if c_in is not None:
        c_arr, out = ctx.float_const(c_in), weight.shape[0]
        if c_arr is None or c_arr.size not in (1, out) or (c_arr.ndim == 2 and c_arr.shape[0] != 1):
            return None  # C per row or computed: not one affine map of the features
        layer.bias = c_arr.reshape(-1)
        layer.params.append(c_in)
    return layer


def _conv(node: ir.Node, ctx: FoldContext) -> _Layer | None:
    weight = ctx.float_const(node.inputs[1] if len(node.inputs) > 1 else None)
    if weight is None or weight.ndim < 3 or node.inputs[0] is None:
        return None
    b_in = node.inputs[2] if len(node.inputs) > 2 else None
    bias = ctx.float_const(b_in) if b_in is not None else None
    if b_in is not None and bias is None:
        return None
    return _Layer([node], weight, bias, [node.inputs[1], b_in])


def _layer(node: ir.Node | None, ctx: FoldContext) -> _Layer | None:
    if is_op(node, *_LINEAR):
        return _linear(node, ctx)
    return _conv(node, ctx) if is_op(node, "Conv") else None


def _layer_ending_at(value: ir.Value, ctx: FoldContext) -> _Layer | None:
    """The affine layer whose output is `value` (a bias Add ends its MatMul's layer)."""
    producer = value.producer()
    if is_op(producer, "Add"):
        producer = next(
            (v.producer() for v in producer.inputs if is_op(v.producer(), "MatMul")), None
        )
    layer = _layer(producer, ctx)
    return layer if layer is not None and layer.y is value else None


def _first(second: _Layer, ctx: FoldContext) -> tuple[_Layer, list[ir.Node]] | None:
    """The layer feeding `second` through Identity / inference Dropout nodes, and those."""
    between: list[ir.Node] = []
    value = second.x
    node = value.producer()
    while is_op(node, "Identity") or (is_op(node, "Dropout") and not dropout_reason(node, ctx)):
        between.append(node)
        value = node.inputs[0]
        node = value.producer()
    first = _layer_ending_at(value, ctx)
    if first is None or is_op(first.head, "Conv") != is_op(second.head, "Conv"):
        return None
    return first, between


def _conv_attrs(node: ir.Node, dims: int) -> dict:
    return {
        "auto_pad": attr_str(node, "auto_pad", "NOTSET") or "NOTSET",
        "group": attr_int(node, "group", 1),
        "strides": attr_ints(node, "strides") or [1] * dims,
        "pads": attr_ints(node, "pads") or [0] * (2 * dims),
        "dilations": attr_ints(node, "dilations") or [1] * dims,
    }


def _conv_pair(first: _Layer, second: _Layer) -> tuple[int, int] | str:
    """Case 3; the multiply-adds per output position before and after."""
    dims = second.weight.ndim - 2
    a, b = _conv_attrs(first.head, dims), _conv_attrs(second.head, dims)
    kernel = tuple(first.weight.shape[2:])
    plain = len(kernel) == dims and all(k == 1 for k in kernel)
    if not plain or any(s != 1 for s in a["strides"]) or any(a["pads"]):
        return f"{node_label(first.head)} is not a plain 1x1 conv (stride 1, no pads)"
    if a["auto_pad"] != "NOTSET" or b["auto_pad"] != "NOTSET":
        return "auto_pad is set: the pads are not read from the graph"
    if a["group"] != 1 or b["group"] != 1 or any(d != 1 for d in a["dilations"]):
        return "grouped or dilated 1x1"
    mid, cin = first.weight.shape[:2]
    if second.weight.shape[1] != mid:
        return f"{node_label(second.head)} reads {second.weight.shape[1]} channels, not {mid}"
    if any(b["pads"]) and first.bias is not None and bool(first.bias.any()):
        return "the second conv pads with zeros and the 1x1 has a bias: inexact at the borders"
    k, cout = math.prod(second.weight.shape[2:]), second.weight.shape[0]
    return cin * mid + mid * cout * k, cin * cout * k


def _linear_pair(first: _Layer, second: _Layer) -> tuple[int, int] | str:
    """Case 2; the multiply-adds per sample before and after."""
    (mid, cin), (cout, mid2) = first.weight.shape, second.weight.shape
    if mid != mid2:
        return f"{node_label(second.head)} reads {mid2} features, not {mid}"
    return cin * mid + mid * cout, cin * cout


def _composed_nodes(
    first: _Layer, second: _Layer, weight: torch.Tensor, bias: torch.Tensor, ctx: FoldContext
) -> list[ir.Node]:
    """The layer that replaces both, of the second's kind, reading the first's input."""
    graph, head = second.head.graph, second.head
    base = f"{head.inputs[1].name}_composed"
    name = ctx.unique(f"{head.name or head.op_type}_composed")
    w = from_torch(weight, second.weight)
    b_arr = from_torch(bias, second.weight)
    if head.op_type == "MatMul":
        w_new = ctx.new_initializer(graph, base, np.ascontiguousarray(w.T))
        matmul = ir.Node("", "MatMul", [first.x, w_new], name=name)
        if first.bias is None and second.bias is None:
            return [matmul]
        b_new = ctx.new_initializer(graph, f"{base}_bias", b_arr)
        add = ir.Node("", "Add", [matmul.outputs[0], b_new], name=ctx.unique(f"{name}_bias"))
        return [matmul, add]
    w_new = ctx.new_initializer(graph, base, w)
    b_new = ctx.new_initializer(graph, f"{base}_bias", b_arr)
    if head.op_type == "Gemm":
        return [
            ir.Node("", "Gemm", [first.x, w_new, b_new], [ir.AttrInt64("transB", 1)], name=name)
        ]
    dims = weight.ndim - 2
    attrs = _conv_attrs(head, dims)
    attributes = [
        ir.AttrInt64s("kernel_shape", list(w.shape[2:])),
        ir.AttrInt64s("strides", attrs["strides"]),
        ir.AttrInt64s("pads", attrs["pads"]),
        ir.AttrInt64s("dilations", attrs["dilations"]),
    ]
    return [ir.Node("", "Conv", [first.x, w_new, b_new], attributes, name=name)]


def _try(node: ir.Node, ctx: FoldContext) -> tuple[ComposeEntry, Callable | None] | None:
    """The entry for the pair ending in `node`, with the edit that composes it when allowed."""
    second = _layer(node, ctx)
    found = _first(second, ctx) if second is not None else None
    if found is None:
        return None
    first, between = found
    entry = ComposeEntry(name=second.label, layers=[first.label, second.label])
    chain = [first.y, *(n.outputs[0] for n in between)]
    reason = next((r for v in chain if (r := FoldContext.sole_consumer(v)) is not None), None)
    if reason is None and any(n.graph is not node.graph for n in [*first.nodes, *between]):
        reason = f"{node_label(first.head)} is computed in an enclosing graph"
    pair = reason or (
        _conv_pair(first, second) if is_op(node, "Conv") else _linear_pair(first, second)
    )
    if isinstance(pair, str):
        entry.reason = pair
        return entry, None
    entry.macs_before, entry.macs_after = pair
    if entry.macs_after >= entry.macs_before:  # case 4
        entry.reason = (
            f"composing would not reduce the multiply-adds ({entry.macs_after} per output, "
            f"the two layers {entry.macs_before})"
        )
        return entry, None
    compose = compose_linear if first.weight.ndim == 2 else compose_conv1x1_then_conv
    weight, bias = compose(*first.float64(), *second.float64())

    def apply() -> str:
        new = _composed_nodes(first, second, weight, bias, ctx)
        graph, y = node.graph, second.y
        name, shape, type_ = y.name, y.shape, y.type or first.x.type
        graph.insert_before(node, new)
        y.replace_all_uses_with(new[-1].outputs[0], replace_graph_outputs=True)
        removed = [*first.nodes, *between, *second.nodes]
        params = [*first.params, *second.params, *(v for n in between for v in n.inputs[1:])]
        graph.remove(removed, safe=True)
        for value in params:
            ctx.release(value)
        out = new[-1].outputs[0]
        out.name, out.shape, out.type = name, shape, type_
        return new[0].name

    return entry, apply


def compose_affine(graph: ir.Graph, ctx: FoldContext) -> list[ComposeEntry]:
    """Compose every cheaper pair in `graph` and its subgraphs, in place, to a fixpoint (a
    chain of three composes in two rounds); one entry per candidate pair, with `into` set when
    composed and `reason` when not."""
    composed: list[ComposeEntry] = []
    left: dict[int, tuple[ir.Node, ComposeEntry]] = {}  # latest reason per second layer
    changed = True
    while changed:
        changed = False
        for node in list(ir.traversal.RecursiveGraphIterator(graph)):
            if node.graph is None or not is_op(node, "Conv", *_LINEAR):
                continue  # removed by a compose in this round, or no layer
            outcome = _try(node, ctx)
            if outcome is None:
                continue
            entry, apply = outcome
            if apply is None:
                left[id(node)] = (node, entry)
                continue
            left.pop(id(node), None)
            entry.into = apply()
            composed.append(entry)
            changed = True
    return [*composed, *(e for n, e in left.values() if n.graph is not None)]
