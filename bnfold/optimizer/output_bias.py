"""Empirical bias correction at the graph's outputs, from calibration data.

Quantization shifts a network's outputs by an error whose mean over the inputs is not zero
(rounding and clipping are biased once they pass through ReLUs); on the benchmark's models
about half the INT8 error's energy is that mean. Where an output comes straight from a layer
with a bias (Conv, Gemm, or MatMul + Add of a constant), the mean error per output channel c,
measured on the calibration inputs against the eval-mode original,

    d_c = mean over samples (and spatial positions) of (y_int8 - y_ref)[:, c]

is subtracted from that bias (divided by a Gemm's `beta`), in the fp32 graph the candidate is
quantized from; the graph is then quantized again with the same ranges. A layer without a bias
(a Conv or Gemm exported without one, as torchvision's zero-initialized classifiers are; a
MatMul alone) is given one, the correction itself, as an initializer of its own (a MatMul gets
an Add after it). This is AIMET's empirical bias correction (Nagel et al. 2019, section 4.2)
applied to the last layer only: its input, and so everything before it, is unchanged, and a
bias costs no measurable time.

The correction is fitted on the same inputs the candidate is then verified on, so whether it
helps is decided by two-fold cross-validation (fitted on one half of the samples, measured on
the other, both ways): it is kept only where it lowers the held-out error. A skip is data: an
output from a node that is no such layer, a bias shared with another node, too few samples.

The math (`channel_mean_error`, `held_out_rel_l2`) sees arrays only; `correctable_biases` and
`apply_corrections` see the graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from bnfold.optimizer.graph import GraphIndex, attribute, copy_model

__all__ = [
    "MIN_SAMPLES",
    "OutputBias",
    "OutputBiasResult",
    "apply_corrections",
    "channel_mean_error",
    "correct_output_bias",
    "correctable_biases",
    "held_out_rel_l2",
]

# two folds of at least two samples each
MIN_SAMPLES = 4


@dataclass
class OutputBiasResult:
    """What the correction did to one candidate."""

    applied: bool = False
    corrected: list[str] = field(default_factory=list)  # graph outputs whose bias moved
    skipped: dict[str, str] = field(default_factory=dict)  # graph output -> why not
    held_out_rel_l2_before: float | None = None
    held_out_rel_l2_after: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def channel_mean_error(reference: np.ndarray, output: np.ndarray, axis: int) -> np.ndarray:
    """Mean of output - reference per channel (`axis`), over every other axis."""
    err = np.asarray(output, np.float64) - np.asarray(reference, np.float64)
    axis = axis % err.ndim
    return err.mean(axis=tuple(a for a in range(err.ndim) if a != axis))


def _along(d: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return d.reshape(shape)


def held_out_rel_l2(
    reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray], axes: Sequence[int | None]
) -> tuple[float, float]:
    """(before, after): relative L2 error over all outputs, without and with the correction
    of each output whose channel axis is given (None: left alone), the correction measured on
    held-out samples by two-fold cross-validation (fitted on the even rows and applied to the
    odd ones, then the other way)."""
    err_before = err_after = norm = 0.0
    folds = ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2)))
    for ref, out, axis in zip(reference, outputs, axes, strict=True):
        ref = np.asarray(ref, np.float64)
        out = np.asarray(out, np.float64)
        norm += float(np.sum(ref**2))
        err_before += float(np.sum((out - ref) ** 2))
        for fit, held in folds:
            moved = out[held]
            if axis is not None:
                d = channel_mean_error(ref[fit], out[fit], axis)
                moved = moved - _along(d, axis, out.ndim)
            err_after += float(np.sum((moved - ref[held]) ** 2))
    scale = norm if norm > 0 else 1.0
    return float(np.sqrt(err_before / scale)), float(np.sqrt(err_after / scale))


@dataclass(frozen=True)
class OutputBias:
    """A graph output that comes straight from a layer with a bias, or one that can take one."""

    output: str
    bias: str | None  # its initializer; None: the layer has none, one is added
    axis: int  # the output's channel axis, along which the bias is laid out
    scale: float = 1.0  # what the layer multiplies its bias by (a Gemm's beta)


def _site(node: onnx.NodeProto, index: GraphIndex) -> tuple[str | None, int, float] | str:
    """(bias or None to add one, channel axis, bias scale) of the layer `node`, or why not."""
    if node.op_type in ("Conv", "Gemm"):
        beta = float(attribute(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
        if beta == 0.0:
            return "produced by a Gemm with beta=0, which ignores its bias"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        return bias, 1, beta
    if node.op_type == "MatMul":
        return None, -1, 1.0
    if node.op_type == "Add":
        constant = [name for name in node.input if name in index.initializers]
        other = [index.producer.get(name) for name in node.input if name not in constant]
        layer = other[0].op_type if len(other) == 1 and other[0] is not None else None
        if len(constant) == 1 and layer in ("MatMul", "Gemm", "Conv"):
            return constant[0], (-1 if layer == "MatMul" else 1), 1.0
    return f"produced by {node.op_type}, not a layer with a bias"


def correctable_biases(model: onnx.ModelProto) -> tuple[list[OutputBias], dict[str, str]]:
    """(the outputs whose bias can be corrected, {graph output: why it cannot})."""
    index = GraphIndex(model.graph)
    found, skipped = [], {}
    for output in model.graph.output:
        node = index.producer.get(output.name)
        site = "not produced by a node" if node is None else _site(node, index)
        if isinstance(site, str):
            skipped[output.name] = site
        elif site[0] is not None and not index.private_weight(site[0]):
            skipped[output.name] = f"its bias {site[0]!r} is shared with another node"
        elif index.consumers.get(output.name):
            skipped[output.name] = "also read inside the graph"
        else:
            found.append(OutputBias(output.name, *site))
    return found, skipped


def _add_bias(index: GraphIndex, site: OutputBias, value: np.ndarray) -> None:
    """Give the layer producing `site.output` the bias `value`, an initializer of its own."""
    node = index.producer[site.output]
    name = index.add_weight(f"{node.name or site.output}__bnfold_output_bias", value)
    if node.op_type == "MatMul":
        product = f"{site.output}__bnfold_before_bias"
        node.output[0] = product
        add = onnx.helper.make_node("Add", [product, name], [site.output], name=f"{name}__add")
        position = list(index.graph.node).index(node) + 1
        index.graph.node.insert(position, add)
    elif len(node.input) == 2:
        node.input.append(name)
    else:
        node.input[2] = name


def apply_corrections(
    model: onnx.ModelProto, corrections: dict[OutputBias, np.ndarray]
) -> dict[str, str]:
    """Subtract each correction from its output's bias (adding a bias where the layer has
    none), in place; returns {output: why not} for those whose bias does not hold one value
    per channel."""
    index = GraphIndex(model.graph)
    refused = {}
    for site, d in corrections.items():
        shift = np.asarray(d, np.float64).reshape(-1) / site.scale
        if site.bias is None:
            _add_bias(index, site, -shift)
            continue
        bias = index.weight(site.bias)
        if bias is None or bias.size != shift.size:
            refused[site.output] = (
                f"its bias has {getattr(bias, 'size', 0)} values for {shift.size} channels"
            )
            continue
        new = np.asarray(bias, np.float64).reshape(-1) - shift
        index.set_weight(site.bias, new.reshape(bias.shape))
    return refused


def correct_output_bias(
    source: onnx.ModelProto,
    outputs: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    requantize: Callable[[onnx.ModelProto], onnx.ModelProto],
) -> (
    tuple[onnx.ModelProto, onnx.ModelProto, OutputBiasResult] | tuple[None, None, OutputBiasResult]
):
    """Correct the output biases of the candidate quantized from `source` whose `outputs` (in
    graph-output order, on the inputs `reference` was computed on) are given.

    Returns (the corrected fp32 source, it quantized again by `requantize`, the result) where
    the correction lowers the held-out error, else (None, None, the result saying why not).
    """
    result = OutputBiasResult()
    sites, result.skipped = correctable_biases(source)
    names = [o.name for o in source.graph.output]
    samples = len(reference[0]) if reference else 0
    if not sites:
        return None, None, result
    if samples < MIN_SAMPLES:
        result.skipped.update(
            {s.output: f"{samples} samples, fewer than {MIN_SAMPLES}" for s in sites}
        )
        return None, None, result
    by_name = {s.output: s for s in sites}
    axes = [by_name[n].axis if n in by_name else None for n in names]
    before, after = held_out_rel_l2(reference, outputs, axes)
    result.held_out_rel_l2_before, result.held_out_rel_l2_after = before, after
    if not after < before:
        return None, None, result
    corrections = {
        by_name[n]: channel_mean_error(ref, out, by_name[n].axis)
        for n, ref, out in zip(names, reference, outputs, strict=True)
        if n in by_name
    }
    corrected = copy_model(source)
    refused = apply_corrections(corrected, corrections)
    result.skipped.update(refused)
    result.corrected = [s.output for s in corrections if s.output not in refused]
    if not result.corrected:
        return None, None, result
    result.applied = True
    return corrected, requantize(corrected), result
