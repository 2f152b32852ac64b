"""Every graph, node and tensor of an ONNX model: the main graph, the subgraphs in node
attributes (If, Loop, Scan, at any depth) and the functions, depth first in file order.

Wider than onnx's own tensor walk: sparse initializers (values and indices) and sparse
attribute tensors are yielded too. Nodes and tensors come with where they stand, for messages.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import AttributeProto

__all__ = ["graphs", "nodes", "tensors"]


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.g
        elif a.type == AttributeProto.GRAPHS:
            yield from a.graphs


def nodes(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.NodeProto]]:
    """(where: "graph 'g'" or "function 'f'", node) for every node, a subgraph's nodes right
    after the node that holds it."""

    def walk(items, where: str) -> Iterator[tuple[str, onnx.NodeProto]]:
        for node in items:
            yield where, node
            for sub in _subgraphs(node):
                yield from walk(sub.node, f"graph {sub.name!r}")

    yield from walk(model.graph.node, f"graph {model.graph.name!r}")
    for fn in model.functions:
        yield from walk(fn.node, f"function {fn.name!r}")


def graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph."""
    yield model.graph
    for _, node in nodes(model):
        yield from _subgraphs(node)


def tensors(model: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(where, tensor) for every initializer, sparse initializer part and attribute tensor,
    a graph's initializers before its nodes' attributes."""

    def graph(g: onnx.GraphProto) -> Iterator[tuple[str, onnx.TensorProto]]:
        for t in g.initializer:
            yield f"initializer {t.name!r}", t
        for s in g.sparse_initializer:
            yield f"initializer {s.values.name!r}", s.values
            yield f"initializer {s.values.name!r}", s.indices
        yield from attributes(g.node, f"graph {g.name!r}")

    def attributes(items, where: str) -> Iterator[tuple[str, onnx.TensorProto]]:
        for node in items:
            for a in node.attribute:
                at = f"{where}, attribute {a.name!r} of node {node.name or node.op_type!r}"
                if a.type == AttributeProto.TENSOR:
                    yield at, a.t
                elif a.type == AttributeProto.TENSORS:
                    for t in a.tensors:
                        yield at, t
                elif a.type == AttributeProto.SPARSE_TENSOR:
                    yield at, a.sparse_tensor.values
                elif a.type == AttributeProto.GRAPH:
                    yield from graph(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from graph(g)

    yield from graph(model.graph)
    for fn in model.functions:
        yield from attributes(fn.node, f"function {fn.name!r}")
