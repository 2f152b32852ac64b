"""Constants behind constant-only nodes: a value computed only from initializers and Constant
nodes is a constant too, evaluated once with onnx's reference evaluator.

Exporters seldom hand the fold a bare initializer. torch.onnx (``dynamo=False``,
``do_constant_folding=False``) deduplicates equal tensors and feeds every BN parameter through
an ``Identity``; a ``Linear(bias=False)`` becomes ``MatMul(x, Transpose(W))``; a quantized
weight arrives as ``DequantizeLinear`` of an int8 initializer. The rule:

1. A leaf is an initializer that is not a graph input, or a Constant node's output. A graph
   input is never a constant, even one with a default initializer (IR < 4): the caller may
   feed anything there.
2. An interior node is a deterministic op of the ONNX domain without subgraphs, every input
   of which is a leaf or an interior node's output (at most ``max_nodes`` of them).
3. The cone of interior nodes runs as one small model in
   ``onnx.reference.ReferenceEvaluator``, in the graph's own dtypes (a Cast to float16 yields
   float16 values); the fold numerics then read the result in float64 as usual. An op
   version the reference does not implement (DequantizeLinear before 19) runs after
   ``onnx.version_converter`` lifts the small model to the latest opset.
4. What is evaluated is bounded: the leaves plus every value the cone computes, whose sizes
   onnx shape inference of that small model gives before anything runs, stay under
   ``limit_bytes``. A cone whose sizes inference cannot tell is not evaluated.
5. A result is kept while the nodes of its cone are unchanged, so each constant is evaluated
   once per pass (at most ``cache_bytes`` of arrays are kept); a value found not constant is
   kept too, so that walks from the many activations a pattern asks about stay short.

The graph itself is never rewritten here: a pattern that changes a weight writes a new
initializer (``FoldContext.new_initializer``), and a cone left without consumers goes with
``FoldContext.release``, so a constant shared by other consumers stays intact for them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

__all__ = ["ONNX_DOMAINS", "ConstantEvaluator", "is_pure_op", "leaf_tensor"]

logger = logging.getLogger(__name__)

ONNX_DOMAINS = ("", "ai.onnx")
_RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Dropout",  # random in training mode
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)
_SUBGRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
_INLINE_ELEMENTS = 4096  # leaves this small go in as initializers: shape inference reads them


def is_pure_op(node: ir.Node) -> str | None:
    """Why `node` cannot be part of a constant (case 2), or None when it can."""
    label = f"{node.op_type} {node.name or node.outputs[0].name!r}"
    if node.domain not in ONNX_DOMAINS:
        return f"computed by {label} of domain {node.domain!r}"
    if node.op_type in _RANDOM_OPS:
        return f"computed by {label}, which is random"
    if any(attr.type in _SUBGRAPH_ATTRS for attr in node.attributes.values()):
        return f"computed by {label}, which has subgraphs"
    return None


def leaf_tensor(value: ir.Value) -> ir.TensorProtocol | str | None:
    """The tensor of a leaf (case 1), why `value` is no constant at all, or None (computed)."""
    if value.is_graph_input():
        return f"{value.name!r} is a graph input"
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError as exc:  # a malformed Constant node
        return str(exc)
    if tensor is not None:
        return tensor
    producer = value.producer()
    if producer is None:
        return f"{value.name!r} is neither an initializer nor computed in this graph"
    if producer.op_type == "Constant" and producer.domain in ONNX_DOMAINS:
        return f"{value.name!r} is a Constant with a reference attribute"
    return None


@dataclass
class _Cone:
    """The interior nodes behind a value in topological order, and the leaves they read."""

    nodes: list[ir.Node] = field(default_factory=list)
    leaves: dict[int, tuple[ir.Value, ir.TensorProtocol]] = field(default_factory=dict)
    seen: list[tuple[ir.Node, tuple]] = field(default_factory=list)  # with inputs, for the cache
    visited: set[int] = field(default_factory=set)


@dataclass
class _Cached:
    value: ir.Value  # held so that its id is not reused while the entry lives
    seen: list[tuple[ir.Node, tuple]]  # the nodes the result depends on, with their inputs
    result: np.ndarray | str

    def valid(self) -> bool:
        return all(n.graph is not None and tuple(n.inputs) == ins for n, ins in self.seen)


@dataclass
class ConstantEvaluator:
    """Evaluates constant-only cones (cases 2-5); one per fold pass."""

    opset: int | None = None  # of the ONNX domain; None: the latest onnx knows
    limit_bytes: int = 256 * 2**20
    max_nodes: int = 256
    cache_bytes: int = 1024 * 2**20
    _cache: dict[int, _Cached] = field(default_factory=dict, repr=False)
    _cached_bytes: int = field(default=0, repr=False)

    def evaluate(self, value: ir.Value) -> np.ndarray | str:
        """The array behind a computed `value`, or why it is not a constant."""
        cached = self._cached(value)  # case 5
        if cached is not None:
            return cached
        cone = _Cone()
        reason = self._collect(value, cone)
        if reason is not None:
            return reason  # remembered by _collect
        result = self._run(value, cone)
        self._remember(value, cone.seen, result)
        return result

    def _cached(self, value: ir.Value) -> np.ndarray | str | None:
        entry = self._cache.get(id(value))
        if entry is None or entry.value is not value:
            return None
        if entry.valid():
            return entry.result
        self._forget(id(value))
        return None

    def _remember(self, value: ir.Value, seen: list, result: np.ndarray | str) -> None:
        self._forget(id(value))
        size = result.nbytes if isinstance(result, np.ndarray) else 0
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[id(value)] = _Cached(value, seen, result)
            self._cached_bytes += size

    def _forget(self, key: int) -> None:
        old = self._cache.pop(key, None)
        if old is not None and isinstance(old.result, np.ndarray):
            self._cached_bytes -= old.result.nbytes

    def _collect(self, value: ir.Value, cone: _Cone) -> str | None:
        """Fill `cone` with what `value` is computed from (cases 1, 2); a reason if not constant.

        A value found not constant is remembered with only its producer as what the verdict
        depends on: the next walk from another consumer stops there instead of going up to the
        graph inputs again. A stale "not constant" only costs a fold; a constant is remembered
        with its whole cone (``evaluate``), so a stale array is never used."""
        leaf = leaf_tensor(value)
        if isinstance(leaf, str):
            return leaf
        if leaf is not None:
            cone.leaves[id(value)] = (value, leaf)
            return None
        node = value.producer()
        if id(node) in cone.visited:
            return None
        known = self._cached(value)
        if isinstance(known, str):
            return known
        cone.visited.add(id(node))
        cone.seen.append((node, tuple(node.inputs)))
        too_many = f"computed by more than {self.max_nodes} nodes"
        if len(cone.seen) > self.max_nodes:
            return too_many
        reason = is_pure_op(node)
        for inp in node.inputs if reason is None else ():
            if inp is not None and (reason := self._collect(inp, cone)) is not None:
                break
        if reason is not None:
            if reason != too_many:  # a value nearer the leaves may well fit
                self._remember(value, [(node, tuple(node.inputs))], reason)
            return reason
        cone.nodes.append(node)  # after its inputs: topological order
        return None

    def _run(self, value: ir.Value, cone: _Cone) -> np.ndarray | str:
        """The cone as one small model (case 3), sized by inference (case 4), then evaluated."""
        names: dict[int, str] = {}

        def name(v: ir.Value | None) -> str:
            return "" if v is None else names.setdefault(id(v), f"v{len(names)}")

        initializers, inputs, feeds, leaf_bytes = [], [], {}, 0
        for v, tensor in cone.leaves.values():
            leaf_bytes += tensor.nbytes
            if tensor.size <= _INLINE_ELEMENTS:
                proto = ir.serde.serialize_tensor(tensor)
                proto.name = name(v)
                initializers.append(proto)
            else:  # fed at run time: no copy into a TensorProto
                dims = list(tensor.shape.numpy())
                inputs.append(onnx.helper.make_tensor_value_info(name(v), tensor.dtype, dims))
                feeds[name(v)] = tensor.numpy()
        nodes = []
        for node in cone.nodes:
            proto = ir.serde.serialize_node(node)
            proto.ClearField("input")
            proto.input.extend(name(v) for v in node.inputs)
            proto.ClearField("output")
            proto.output.extend(name(v) for v in node.outputs)
            nodes.append(proto)
        out = name(value)
        graph = onnx.helper.make_graph(
            nodes, "constant", inputs, [onnx.ValueInfoProto(name=out)], initializers
        )
        opset = self.opset or onnx.defs.onnx_opset_version()
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        size = _inferred_bytes(model)
        if isinstance(size, str):
            return size
        if leaf_bytes + size > self.limit_bytes:
            return (
                f"computed from constants, but {leaf_bytes + size} bytes to evaluate "
                f"exceed the limit of {self.limit_bytes}"
            )
        try:
            result = _evaluator(model).run(None, feeds)[0]
        except Exception as exc:  # an op the reference evaluator lacks, or a bad graph
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.info("could not evaluate constant %r: %s", value.name, first)
            return f"computed from constants, but evaluating it failed: {first}"
        if not isinstance(result, np.ndarray):
            return "computed from constants, but not a tensor"
        logger.debug("evaluated %r from %d nodes", value.name, len(cone.nodes))
        return result


def _evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    try:
        return ReferenceEvaluator(model)
    except RuntimeError:
        # the reference implements some ops only from a later version (DequantizeLinear from
        # 19, which only added types): the same cone, converted up, computes the same values
        latest = onnx.version_converter.convert_version(model, onnx.defs.onnx_opset_version())
        return ReferenceEvaluator(latest)


def _inferred_bytes(model: onnx.ModelProto) -> int | str:
    """Bytes of every value `model` computes, by onnx shape inference, or why they are unknown:
    the reference evaluator holds them all at once."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        return f"computed from constants, but shape inference failed: {exc}"
    infos = {i.name: i for i in (*inferred.graph.value_info, *inferred.graph.output)}
    total = 0
    for name in {out for node in model.graph.node for out in node.output if out}:
        tensor_type = infos[name].type.tensor_type if name in infos else None
        if tensor_type is None or not tensor_type.elem_type or not tensor_type.HasField("shape"):
            return "computed from constants, but its size is unknown"
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if any(d is None for d in dims):
            return "computed from constants, but its size is unknown"
        total += int(np.prod(dims, dtype=np.int64) * ir.DataType(tensor_type.elem_type).itemsize)
    return total
