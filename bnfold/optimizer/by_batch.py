"""One graph that runs a different candidate at each batch size: where no candidate is the
fastest at every batch (on the AMD EPYC of docs/BENCHMARKS.md run 7, EfficientNet-B0's INT8
graphs were 8% slower than fp32 at batch 1 and 15% faster at batch 8), the per-batch winners
are joined under an ONNX ``If`` on the batch size, so one artifact and one session serve each
batch size with the graph measured fastest there.

`plan` decides from the timings (which candidate at which batch, or none), `crossover` moves
the boundary up over batch sizes timed between the two; `route_by_batch`
builds the graph: the small-batch graph and the large-batch graph become the two branches,
their names prefixed apart, reading the graph inputs from the outer scope; the condition is
``Gather(Shape(first input), 0) <= max_small``. Each branch runs as its own graph does, so
the routed graph's outputs are the branch graph's own (tests check it bit for bit), and its
accuracy is the worse branch's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import onnx
from onnx import TensorProto, helper

__all__ = ["Routing", "crossover", "plan", "route_by_batch"]

_PREFIX = "__by_batch"


@dataclass(frozen=True)
class Routing:
    small: str  # candidate run at batch <= max_small
    large: str  # candidate run above
    max_small: int
    why: str
    between: dict[int, float] = field(default_factory=dict)  # batch -> small's time / large's

    @property
    def name(self) -> str:
        return f"by_batch:{self.small}|{self.large}"

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _batch(label: str) -> int:
    return int(label.split("=")[1])


def plan(
    ratios: Mapping[str, Mapping[str, float]],
    budget_met: Mapping[str, bool],
    noise: float,
    *,
    reference: str = "fp32",
) -> Routing | None:
    """The routing worth building, or None. `ratios`: candidate -> "batch=N" -> its time over
    the reference's (the reference is 1.0 everywhere); two batch sizes at least.

    Built only when the fastest candidate within the budget differs between the smallest and
    the largest batch timed and no single candidate is within `noise` of the fastest at both:
    otherwise one graph does as well and needs half the weights."""
    eligible = {
        name: by_batch
        for name, by_batch in ratios.items()
        if by_batch and (name == reference or budget_met.get(name, False))
    }
    eligible.setdefault(reference, {})
    batches = sorted({b for r in ratios.values() for b in r}, key=_batch)
    if len(batches) < 2:
        return None
    small, large = batches[0], batches[-1]

    def ratio(name: str, batch: str) -> float:
        return 1.0 if name == reference else eligible[name].get(batch, float("inf"))

    best = {b: min(eligible, key=lambda n, b=b: ratio(n, b)) for b in (small, large)}
    if best[small] == best[large]:
        return None
    for name in eligible:
        if all(ratio(name, b) <= ratio(best[b], b) * (1.0 + noise) for b in (small, large)):
            return None
    return Routing(
        best[small],
        best[large],
        _batch(small),
        f"{best[small]} is the fastest at {small} ({ratio(best[small], small):.3f}x fp32's "
        f"time, {best[large]} {ratio(best[large], small):.3f}x), {best[large]} at {large} "
        f"({ratio(best[large], large):.3f}x, {best[small]} {ratio(best[small], large):.3f}x); "
        f"A/A noise {noise:.3f}",
    )


def crossover(routing: Routing, between: Mapping[int, float]) -> Routing:
    """`routing` with `max_small` the largest batch up to which the small-batch graph stays
    the faster one: `between` holds its time over the large-batch graph's at batch sizes
    between the two timed (measured by the caller), walked upwards until it is no faster."""
    max_small = routing.max_small
    for batch in sorted(between):
        if batch <= max_small or not between[batch] < 1.0:
            break
        max_small = batch
    return replace(routing, max_small=max_small, between=dict(between))


def _as_branch(model: onnx.ModelProto, prefix: str) -> onnx.GraphProto:
    """`model`'s graph with every name it defines prefixed and no inputs of its own (a
    branch reads the graph inputs from the outer scope). Its weights stay its own
    initializers: onnxruntime optimizes a branch like a graph (NCHWc convs, fused SiLU and
    QLinear kernels on EfficientNet-B0, the same node counts as the graph alone); with the
    weights moved to the outer graph the fp32 branch ran 1.89x slower (docs/BENCHMARKS.md)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    inputs = {i.name for i in graph.input}
    renamed: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in inputs:
            return name
        return renamed.setdefault(name, f"{prefix}/{name}")

    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for tensor in graph.sparse_initializer:
        tensor.values.name = rename(tensor.values.name)
    for node in graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ValueError(
                f"node {node.name!r} ({node.op_type}) has subgraphs of its own: a graph with "
                "control flow is not routed by batch"
            )
        node.name = f"{prefix}/{node.name}" if node.name else ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    for info in (*graph.value_info, *graph.output):
        info.name = rename(info.name)
    del graph.input[:]
    graph.name = prefix
    return graph


def _opsets(*models: onnx.ModelProto) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    versions[""] = max(versions.get("", 0), 13)
    return [helper.make_opsetid(domain, version) for domain, version in versions.items()]


def _scalar(name: str, value: int) -> onnx.NodeProto:
    """A Constant node of one int64 ``value``, output ``{_PREFIX}/{name}``."""
    return helper.make_node(
        "Constant",
        [],
        [f"{_PREFIX}/{name}"],
        name=f"{_PREFIX}/{name}",
        value=helper.make_tensor(name, TensorProto.INT64, [], [value]),
    )


def route_by_batch(
    small: onnx.ModelProto, large: onnx.ModelProto, max_small: int = 1
) -> onnx.ModelProto:
    """`small` at batch <= `max_small` (dim 0 of the first input), `large` above. Both must
    have the same inputs and outputs (names, element types)."""

    def signature(model: onnx.ModelProto, which: str) -> list[tuple[str, int]]:
        values = model.graph.input if which == "input" else model.graph.output
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    for which in ("input", "output"):
        if signature(small, which) != signature(large, which):
            raise ValueError(
                f"the two graphs' {which}s differ: {signature(small, which)} against "
                f"{signature(large, which)}"
            )
    if not small.graph.input:
        raise ValueError("a graph without inputs has no batch size to route by")
    first = small.graph.input[0].name
    nodes = [
        helper.make_node("Shape", [first], [f"{_PREFIX}/shape"], name=f"{_PREFIX}/Shape"),
        _scalar("zero", 0),
        helper.make_node(
            "Gather",
            [f"{_PREFIX}/shape", f"{_PREFIX}/zero"],
            [f"{_PREFIX}/batch"],
            name=f"{_PREFIX}/Batch",
        ),
        _scalar("max_small", max_small),
        helper.make_node(
            "LessOrEqual",
            [f"{_PREFIX}/batch", f"{_PREFIX}/max_small"],
            [f"{_PREFIX}/is_small"],
            name=f"{_PREFIX}/IsSmall",
        ),
        helper.make_node(
            "If",
            [f"{_PREFIX}/is_small"],
            [o.name for o in small.graph.output],
            name=f"{_PREFIX}/If",
            then_branch=_as_branch(small, f"{_PREFIX}_small"),
            else_branch=_as_branch(large, f"{_PREFIX}_large"),
        ),
    ]
    graph = helper.make_graph(
        nodes, large.graph.name or "routed", list(small.graph.input), list(small.graph.output)
    )
    model = helper.make_model(graph, opset_imports=_opsets(small, large))
    model.ir_version = max(small.ir_version, large.ir_version)
    model.producer_name = large.producer_name
    model.producer_version = large.producer_version
    names = {f.name for f in large.functions}
    model.functions.extend([*large.functions, *(f for f in small.functions if f.name not in names)])
    helper.set_model_props(
        model, {**{p.key: p.value for p in large.metadata_props}, "bnfold.by_batch": str(max_small)}
    )
    return model
