"""The observer graph: an ONNX graph whose outputs are the moments of every BN's input.

Built from the *original* (unfolded) graph: folding removes each BatchNormalization, and with
it the running statistics the monitor compares against and the node recalibration rewrites.

For each top-level ``BatchNormalization`` X -> Y whose mean and variance are initializers (a
site), the graph gets three outputs, computed in float64 over all but the channel axis:

    <prefix>.<i>.mean   [C]  per-channel mean of X over the batch (and positions)
    <prefix>.<i>.var    [C]  biased per-channel variance, two-pass (no cancellation)
    <prefix>.<i>.shape  [3]  shape of X seen as [N, C, L]: the count is N * L

The model's own outputs are dropped, so onnxruntime prunes what only they need.

1. Monitoring (``batch_stats=False``): the network runs as served (eval mode), so each window
   is compared with the statistics the served graph normalizes by.
2. Recalibration (``batch_stats=True``): each BN is also replaced by normalization with its
   batch's own statistics, as ``bnfold.recalibrate`` puts torch BNs in train mode, so each BN
   sees the inputs it would see while its statistics are gathered.

Skips are data: BNs with more than one output (training mode) or with non-constant
statistics are returned as ``skipped`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["PREFIX", "BNSite", "Observer", "bn_sites", "observer_graph"]

PREFIX = "bnfold_drift"


@dataclass(frozen=True)
class BNSite:
    """One BatchNormalization of the graph and its statistics."""

    name: str  # the torch module name where the export kept it, else the node's name
    node_index: int
    input: str  # the tensor whose moments are observed
    mean_name: str
    var_name: str
    mean: np.ndarray
    var: np.ndarray
    eps: float

    def outputs(self, index: int) -> tuple[str, str, str]:
        return tuple(f"{PREFIX}.{index}.{k}" for k in ("mean", "var", "shape"))


@dataclass
class Observer:
    model: onnx.ModelProto
    sites: list[BNSite]
    skipped: list[dict[str, str]] = field(default_factory=list)

    def output_names(self) -> list[str]:
        return [n for i, _ in enumerate(self.sites) for n in self.sites[i].outputs(i)]


def _site_name(node: onnx.NodeProto, mean_name: str, index: int) -> str:
    if mean_name.endswith(".running_mean"):
        return mean_name[: -len(".running_mean")]
    return node.name or f"BatchNormalization_{index}"


def bn_sites(model: onnx.ModelProto) -> tuple[list[BNSite], list[dict[str, str]]]:
    """The graph's BN sites, in graph order, and the BNs skipped with why."""
    inits = {t.name: t for t in model.graph.initializer}
    sites, skipped = [], []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        label = node.name or node.output[0]
        if len([o for o in node.output if o]) > 1:
            skipped.append({"node": label, "reason": "training-mode BatchNormalization"})
            continue
        mean_name, var_name = node.input[3], node.input[4]
        if mean_name not in inits or var_name not in inits:
            skipped.append({"node": label, "reason": "running statistics are not constants"})
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        sites.append(
            BNSite(
                _site_name(node, mean_name, len(sites)),
                index,
                node.input[0],
                mean_name,
                var_name,
                numpy_helper.to_array(inits[mean_name]).astype(np.float64).reshape(-1),
                numpy_helper.to_array(inits[var_name]).astype(np.float64).reshape(-1),
                float(eps),
            )
        )
    return sites, skipped


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def observer_graph(model: onnx.ModelProto, batch_stats: bool = False) -> Observer:
    """The observer of ``model`` (which is not changed); see the module docstring."""
    sites, skipped = bn_sites(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    new_axes = _opset(model) >= 18  # ReduceMean takes its axes as an input from opset 18
    consts = {
        "flat3": np.array([0, 0, -1], np.int64),
        "flat1": np.array([-1], np.int64),
        "chan": np.array([1, -1, 1], np.int64),
        "axes": np.array([0, 2], np.int64),
    }
    for key, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(value, f"{PREFIX}.{key}"))

    def reduce_mean(x: str, y: str) -> onnx.NodeProto:
        if new_axes:
            return helper.make_node("ReduceMean", [x, f"{PREFIX}.axes"], [y], keepdims=1)
        return helper.make_node("ReduceMean", [x], [y], axes=[0, 2], keepdims=1)

    replaced: dict[int, list[onnx.NodeProto]] = {}
    stat_outputs = []
    added: list[onnx.NodeProto] = []
    for i, site in enumerate(sites):
        p = f"{PREFIX}.{i}"
        mean_out, var_out, shape_out = site.outputs(i)
        nodes = [
            helper.make_node("Reshape", [site.input, f"{PREFIX}.flat3"], [f"{p}.x3"]),
            helper.make_node("Cast", [f"{p}.x3"], [f"{p}.x64"], to=TensorProto.DOUBLE),
            reduce_mean(f"{p}.x64", f"{p}.mean3"),
            helper.make_node("Sub", [f"{p}.x64", f"{p}.mean3"], [f"{p}.dev"]),
            helper.make_node("Mul", [f"{p}.dev", f"{p}.dev"], [f"{p}.sq"]),
            reduce_mean(f"{p}.sq", f"{p}.var3"),
            helper.make_node("Reshape", [f"{p}.mean3", f"{PREFIX}.flat1"], [mean_out]),
            helper.make_node("Reshape", [f"{p}.var3", f"{PREFIX}.flat1"], [var_out]),
            helper.make_node("Shape", [f"{p}.x3"], [shape_out]),
        ]
        if batch_stats:
            bn = model.graph.node[site.node_index]
            nodes += _batch_norm_by_batch(bn, p, site.eps, graph)
            replaced[site.node_index] = nodes
        else:
            added += nodes
        for name, elem in ((mean_out, TensorProto.DOUBLE), (var_out, TensorProto.DOUBLE)):
            stat_outputs.append(helper.make_tensor_value_info(name, elem, [len(site.mean)]))
        stat_outputs.append(helper.make_tensor_value_info(shape_out, TensorProto.INT64, [3]))
    if replaced:
        kept = []
        for index, node in enumerate(graph.node):
            kept += replaced.get(index, [node])
        del graph.node[:]
        graph.node.extend(kept)
    graph.node.extend(added)  # each after its input's producer: appended at the end
    del graph.output[:]
    graph.output.extend(stat_outputs)
    return Observer(out, sites, skipped)


def _batch_norm_by_batch(
    bn: onnx.NodeProto, p: str, eps: float, graph: onnx.GraphProto
) -> list[onnx.NodeProto]:
    """Y = (X - batch mean) / sqrt(batch var + eps) * scale + bias, in X's dtype, X's shape."""
    x, scale, bias = bn.input[0], bn.input[1], bn.input[2]
    graph.initializer.append(numpy_helper.from_array(np.array(eps, np.float64), f"{p}.eps"))
    # the normalization runs in the parameters' dtype (the input's), as torch's does
    elem = next((t.data_type for t in graph.initializer if t.name == scale), TensorProto.FLOAT)
    return [
        helper.make_node("Add", [f"{p}.var3", f"{p}.eps"], [f"{p}.var_eps"]),
        helper.make_node("Sqrt", [f"{p}.var_eps"], [f"{p}.std64"]),
        helper.make_node("Cast", [f"{p}.mean3"], [f"{p}.mean_x"], to=elem),
        helper.make_node("Cast", [f"{p}.std64"], [f"{p}.std_x"], to=elem),
        helper.make_node("Sub", [f"{p}.x3", f"{p}.mean_x"], [f"{p}.centred"]),
        helper.make_node("Div", [f"{p}.centred", f"{p}.std_x"], [f"{p}.normed"]),
        helper.make_node("Reshape", [scale, f"{PREFIX}.chan"], [f"{p}.scale3"]),
        helper.make_node("Reshape", [bias, f"{PREFIX}.chan"], [f"{p}.bias3"]),
        helper.make_node("Mul", [f"{p}.normed", f"{p}.scale3"], [f"{p}.scaled"]),
        helper.make_node("Add", [f"{p}.scaled", f"{p}.bias3"], [f"{p}.y3"]),
        helper.make_node("Shape", [x], [f"{p}.xshape"]),
        helper.make_node("Reshape", [f"{p}.y3", f"{p}.xshape"], [bn.output[0]]),
    ]


class ObserverSession:
    """An onnxruntime session of an observer graph: feeds in, per-site moments out."""

    def __init__(self, observer: Observer, intra_op_threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        self.observer = observer
        self.session = ort.InferenceSession(
            observer.model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._names = observer.output_names()

    def moments(
        self, feeds: dict[str, np.ndarray]
    ) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """By site name: (batch mean [C], biased batch variance [C], values per channel)."""
        values = self.session.run(self._names, {k: feeds[k] for k in self.input_names})
        out = {}
        for i, site in enumerate(self.observer.sites):
            mean, var, shape = values[3 * i : 3 * i + 3]
            out[site.name] = (mean, var, int(shape[0]) * int(shape[2]))
        return out
