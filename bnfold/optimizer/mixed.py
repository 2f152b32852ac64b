"""INT8 with the operators that lose time or accuracy kept in fp32, chosen by measurement.

Starting from the best INT8 candidate's exclusions (none):

1. Time. For each operator type the graph quantizes (but dense Conv, whose exclusion is the
   fp32 graph; grouped Convs, depthwise ones among them, count as a type of their own),
   quantize again with every node of that type kept in fp32 and time it against the current
   graph (`timing.time_interleaved`, batch 1 and the larger batch); for a one-input type fed
   by Convs, also with those Convs in fp32 (fused with it there). The exclusion stays when it
   is faster by more than `MIN_GAIN` at every batch size.
2. Accuracy. While the budget is not met, rank the quantized nodes by how much error each
   adds (error of its output in the INT8 graph minus the largest error of its inputs, both
   against the fp32 graph on one batch), keep the worst `STEP` in fp32, and measure again;
   at most `MAX_ACCURACY_ROUNDS` rounds.

Nothing here comes from a fixed list of operator types: every choice is a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.optimizer.timing import make_session, time_interleaved

__all__ = ["MixedSearch", "search_mixed"]

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


def _added_error(
    fp32: onnx.ModelProto, quantized: onnx.ModelProto, feed: dict, candidates: list[str]
) -> list[tuple[float, str]]:
    """(error added, node) for fp32 nodes in `candidates`, worst first."""
    nodes = {n.name: n for n in fp32.graph.node}
    values = sorted({v for n in candidates for v in (*nodes[n].input, *nodes[n].output) if v})

    def run(model, values):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        produced = {o for n in m.graph.node for o in n.output}
        names = [v for v in values if v in produced or v in {i.name for i in m.graph.input}]
        for v in names:
            if v not in have:
                m.graph.output.append(
                    onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None)
                )
        session = make_session(m)
        outputs = [v for v in names if v in {o.name for o in session.get_outputs()}]
        return dict(zip(outputs, session.run(outputs, feed), strict=True))

    # in the INT8 graph a consumer sees a value after its Q/DQ pair: compare that one
    quantized_of = {
        n.input[0]: n.output[0] for n in quantized.graph.node if n.op_type == "QuantizeLinear"
    }
    dequantized_of = {
        n.input[0]: n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"
    }
    seen = {v: dequantized_of.get(quantized_of.get(v, ""), v) for v in values}
    ref = run(fp32, values)
    got_seen = run(quantized, list(set(seen.values())))
    got = {v: got_seen[s] for v, s in seen.items() if s in got_seen}

    def err(v: str) -> float:
        if v not in ref or v not in got or ref[v].dtype != np.float32:
            return 0.0
        scale = float(np.linalg.norm(ref[v])) or 1.0
        return float(np.linalg.norm(got[v] - ref[v])) / scale

    ranked = []
    for name in candidates:
        node = nodes[name]
        out = max(err(v) for v in node.output)
        into = max([err(v) for v in node.input if v] or [0.0])
        ranked.append((out - into, name))
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
) -> MixedSearch:
    """Steps 1 and 2 above. `quantize(exclude)` gives the INT8 graph with those nodes in fp32;
    `evaluate(model)` gives (budget met, accuracy)."""
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
    met, _acc = evaluate(current)
    feed = next(iter(timing_feeds.values()))
    for _round in range(MAX_ACCURACY_ROUNDS):  # step 2
        if met:
            break
        left = [
            n
            for ns in _quantized_types(fp32, current).values()
            for n in ns
            if n not in search.exclude
        ]
        if not left:
            break
        worst = [name for _e, name in _added_error(fp32, current, feed, left)[:STEP]]
        search.exclude += worst
        current = quantize(search.exclude)
        met, acc = evaluate(current)
        search.trials.append(
            {
                "fp32_for_accuracy": worst,
                "rel_l2": acc["rel_l2"],
                "top1_agreement": acc.get("top1_agreement"),
                "budget_met": met,
            }
        )
    search.model = current
    return search
