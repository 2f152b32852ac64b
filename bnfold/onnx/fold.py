"""fold_onnx: remove every foldable BatchNormalization from an ONNX graph.

The pass, per BatchNormalization node (subgraphs of If/Loop/Scan included):

1. Read the BN as y = s * x + t; a BN in training mode, or with non-constant statistics, is
   kept with that reason. A parameter or weight computed from constants alone (an Identity
   in front of a deduplicated initializer, Transpose(W), DequantizeLinear) is a constant,
   evaluated once (``bnfold.onnx.constants``).
2. A BN over a constant (weight standardization) is computed once. Otherwise try the
   backward patterns (fold into the producer of x), then the forward one (fold into every
   consumer of y). The first that plans a fold applies it; otherwise the BN is kept and its
   entry carries every pattern's reason.
3. Repeat over the whole graph until a round changes nothing: a forward fold into a Conv can
   make the next BN's producer foldable.
4. With ``merge_branches`` (the default), then merge sums of parallel Conv / BN / identity
   branches of one input into one Conv (``bnfold.onnx.branches``); a BN merged this way is
   reported as merged into that Conv. If a sum merged, go back to step 3: a BN after the sum
   now follows a Conv.
5. With ``merge_branches`` too, compose sequential affine layers (Gemm / MatMul -> Gemm /
   MatMul, 1x1 Conv -> Conv) into one where that is exact and cheaper
   (``bnfold.onnx.compose``): the BN between them may have just folded away.

Graph inputs, outputs and their names survive: a folded node takes over the BN output's name.
A model whose tensors live in external files is read only from an explicit ``base_dir``.
A graph with nothing to fold or merge comes back as the very object passed in, so a second
run is a no-op.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from bnfold.onnx.branches import merge_branches as merge_branch_sums
from bnfold.onnx.compose import compose_affine
from bnfold.onnx.constants import ConstantEvaluator
from bnfold.onnx.external_data import load_external_data
from bnfold.onnx.patterns import BACKWARD, FORWARD, PRECOMPUTE
from bnfold.onnx.patterns.base import FoldContext, Plan, bn_label, is_op, node_label
from bnfold.report import Action, BNEntry, ComposeEntry, FoldReport, MergeEntry

__all__ = ["OnnxFoldResult", "count_nodes", "fold_onnx"]

logger = logging.getLogger(__name__)


@dataclass
class OnnxFoldResult:
    model: onnx.ModelProto
    report: FoldReport
    modified: bool = False
    nodes_before: int = 0
    nodes_after: int = 0

    def to_dict(self) -> dict:
        return {
            "report": self.report.to_dict(),
            "modified": self.modified,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def count_nodes(model: onnx.ModelProto) -> int:
    """Nodes in the main graph and, recursively, in its subgraphs."""

    def count(graph: onnx.GraphProto) -> int:
        total = len(graph.node)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    total += count(attr.g)
                total += sum(count(g) for g in attr.graphs)
        return total

    return count(model.graph)


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple | None]:
    """Shapes by value name from onnx shape inference (a dim is an int or None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # shape inference is a help, never a requirement
        logger.info("shape inference failed, folding with declared shapes only: %s", exc)
        return {}
    shapes: dict[str, tuple | None] = {}
    for graph in _graphs(inferred.graph):
        for info in (*graph.input, *graph.value_info, *graph.output):
            tensor_type = info.type.tensor_type
            if info.type.HasField("tensor_type") and tensor_type.HasField("shape"):
                dims = tensor_type.shape.dim
                shapes[info.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims
                )
    return shapes


def _value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.update(v.name for v in node.outputs if v.name)
        names.add(node.name or "")
        for sub in node.attributes.values():
            subgraphs = {ir.AttributeType.GRAPH: [sub.value], ir.AttributeType.GRAPHS: sub.value}
            for g in subgraphs.get(sub.type, []):
                names.update(v.name for v in g.inputs)
                names.update(g.initializers)
    return names


def _fold_one(bn: ir.Node, ctx: FoldContext) -> BNEntry:
    """Steps 1 and 2 for one BN; the entry says what happened."""
    label = bn_label(bn)
    affine = ctx.bn_affine(bn)
    if isinstance(affine, str):
        return BNEntry(label, "BatchNormalization", Action.KEPT, reason=affine)
    reasons: list[str] = []
    for direction, patterns in (
        ("precompute", PRECOMPUTE),
        ("backward", BACKWARD),
        ("forward", FORWARD),
    ):
        tried = False
        for pattern in patterns:
            outcome = pattern.match(bn, affine, ctx)
            if isinstance(outcome, Plan):
                outcome.apply()
                return BNEntry(
                    label,
                    "BatchNormalization",
                    pattern.action,
                    targets=outcome.targets,
                    reason=outcome.note or pattern.description,
                )
            if isinstance(outcome, str):
                tried = True
                reasons.append(f"{direction}: {outcome}")
        if not tried and direction == "backward":
            producer = affine.x.producer()
            source = node_label(producer) if producer is not None else "a graph input"
            reasons.append(f"backward: input comes from {source}, not an affine layer")
    return BNEntry(label, "BatchNormalization", Action.KEPT, reason="; ".join(reasons))


def _merged_bns(
    bns: list[ir.Node], kept: dict[int, BNEntry], merges: list[MergeEntry]
) -> list[BNEntry]:
    """Step 4: the kept BNs that a merge removed, as merged into its Conv (out of `kept`)."""
    into = {label: m.into for m in merges if m.into for label in m.branches}
    out = []
    for bn in bns:
        entry = kept.get(id(bn))
        if bn.graph is None and entry is not None and entry.name in into:
            del kept[id(bn)]
            reason = "a branch of a sum of parallel branches, merged into one conv"
            out.append(BNEntry(entry.name, entry.kind, Action.MERGED, [into[entry.name]], reason))
    return out


def fold_onnx(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    merge_branches: bool = True,
) -> OnnxFoldResult:
    """Fold every foldable BatchNormalization of `model` (a ModelProto or a path).

    `base_dir` is required, and is the only directory read, when the model keeps tensors in
    external data files (ExternalDataError otherwise). The returned model holds all tensors
    inline. `merge_branches`: after folding, merge sums of parallel branches of one input
    (RepVGG, MobileOne, ACNet blocks) into one Conv, and compose sequential affine layers
    into one where that is cheaper.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    model = load_external_data(model, base_dir)
    nodes_before = count_nodes(model)
    ir_model = ir.from_proto(model)
    opset = ir_model.opset_imports.get("", ir_model.opset_imports.get("ai.onnx"))
    ctx = FoldContext(
        shapes=_inferred_shapes(model),
        names=_value_names(ir_model.graph),
        constants=ConstantEvaluator(opset=opset),
    )

    entries: dict[int, BNEntry] = {}  # kept BNs by node identity, latest reason
    folded: list[BNEntry] = []
    merged: list[MergeEntry] = []
    left: list[MergeEntry] = []  # sums the last merge pass could not merge
    for _round in range(nodes_before + 1):  # steps 3, 4; each round folds or merges something
        changed = False
        bns = [
            n
            for n in ir.traversal.RecursiveGraphIterator(ir_model.graph)
            if is_op(n, "BatchNormalization")
        ]
        for bn in bns:
            if bn.graph is None:  # removed by an earlier fold in this round
                continue
            entry = _fold_one(bn, ctx)
            if entry.action is Action.KEPT:
                entries[id(bn)] = entry
            else:
                entries.pop(id(bn), None)
                folded.append(entry)
                changed = True
                logger.debug("folded %s %s into %s", entry.name, entry.action, entry.targets)
        if changed:
            continue
        if not merge_branches:
            break
        merges = merge_branch_sums(ir_model.graph, ctx)
        merged += [m for m in merges if m.into]
        left = [m for m in merges if not m.into]
        if len(left) == len(merges):
            break
        # a BN after a merged sum now follows a Conv: back to step 3 (RepViT's
        # BN(conv(x) + conv1x1(x) + x))
        folded += _merged_bns(bns, entries, merges)

    compositions: list[ComposeEntry] = []
    if merge_branches:  # step 5
        compositions = compose_affine(ir_model.graph, ctx)
    report = FoldReport(
        entries=[*folded, *entries.values()],
        merges=[*merged, *left],
        compositions=compositions,
    )
    if any(is_op(n, "BatchNormalization") for f in ir_model.functions.values() for n in f):
        report.notes.append("BatchNormalization inside model-local functions is left intact")
    if not folded and not merged and not any(c.into for c in compositions):
        return OnnxFoldResult(model, report, False, nodes_before, nodes_before)
    out = ir.to_proto(ir_model)
    return OnnxFoldResult(out, report, True, nodes_before, count_nodes(out))
