"""Input alignment on an ONNX graph: fit the input's per-channel gain and bias, and put them in
front of the graph (``alignment`` has the math and why).

1. The first BatchNormalization site in graph order is the one fitted; a graph with one
   floating-point input of at most ``MAX_CHANNELS`` channels (axis 1) qualifies.
2. The basis (the site's input for zeros, for each channel of the data alone, for ones in each
   channel) runs through a copy of the graph whose only output is that tensor.
3. The fit is checked against a real run of the fitted input: a path to the first BN that is
   not affine (an activation before it) is reported and nothing is changed.
4. A map is kept only when it at least halves the first BN's distance from its running
   statistics (``MIN_IMPROVEMENT``): data that already looks like training data is left alone.
   One map from each start (gain +1, gain -1) can be kept, best first: the first BN's moments
   may not tell them apart, and ``recalibrate_onnx`` decides on the sites after it.

The result is the graph with ``Mul`` and ``Add`` nodes between its input and the nodes that read
it, so that the served graph, its observer and its recalibration all see the aligned input.
Skips are data: ``applied=False`` with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.drift.alignment import AffineFit, BasisMoments, fit_input_affine
from bnfold.drift.observer import bn_sites

__all__ = ["AlignedGraph", "InputAlignment", "align_input_onnx"]

MAX_CHANNELS = 16
MAX_FIT_SAMPLES = 256
MAX_FIT_VALUES = 1 << 20  # values per channel of the first BN's input: enough batches seen
CHECK_SAMPLES = 4  # the affine model of the path is checked on this many
MIN_IMPROVEMENT = 0.5  # applied when the fitted loss is at most this fraction of the identity's
AFFINE_RTOL = 1e-3
PREFIX = "bnfold_align"


@dataclass
class AlignedGraph:
    model: onnx.ModelProto
    fit: AffineFit


@dataclass
class InputAlignment:
    model: onnx.ModelProto  # with the map in front when applied, else the graph given
    applied: bool
    reason: str
    site: str | None = None
    fit: AffineFit | None = None
    candidates: list[AlignedGraph] = field(default_factory=list)  # one per start kept, best first

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"applied": self.applied, "reason": self.reason, "site": self.site}
        if self.fit is not None:
            out.update(self.fit.to_dict())
        return out


def _skip(model: onnx.ModelProto, reason: str, site=None, fit=None) -> InputAlignment:
    return InputAlignment(model, False, reason, site, fit)


def _probe(model: onnx.ModelProto, tensor: str):
    """A session of ``model`` whose one output is ``tensor``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_empty_tensor_value_info(tensor))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _basis(run, x: np.ndarray) -> np.ndarray:
    """[2C + 1, N, K, L]: P_1..P_C, Q_1..Q_C, R for the samples x [N, C, ...]."""
    channels = x.shape[1]
    zero = run(np.zeros_like(x))
    members = []
    for source in (x, np.ones_like(x)):
        for c in range(channels):
            only = np.zeros_like(x)
            only[:, c] = source[:, c]
            members.append(run(only) - zero)
    return np.stack([*members, zero])


def align_input_onnx(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]
) -> InputAlignment:
    """The graph with the input map that undoes the shift seen in ``batches`` (feed dicts)."""
    sites, _ = bn_sites(model)
    if not sites:
        return _skip(model, "the graph has no BatchNormalization with constant statistics")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        return _skip(model, f"the graph has {len(inputs)} inputs; alignment takes one")
    name = inputs[0].name
    first = batches[0][name] if batches else None
    if first is None or first.ndim < 2 or first.dtype.kind != "f":
        return _skip(model, "the input is not a floating-point [N, C, ...] array")
    if first.shape[1] > MAX_CHANNELS:
        return _skip(model, f"the input has {first.shape[1]} channels; alignment fits <= 16")
    site = sites[0]
    session = _probe(model, site.input)

    def run(x: np.ndarray) -> np.ndarray:
        y = session.run(None, {name: x})[0]
        return y.reshape(y.shape[0], y.shape[1], -1)  # [N, K, L]

    moments, seen = BasisMoments(), 0
    for feeds in batches:
        if moments.count >= MAX_FIT_VALUES or seen >= MAX_FIT_SAMPLES:
            break
        x = feeds[name][: MAX_FIT_SAMPLES - seen]
        moments.observe(_basis(run, x))
        seen += len(x)
    check = first[:CHECK_SAMPLES]
    basis = _basis(run, check)
    candidates, rejected = [], []
    for fit in fit_input_affine(moments, site.mean, site.var, site.eps):
        # the affine model of the path checked against the graph itself, on the fitted input
        shape = (1, -1) + (1,) * (first.ndim - 2)
        gain = fit.gain.reshape(shape).astype(first.dtype)
        bias = fit.bias.reshape(shape).astype(first.dtype)
        theta = np.concatenate([fit.gain, fit.bias, [1.0]])
        predicted = np.tensordot(theta, basis.astype(np.float64), axes=1)
        actual = run(check * gain + bias)
        error = float(np.max(np.abs(actual - predicted)) / (np.max(np.abs(predicted)) + 1e-12))
        if error > AFFINE_RTOL:
            rejected.append(
                f"the path from the input to {site.name!r} is not affine (the map with gain "
                f"{_show(fit.gain)} is predicted off by {error:.2g} relative)"
            )
        elif not fit.loss <= MIN_IMPROVEMENT * fit.loss_identity:
            rejected.append(
                f"gain {_show(fit.gain)} takes {site.name!r}'s distance only from "
                f"{fit.loss_identity:.3g} to {fit.loss:.3g}"
            )
        else:
            candidates.append(AlignedGraph(_with_input_map(model, name, gain, bias), fit))
    if not candidates:
        return _skip(model, "; ".join(rejected) + ": not applied", site.name)
    best = candidates[0]
    return InputAlignment(
        best.model,
        True,
        f"{site.name!r}'s distance from its running statistics {best.fit.loss_identity:.3g} -> "
        f"{best.fit.loss:.3g} with the input mapped to {_show(best.fit.gain)} * x + "
        f"{_show(best.fit.bias)} per channel",
        site.name,
        best.fit,
        candidates,
    )


def _show(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def _with_input_map(
    model: onnx.ModelProto, name: str, gain: np.ndarray, bias: np.ndarray
) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    prefix = next(
        p for i in range(len(taken) + 1) if (p := f"{PREFIX}{i or ''}") + ".gain" not in taken
    )
    aligned = f"{name}.{prefix}"
    for node in graph.node:
        for i, used in enumerate(node.input):
            if used == name:
                node.input[i] = aligned
    graph.initializer.extend(
        [
            numpy_helper.from_array(gain, f"{prefix}.gain"),
            numpy_helper.from_array(bias, f"{prefix}.bias"),
        ]
    )
    nodes = [
        helper.make_node(
            "Mul", [name, f"{prefix}.gain"], [f"{prefix}.scaled"], name=f"{prefix}.mul"
        ),
        helper.make_node(
            "Add", [f"{prefix}.scaled", f"{prefix}.bias"], [aligned], name=f"{prefix}.add"
        ),
    ]
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *kept])
    return out
