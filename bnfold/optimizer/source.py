"""The model as given: its ONNX graph with BatchNorm intact, and its eval-mode outputs.

An nn.Module is exported with ``export_onnx`` (batch dynamic, other dims those of the example
inputs) after one eager pass that names inputs it cannot take; a graph or path is kept as is.
The reference every candidate is measured against is the module's own eval-mode output, or the
original graph's where no module was given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from bnfold.onnx.ir_version import lower_for_runtime

__all__ = ["original_graph", "reference_outputs"]


def _example_tuple(example_inputs, calibration) -> tuple | None:
    """The example inputs as a tuple of tensors (the first calibration set when none are
    given), or None when there are neither."""
    import torch

    source = example_inputs if example_inputs is not None else (calibration or [None])[0]
    if source is None:
        return None
    inputs = tuple(source) if isinstance(source, list | tuple) else (source,)
    tensors = []
    for index, x in enumerate(inputs):
        if hasattr(x, "detach"):
            tensors.append(x)
            continue
        array = np.asarray(x)
        if array.dtype.kind not in "biuf":
            raise ValueError(f"example input {index} is a {array.dtype} array, not numbers")
        tensors.append(torch.as_tensor(array))
    return tuple(tensors)


def original_graph(model, example_inputs, calibration) -> tuple[onnx.ModelProto, object, list[str]]:
    """(graph with BN intact, torch module or None, notes). An nn.Module is exported on the
    example inputs, else on the first calibration set."""
    import torch

    if isinstance(model, torch.nn.Module):
        from bnfold.onnx.export import export_onnx

        inputs = _example_tuple(example_inputs, calibration)
        if inputs is None:
            raise ValueError("an nn.Module needs example_inputs (or calibration) to be exported")
        _check_module_runs(model, inputs)
        # static spatial dims, as torch.onnx.export gives by default: with H and W symbolic
        # the intermediate shapes are expressions onnxruntime cannot resolve, and its NCHWc
        # convolutions ran MobileNetV3-Large 2-3% (batch 1) and 5-7% (batch 8) slower
        # (docs/BENCHMARKS.md, issue 13)
        return (
            export_onnx(model.eval(), inputs, dynamic_spatial=False),
            model,
            [
                "the module is exported with its BatchNorm and folded by fold_onnx, so the BN "
                "statistics and the folded tensors carry the same names",
                "exported with a dynamic batch and the example's other dims static: the graph "
                "takes only inputs of the example's spatial size",
            ],
        )
    if isinstance(model, str | os.PathLike):
        model = onnx.load(os.fspath(model))
    if isinstance(model, onnx.ModelProto):
        model, note = lower_for_runtime(model)
        return model, None, [note] * bool(note) + _symbolic_dims_note(model)
    raise TypeError(f"model must be an nn.Module, an onnx.ModelProto or a path, not {type(model)}")


def reference_outputs(
    module,
    original: onnx.ModelProto,
    feeds: Sequence[dict],
    run: Callable[[onnx.ModelProto, Sequence[dict]], list[np.ndarray]],
) -> list[np.ndarray]:
    """The eval-mode outputs on `feeds`, each concatenated over them: the module's, or the
    original graph's through `run` where there is no module."""
    if module is None:
        return run(original, feeds)
    import torch

    outs = []
    module.eval()
    with torch.no_grad():
        for feed in feeds:
            y = module(*[torch.from_numpy(v) for v in feed.values()])
            ys = y if isinstance(y, list | tuple) else (y,)
            outs.append([t.detach().numpy() for t in ys])
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def _check_module_runs(model, inputs: tuple) -> None:
    """One eager forward pass before the export, so that inputs the module cannot take are
    named as such, not as a torch.export failure."""
    import torch

    try:
        with torch.no_grad():
            model.eval()(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = ", ".join("x".join(map(str, x.shape)) for x in inputs)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"the module does not run on the example inputs ({shapes}): {first}"
        ) from None


def _symbolic_dims_note(model: onnx.ModelProto) -> list[str]:
    """A note when a graph input has a symbolic dim besides the batch: the graph is kept as
    given, but onnxruntime may run it slower than with those dims static."""
    names = [
        v.name
        for v in model.graph.input
        if any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim[1:])
    ]
    if not names:
        return []
    return [
        f"input(s) {', '.join(names)} have symbolic dims besides the batch: kept, but "
        "onnxruntime cannot resolve the intermediate shapes then, which cost up to 7% on "
        "MobileNetV3-Large; a graph with those dims static may be faster"
    ]
