"""Shared base for the ONNX fold patterns: graph facts, BN parameters, graph surgery helpers.

A pattern looks at one BatchNormalization node and answers with one of

* ``None``: the pattern does not apply here (the BN's neighbour is another kind of node);
* a ``str``: the pattern applies but the fold is not allowed, and this is the reason;
* a ``Plan``: the fold is allowed; ``Plan.apply()`` performs it.

Everything a plan needs is checked and computed before ``apply`` runs, so a rejected match
never leaves the graph half-edited. The numbers themselves come from ``bnfold.numerics``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import torch

from bnfold.numerics import bn_scale_shift
from bnfold.onnx.constants import ONNX_DOMAINS, ConstantEvaluator, is_pure_op, leaf_tensor
from bnfold.report import Action

__all__ = ["BNAffine", "FoldContext", "Pattern", "Plan", "bn_label"]


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in ONNX_DOMAINS and node.op_type in op_types


def bn_label(bn: ir.Node) -> str:
    """The name a BN carries in the report: its node name, else its output name."""
    return bn.name or bn.outputs[0].name or "<unnamed BatchNormalization>"


def node_label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name or node.outputs[0].name!r}"


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_float()


def attr_ints(node: ir.Node, name: str) -> list[int]:
    attr = node.attributes.get(name)
    return [] if attr is None else list(attr.as_ints())


def attr_str(node: ir.Node, name: str, default: str) -> str:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_string()


@dataclass
class BNAffine:
    """Eval-mode BN as y = s * x + t per channel (float64 tensors), with its input value."""

    s: torch.Tensor
    t: torch.Tensor
    x: ir.Value
    y: ir.Value


@dataclass
class Plan:
    targets: list[str]
    apply: Callable[[], None]
    note: str = ""


@dataclass
class FoldContext:
    """What the patterns may read about the graph, and the few edits they share."""

    # a dim is an int, a symbol (equal symbols are equal sizes) or None (unknown)
    shapes: dict[str, tuple[int | str | None, ...] | None] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    constants: ConstantEvaluator = field(default_factory=ConstantEvaluator)

    # --- graph facts -------------------------------------------------------------------
    def constant(self, value: ir.Value | None) -> np.ndarray | str:
        """The array behind a constant value, or why it is not one. A constant is an initializer
        that is not a graph input, a Constant node's output, or computed from those alone
        (``bnfold.onnx.constants``: Identity, Transpose, DequantizeLinear, ...). Graph inputs
        (even with a default initializer) and values computed from them are not constants: the
        caller may feed anything there."""
        if value is None:
            return "absent"
        leaf = leaf_tensor(value)
        if isinstance(leaf, str):
            return leaf
        if leaf is not None:
            return np.asarray(leaf.numpy())
        return self.constants.evaluate(value)

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        arr = self.constant(value)
        return None if isinstance(arr, str) else arr

    def float_constant(self, value: ir.Value | None) -> np.ndarray | str:
        """`constant`, for a floating-point tensor only."""
        arr = self.constant(value)
        if isinstance(arr, str):
            return arr
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
            return arr
        return f"{value.name!r} is a constant of dtype {arr.dtype}, not floating point"

    def float_const(self, value: ir.Value | None) -> np.ndarray | None:
        arr = self.float_constant(value)
        return None if isinstance(arr, str) else arr

    def shape(self, value: ir.Value) -> tuple[int | str | None, ...] | None:
        """Shape from the model's own annotations, else from onnx shape inference."""
        if value.shape is not None:
            return tuple(d if isinstance(d, int) else d.value for d in value.shape)
        return self.shapes.get(value.name)

    def rank(self, value: ir.Value) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    @staticmethod
    def sole_consumer(value: ir.Value) -> str | None:
        """Reason why `value` may not be rewritten as the input of exactly one node."""
        if value.is_graph_output():
            return f"{value.name!r} is a graph output"
        uses = value.uses()
        if len(uses) != 1:
            return f"{value.name!r} has {len(uses)} consumers"
        return None

    # --- edits ---------------------------------------------------------------------------
    def unique(self, base: str) -> str:
        """A name no value or node in the model has yet: `base`_bnfold[N]."""
        name, i = f"{base}_bnfold", 1
        while name in self.names:
            i += 1
            name = f"{base}_bnfold{i}"
        self.names.add(name)
        return name

    def new_initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        """A fresh initializer: folded weights never overwrite one that others may share."""
        name = self.unique(base)
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        graph.register_initializer(value)
        return value

    @classmethod
    def release(cls, value: ir.Value | None) -> None:
        """Drop an initializer, Constant node or constant-only node (an Identity in front of a
        shared initializer) that the fold left without users, then what only it read."""
        if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
            return
        if value.is_initializer() and value.graph is not None:
            value.graph.initializers.pop(value.name, None)
            return
        producer = value.producer()
        if producer is None or producer.graph is None or is_pure_op(producer) is not None:
            return
        if any(out.uses() or out.is_graph_output() for out in producer.outputs):
            return
        inputs = list(producer.inputs)  # removal detaches them
        producer.graph.remove(producer, safe=True)
        for inp in inputs:
            cls.release(inp)

    @classmethod
    def bypass(cls, bn: ir.Node, replacement: ir.Value, keep_name: bool = True) -> None:
        """Remove `bn` and its now unused parameters; `replacement` takes its output's place.

        With `keep_name`, it takes the name too, so graph outputs (and value_info, and
        outer-scope references from subgraphs) still find the tensor they knew."""
        y = bn.outputs[0]
        name, shape, type_ = y.name, y.shape, y.type
        params = list(bn.inputs[1:])
        y.replace_all_uses_with(replacement, replace_graph_outputs=keep_name)
        bn.graph.remove(bn, safe=True)
        for value in params:
            cls.release(value)
        if keep_name:
            replacement.name = name
            replacement.shape = shape or replacement.shape
            replacement.type = type_ or replacement.type

    # --- the BN itself -------------------------------------------------------------------
    def bn_affine(self, bn: ir.Node) -> BNAffine | str:
        """s, t of an eval-mode BN, or why it has none."""
        if attr_int(bn, "training_mode", 0) != 0:
            return "training_mode=1: normalises with batch statistics"
        if attr_int(bn, "spatial", 1) != 1:
            return "spatial=0 (opset < 9): statistics per element, not per channel"
        if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
            return "its running-statistics outputs are used"
        if len(bn.inputs) < 5 or bn.inputs[0] is None:
            return "malformed BatchNormalization: fewer than 5 inputs"
        params = [self.float_constant(v) for v in bn.inputs[1:5]]
        for label, value, arr in zip(
            ("scale", "B", "mean", "var"), bn.inputs[1:5], params, strict=True
        ):
            if isinstance(arr, str):
                return f"{label} {value.name!r} is not a constant: {arr}"
        scale, bias, mean, var = (torch.from_numpy(a.astype(np.float64)) for a in params)
        if len({tuple(p.shape) for p in (scale, bias, mean, var)}) != 1 or scale.dim() != 1:
            return "BN parameters are not all 1-D of one length"
        eps = attr_float(bn, "epsilon", 1e-5)
        s, t = bn_scale_shift(mean, var, scale, bias, eps)
        if not (torch.isfinite(s).all() and torch.isfinite(t).all()):
            return "non-finite scale or shift (variance + epsilon <= 0?)"
        return BNAffine(s=s, t=t, x=bn.inputs[0], y=bn.outputs[0])


def to_torch64(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(arr, dtype=np.float64))


def from_torch(t: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """Cast a float64 result back to the dtype of the array it replaces."""
    return t.detach().numpy().astype(like.dtype)


def prod(dims) -> int:
    return math.prod(dims)


class Pattern(ABC):
    """One fold kind. Subclasses stay small; adding one never touches the others."""

    action: ClassVar[Action]
    description: ClassVar[str]

    @abstractmethod
    def match(self, bn: ir.Node, bn_affine: BNAffine, ctx: FoldContext) -> Plan | str | None:
        """A Plan, a reason why not, or None when the pattern does not apply to this BN."""
