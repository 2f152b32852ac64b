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

``denoise_input_onnx`` is the other repair in front of the graph (``denoising``: the noise level
from the first BN's variances, Wiener filters and a learned denoiser), put there as ``Pad``
(reflect) and ``Conv`` per layer, ``Relu`` between and ``Add`` of the input when residual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.drift.alignment import MAX_CHANNELS, AffineFit, describe, fit_and_check
from bnfold.drift.denoising import Denoiser, fit_denoiser
from bnfold.drift.observer import bn_sites

__all__ = [
    "AlignedGraph",
    "InputAlignment",
    "InputDenoising",
    "align_input_onnx",
    "denoise_input_onnx",
]

PREFIX = "bnfold_align"
DENOISE_PREFIX = "bnfold_denoise"


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


@dataclass
class InputDenoising:
    applied: bool  # whether filters were fitted (recalibrate_onnx decides which is kept)
    reason: str
    site: str | None = None
    candidates: list[tuple[onnx.ModelProto, Denoiser]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, "reason": self.reason, "site": self.site}


def _skip(model: onnx.ModelProto, reason: str, site=None, fit=None) -> InputAlignment:
    return InputAlignment(model, False, reason, site, fit)


def _single_input(model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]):
    """(input name, first batch's array, first BN site), or a reason why the graph does not
    qualify for a repair in front of it."""
    sites, _ = bn_sites(model)
    if not sites:
        return "the graph has no BatchNormalization with constant statistics"
    initializers = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        return f"the graph has {len(inputs)} inputs; a repair in front takes one"
    name = inputs[0].name
    first = batches[0][name] if batches else None
    if first is None or first.ndim < 2 or first.dtype.kind != "f":
        return "the input is not a floating-point [N, C, ...] array"
    if first.shape[1] > MAX_CHANNELS:
        return f"the input has {first.shape[1]} channels; a repair in front fits <= 16"
    return name, first, sites[0]


def _site_run(model: onnx.ModelProto, name: str, tensor: str):
    session = _probe(model, tensor)

    def run(x: np.ndarray) -> np.ndarray:
        y = session.run(None, {name: x})[0]
        return y.reshape(y.shape[0], y.shape[1], -1)  # [N, K, L]

    return run


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


def align_input_onnx(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]
) -> InputAlignment:
    """The graph with the input map that undoes the shift seen in ``batches`` (feed dicts)."""
    qualified = _single_input(model, batches)
    if isinstance(qualified, str):
        return _skip(model, qualified)
    name, first, site = qualified
    run = _site_run(model, name, site.input)
    samples = (feeds[name] for feeds in batches)
    kept, rejected = fit_and_check(run, samples, site.mean, site.var, site.eps, site.name)
    shape = (1, -1) + (1,) * (first.ndim - 2)
    candidates = [
        AlignedGraph(
            _with_input_map(
                model,
                name,
                fit.gain.reshape(shape).astype(first.dtype),
                fit.bias.reshape(shape).astype(first.dtype),
            ),
            fit,
        )
        for fit in kept
    ]
    if not candidates:
        return _skip(model, "; ".join(rejected) + ": not applied", site.name)
    best = candidates[0]
    return InputAlignment(
        best.model,
        True,
        describe(site.name, best.fit),
        site.name,
        best.fit,
        candidates,
    )


def _in_front(
    model: onnx.ModelProto, name: str, base: str, build: Callable[[str, str], tuple[list, list]]
) -> onnx.ModelProto:
    """A copy of ``model`` with nodes between its input ``name`` and the nodes that read it.
    ``build(prefix, out)`` gives (initializers, nodes) that read ``name`` and write ``out``;
    ``prefix`` is ``base`` numbered past the names already in the graph (a second repair in
    front of a first one gets its own)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    numbered = (f"{base}{i or ''}" for i in range(len(taken) + 1))
    prefix = next(p for p in numbered if not any(t.startswith(f"{p}.") for t in taken))
    repaired = f"{name}.{prefix}"
    for node in graph.node:
        for i, used in enumerate(node.input):
            if used == name:
                node.input[i] = repaired
    initializers, nodes = build(prefix, repaired)
    graph.initializer.extend(initializers)
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *kept])
    return out


def _with_input_map(
    model: onnx.ModelProto, name: str, gain: np.ndarray, bias: np.ndarray
) -> onnx.ModelProto:
    def build(prefix: str, aligned: str) -> tuple[list, list]:
        initializers = [
            numpy_helper.from_array(gain, f"{prefix}.gain"),
            numpy_helper.from_array(bias, f"{prefix}.bias"),
        ]
        nodes = [
            helper.make_node(
                "Mul", [name, f"{prefix}.gain"], [f"{prefix}.scaled"], name=f"{prefix}.mul"
            ),
            helper.make_node(
                "Add", [f"{prefix}.scaled", f"{prefix}.bias"], [aligned], name=f"{prefix}.add"
            ),
        ]
        return initializers, nodes

    return _in_front(model, name, PREFIX, build)


def denoise_input_onnx(
    model: onnx.ModelProto, batches: Sequence[dict[str, np.ndarray]]
) -> InputDenoising:
    """The graph with each Wiener filter for the noise the first BN sees in ``batches`` in
    front, when its variances changed as additive white noise predicts (``denoising``)."""
    qualified = _single_input(model, batches)
    if isinstance(qualified, str):
        return InputDenoising(False, qualified)
    name, first, site = qualified
    run = _site_run(model, name, site.input)
    filters, reason = fit_denoiser(run, (feeds[name] for feeds in batches), site.var)
    candidates = [(_with_input_filter(model, name, f, first.dtype), f) for f in filters]
    return InputDenoising(bool(candidates), reason, site.name, candidates)


def _with_input_filter(
    model: onnx.ModelProto, name: str, found: Denoiser, dtype: np.dtype
) -> onnx.ModelProto:
    """``found`` in front: per layer ``Pad`` (reflect) and ``Conv``, ``Relu`` between layers,
    ``Add`` of the input when the filter is residual."""

    def build(prefix: str, filtered: str) -> tuple[list, list]:
        initializers, nodes, current = [], [], name
        last, channels = len(found.layers) - 1, found.layers[0][0].shape[1]
        for i, (weight, bias) in enumerate(found.layers):
            r, at = weight.shape[-1] // 2, f"{prefix}.{i}"
            out = filtered if i == last and not found.residual else f"{at}.out"
            initializers += [
                numpy_helper.from_array(weight.astype(dtype), f"{at}.weight"),
                numpy_helper.from_array(bias.astype(dtype), f"{at}.bias"),
                numpy_helper.from_array(np.array([0, 0, r, r, 0, 0, r, r], np.int64), f"{at}.pads"),
            ]
            nodes += [
                helper.make_node(
                    "Pad",
                    [current, f"{at}.pads"],
                    [f"{at}.padded"],
                    mode="reflect",
                    name=f"{at}.pad",
                ),
                helper.make_node(
                    "Conv",
                    [f"{at}.padded", f"{at}.weight", f"{at}.bias"],
                    [out if i == last else f"{at}.conv"],
                    kernel_shape=list(weight.shape[2:]),
                    group=channels // weight.shape[1],
                    name=f"{at}.conv",
                ),
            ]
            channels = weight.shape[0]
            if i < last:
                nodes.append(helper.make_node("Relu", [f"{at}.conv"], [out], name=f"{at}.relu"))
            current = out
        if found.residual:
            nodes.append(helper.make_node("Add", [name, current], [filtered], name=f"{prefix}.add"))
        return initializers, nodes

    return _in_front(model, name, DENOISE_PREFIX, build)
