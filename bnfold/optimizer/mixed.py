"""INT8 with the operators that lose time or accuracy kept in fp32, chosen by measurement.

Starting from the best INT8 candidate's exclusions (none):

1. Time. For each operator type the graph quantizes (but dense Conv, whose exclusion is the
   fp32 graph; grouped Convs, depthwise ones among them, count as a type of their own),
   quantize again with every node of that type kept in fp32 and time it against the current
   graph (`timing.time_interleaved`, batch 1 and the larger batch); for a one-input type fed
   by Convs, also with those Convs in fp32 (fused with it there). The exclusion stays when it
   is faster by more than `MIN_GAIN` at every batch size.
2. Accuracy. While the budget is not met, rank the quantized nodes by their sensitivity: the
   error at the graph's outputs when that node alone runs as in the INT8 graph (weights and
   inputs through its Q/DQ pairs, everything else fp32; `output_sensitivity`, on one batch of
   the accuracy inputs), keep the worst `STEP` in fp32, and measure again; the exclusion stays
   where it meets the budget or lowers the error; at most `MAX_ACCURACY_ROUNDS` rounds.

Nothing here comes from a fixed list of operator types: every choice is a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.optimizer.timing import make_session, time_interleaved

__all__ = ["MixedSearch", "output_sensitivity", "search_mixed"]

MIN_GAIN = 0.03
GROUPED = "Conv (grouped)"  # grouped Convs are tried apart from the others
STEP = 2
MAX_ACCURACY_ROUNDS = 2
_LAYOUT_OPS = {
    "Reshape",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
    "Gather",
    "Split",
    "Identity",
    "Shape",
    "Slice",
    "Expand",
    "Resize",
    "Pad",
}


@dataclass
class MixedSearch:
    exclude: list[str] = field(default_factory=list)
    model: onnx.ModelProto | None = None
    trials: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"excluded_nodes": len(self.exclude), "trials": self.trials}


def _geo(*ratios: float) -> float:
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def _quantized_types(fp32: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names by op type, for the fp32 nodes that the INT8 graph feeds from DQ nodes."""
    dq_outputs = {
        o for n in quantized.graph.node if n.op_type == "DequantizeLinear" for o in n.output
    }
    quantized_names = {
        n.name for n in quantized.graph.node if any(i in dq_outputs for i in n.input)
    }
    types: dict[str, list[str]] = {}
    for node in fp32.graph.node:
        if node.name in quantized_names and node.op_type not in _LAYOUT_OPS:
            kind = GROUPED if _is_grouped(node) else node.op_type
            types.setdefault(kind, []).append(node.name)
    return types


def _trials(fp32: onnx.ModelProto, types: dict[str, list[str]]) -> list[tuple[str, list[str]]]:
    """Step 1's trials, in order: each quantized op type but dense Conv kept in fp32; and
    after a type whose nodes all take one input, some from a Conv, that type with those Convs
    in fp32 as well, so onnxruntime can fuse them in fp32 (MobileNetV3's Conv + HardSwish:
    in INT8 each HardSwish runs in fp32 between a DequantizeLinear and a QuantizeLinear)."""
    nodes = {n.name: n for n in fp32.graph.node}
    producer = {o: n for n in fp32.graph.node for o in n.output}
    trials = []
    for op_type, names in sorted(types.items()):
        if op_type == "Conv":
            continue
        trials.append((op_type, names))
        if not all(len([i for i in nodes[n].input if i]) == 1 for n in names):
            continue
        feeding = [producer.get(nodes[n].input[0]) for n in names]
        convs = [c.name for c in feeding if c is not None and c.op_type == "Conv"]
        if convs:
            trials.append((f"{op_type} with the Convs before it", names + convs))
    return trials


def _is_grouped(node: onnx.NodeProto) -> bool:
    """A grouped Conv (depthwise ones in MobileNets and EfficientNets): its own trial in step
    1, since what INT8 gains on it differs from dense Convs (measured: 1.14-1.43x slower in
    fp32 on a VNNI CPU, docs/BENCHMARKS.md runs 7-8)."""
    if node.op_type != "Conv":
        return False
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return group > 1


def _alone_in_int8(fp32: onnx.ModelProto, quantized: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The fp32 graph with node `name` alone run as in the INT8 graph: each of its inputs
    through the DequantizeLinear (and QuantizeLinear) nodes that feed it there, with their
    scales, zero points and quantized weights."""
    producer = {o: n for n in quantized.graph.node for o in n.output}
    initializers = {t.name: t for t in quantized.graph.initializer}
    target = next(n for n in quantized.graph.node if n.name == name)
    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    node = next(n for n in model.graph.node if n.name == name)
    added: list[onnx.NodeProto] = []
    have = {t.name for t in model.graph.initializer}
    for i, value in enumerate(target.input):
        dq = producer.get(value)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        chain = [q, dq] if q is not None and q.op_type == "QuantizeLinear" else [dq]
        for n in chain:
            for v in n.input:
                if v in initializers and v not in have:
                    model.graph.initializer.append(initializers[v])
                    have.add(v)
        # fresh names: a weight's DQ output keeps the weight's name, which the fp32 graph
        # still holds as an initializer
        copies = [onnx.NodeProto() for _ in chain]
        for copy, n in zip(copies, chain, strict=True):
            copy.CopyFrom(n)
            copy.name = f"{n.name}__alone"
            copy.output[0] = f"{n.output[0]}__alone"
        if len(copies) == 2:
            copies[1].input[0] = copies[0].output[0]
        added += copies
        node.input[i] = copies[-1].output[0]
    position = list(model.graph.node).index(node)
    for k, n in enumerate(added):
        model.graph.node.insert(position + k, n)
    return model


def output_sensitivity(
    fp32: onnx.ModelProto, quantized: onnx.ModelProto, feed: dict, candidates: list[str]
) -> list[tuple[float, str]]:
    """(relative L2 error at the graph's outputs with that node alone in INT8, node), worst
    first: AIMET's per-layer quantization sensitivity (QuantAnalyzer), measured on `feed`
    against the fp32 graph. A node's error is judged by what it does to the outputs, not to
    its own output, where a layer that amplifies what comes before it (a stem conv, a first
    depthwise conv) looks harmless."""
    ref = make_session(fp32).run(None, feed)
    norm = math.sqrt(sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)) or 1.0
    quantized_names = {n.name for n in quantized.graph.node}
    ranked = []
    for name in candidates:
        if name not in quantized_names:
            continue
        outs = make_session(_alone_in_int8(fp32, quantized, name)).run(None, feed)
        err = math.sqrt(
            sum(
                float(np.sum((o.astype(np.float64) - r) ** 2))
                for o, r in zip(outs, ref, strict=True)
            )
        )
        ranked.append((err / norm, name))
    return sorted(ranked, reverse=True)


def search_mixed(
    fp32: onnx.ModelProto,
    quantize: Callable[[list[str]], onnx.ModelProto],
    evaluate: Callable[[onnx.ModelProto], tuple[bool, dict]],
    timing_feeds: dict[str, dict],
    *,
    threads: int | None,
    rounds: int,
    progress: Callable[[], None] | None = None,
    accuracy_feed: dict | None = None,
) -> MixedSearch:
    """Steps 1 and 2 above. `quantize(exclude)` gives the INT8 graph with those nodes in fp32;
    `evaluate(model)` gives (budget met, accuracy); `accuracy_feed` is the batch step 2 ranks
    the nodes on (else the first timing feed)."""
    search = MixedSearch()
    current = quantize([])
    types = _quantized_types(fp32, current)
    for op_type, names in _trials(fp32, types):  # step 1
        if progress:
            progress()
        new = [n for n in names if n not in search.exclude]
        if not new:
            continue
        trial = quantize(search.exclude + new)
        ratios = [
            time_interleaved(
                {"current": current, "trial": trial},
                feeds,
                reference="current",
                threads=threads,
                rounds=rounds,
            )["trial"]["ratio"]
            for feeds in timing_feeds.values()
        ]
        # faster at every batch size, not on average: one noisy batch must not decide
        kept = all(1.0 - r > MIN_GAIN for r in ratios)
        search.trials.append(
            {"fp32": op_type, "nodes": len(new), "time_ratio": _geo(*ratios), "kept": kept}
        )
        if kept:
            search.exclude += new
            current = trial
    met, acc = evaluate(current)
    feed = accuracy_feed or next(iter(timing_feeds.values()))
    # a node's sensitivity is measured with every other node in fp32, so excluding some does
    # not change the others': ranked once, taken STEP at a time
    ranked: list[tuple[float, str]] = []
    if not met:
        quantized = [n for ns in _quantized_types(fp32, current).values() for n in ns]
        left = [n for n in quantized if n not in search.exclude]
        ranked = output_sensitivity(fp32, current, feed, left)
    for round_ in range(MAX_ACCURACY_ROUNDS):  # step 2
        chunk = ranked[round_ * STEP : (round_ + 1) * STEP]
        if met or not chunk:
            break
        worst = [name for _e, name in chunk]
        trial = quantize(search.exclude + worst)
        trial_met, trial_acc = evaluate(trial)
        # an exclusion stays only where it meets the budget or lowers the error
        kept = trial_met or trial_acc["rel_l2"] < acc["rel_l2"]
        search.trials.append(
            {
                "fp32_for_accuracy": worst,
                "output_rel_l2_alone": [round(e, 6) for e, _name in chunk],
                "rel_l2": trial_acc["rel_l2"],
                "top1_agreement": trial_acc.get("top1_agreement"),
                "budget_met": trial_met,
                "kept": kept,
            }
        )
        if not kept:
            break
        search.exclude += worst
        current, met, acc = trial, trial_met, trial_acc
    search.model = current
    return search
