"""export_onnx: a torch module (folded or not) to an ONNX graph that onnxruntime loads.

The dynamo exporter with ``optimize=True`` runs onnxscript's rewriter, whose default rules
fuse Conv/ConvTranspose/Gemm + BatchNormalization. That would hide what ``bnfold.fold`` left
unfolded (and claim folds nobody verified), so we export with ``optimize=False`` and run the
same optimizer pipeline ourselves with the BatchNorm fusion rules taken out: constant folding,
the other rewrite rules, dead-code removal, constant lifting. The graph keeps exactly the
BatchNormalization nodes the module still computes.

The IR version is lowered to what the installed onnxruntime reads (a newer onnx writes a
newer one by default), and the result passes ``onnx.checker`` with ``full_check``.

Then the graph is run in onnxruntime on the example inputs and compared with the module's own
outputs (``check=True``, the default): an exporter that writes something else than the module
computes raises ``ExportMismatch`` instead of handing on a graph that every later comparison,
made against this same export, would pass. Known case: ``F.batch_norm(training=True)`` with
running statistics in an eval-mode module, written as an inference BatchNormalization. The
module's buffers are restored after its run (that BN updates its running statistics).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from torch.utils import _pytree

from bnfold.onnx.ir_version import ort_max_ir_version

__all__ = ["ExportMismatch", "export_onnx", "ort_max_ir_version"]

logger = logging.getLogger(__name__)

# how far the exported graph may be from the module, relative to the output's largest value:
# rounding of reordered float sums stays orders of magnitude below these
_CHECK_RTOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
_CHECK_RTOL_DEFAULT = 1e-3


class ExportMismatch(ValueError):
    """The exported graph computes something else than the module on its example inputs."""


def _rewrite_rules_without_bn_fusion():
    """onnxscript's default rewrite rules minus its BatchNormalization fusions, or None when
    the private names moved (then we skip pattern rewriting altogether)."""
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules.common import _fuse_batchnorm
    except ImportError:
        return None
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    bn_rules = getattr(getattr(_fuse_batchnorm, "rules", None), "rules", None)
    if rules is None or bn_rules is None:
        return None
    return [r for r in rules if all(r is not b for b in bn_rules)]


def _optimize_keeping_bn(model: ir.Model) -> None:
    """onnxscript.optimizer.optimize_ir's pipeline, without fusing BatchNormalization."""
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    rules = _rewrite_rules_without_bn_fusion()
    step = [
        _constant_folding.FoldConstantsPass(
            shape_inference=True,
            input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
        )
    ]
    if rules:
        step.append(rewriter.RewritePass(rules))
    else:
        logger.warning("onnxscript rewrite rules not found; exporting without pattern rewrites")
    step += [common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedOpsetsPass()]
    ir.passes.Sequential(
        common_passes.InlinePass(),
        ir.passes.PassManager(step, steps=2, early_stop=True),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)


def _dynamic_shapes(inputs: Sequence, batch: bool, spatial: bool) -> tuple:
    auto = torch.export.Dim.AUTO
    shapes = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            shapes.append(None)
            continue
        dims = {0: auto} if batch else {}
        if spatial and x.dim() >= 3:
            dims.update({d: auto for d in range(2, x.dim())})
        shapes.append(dims or None)
    return tuple(shapes)


def _torch_export(module, inputs: tuple, batch: bool, spatial: bool, opset_version: int | None):
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        return torch.onnx.export(
            module,
            inputs,
            dynamo=True,
            optimize=False,  # see the module docstring: its rewriter fuses BN
            verbose=False,
            opset_version=opset_version,
            dynamic_shapes=_dynamic_shapes(inputs, batch, spatial),
        )


def export_onnx(
    module: torch.nn.Module,
    example_inputs: Sequence | torch.Tensor,
    path: str | os.PathLike | None = None,
    dynamic_batch: bool = True,
    *,
    dynamic_spatial: bool = True,
    opset_version: int | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """Export `module` in eval mode; returns the ModelProto (and writes it to `path`).

    The batch dimension (and spatial dims of rank >= 3 inputs) are dynamic where the model
    allows it; the exporter keeps a dimension static when the model's code needs it static.
    With `check`, the graph's outputs on the example inputs are compared with the module's
    (module docstring); ExportMismatch says which output differs and by how much.
    """
    given = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    # a batch of 1 would be specialised (0/1 specialisation); export with 2 instead
    doubled = tuple(
        torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1 else x
        for x in given
    )
    # symbolic reasoning about dynamic spatial dims fails on some models (sympy cannot solve
    # the stride arithmetic); fall back to fewer dynamic dims rather than not exporting
    attempts = [(dynamic_batch, dynamic_spatial), (dynamic_batch, False), (False, False)]
    attempts = list(dict.fromkeys(attempts))
    was_training = module.training
    module.eval()
    try:
        for i, (batch, spatial) in enumerate(attempts):
            try:
                program = _torch_export(
                    module, doubled if batch else given, batch, spatial, opset_version
                )
                break
            except Exception as exc:
                if i == len(attempts) - 1:
                    raise
                logger.warning(
                    "export with dynamic batch=%s spatial=%s failed (%s); retrying with fewer "
                    "dynamic dims",
                    batch,
                    spatial,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__,
                )
    finally:
        module.train(was_training)
    _optimize_keeping_bn(program.model)
    proto = ir.to_proto(program.model)
    proto.ir_version = min(proto.ir_version, ort_max_ir_version())
    onnx.checker.check_model(proto, full_check=True)
    if dynamic_batch:
        for value in proto.graph.input:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value"):
                logger.warning("input %r keeps a static batch dimension", value.name)
    if check:
        module.eval()
        try:
            _check_against_module(proto, module, given)
        finally:
            module.train(was_training)
    if path is not None:
        onnx.save(proto, os.fspath(path))
    return proto


def _check_against_module(proto: onnx.ModelProto, module: torch.nn.Module, inputs: tuple) -> None:
    """Raise ExportMismatch if the graph's outputs on `inputs` differ from the module's. A
    graph or module that cannot be run this way (inputs or outputs that do not line up, a
    dtype numpy lacks, an operator the CPU provider lacks) is logged and passed unchecked.

    A difference beyond the tolerance is judged again against the module run in float64: a
    network whose activations explode (random weights) rounds its own float32 run far from
    the exact result too, and the graph may be as far from that as ROUNDING_FACTOR times the
    module's own float32 error."""
    import onnxruntime as ort

    tensors = [x for x in _pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    if any(x.dtype == torch.bfloat16 for x in tensors):
        logger.info("export not checked: bfloat16 inputs")
        return
    expected = _module_outputs(module, inputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(tensors) or len(session.get_outputs()) != len(expected):
            logger.info("export not checked: inputs or outputs do not line up with the module's")
            return
        feeds = {n: x.detach().cpu().numpy() for n, x in zip(names, tensors, strict=True)}
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - the check is a help, never a new failure
        logger.info("export not checked: onnxruntime cannot run it here (%s)", exc)
        return
    infos = session.get_outputs()
    problems = [
        (i, reason)
        for i, (out, ref) in enumerate(zip(outputs, expected, strict=True))
        if (reason := _difference(out, ref, infos[i].name)) is not None
    ]
    if not problems:
        return
    # only a difference of float values of the right shape can be rounding
    numeric = all(
        expected[i].is_floating_point() and outputs[i].shape == tuple(expected[i].shape)
        for i, _ in problems
    )
    exact = _float64_outputs(module, inputs) if numeric else None
    for i, reason in problems:
        if exact is not None and _within_rounding(outputs[i], expected[i], exact[i]):
            logger.info("export check: %s, as far as the module's own float32 rounding", reason)
            continue
        raise ExportMismatch(reason)


ROUNDING_FACTOR = 10
_HINT = (
    "A known cause: F.batch_norm(training=True) with running statistics in an eval-mode module, "
    "which the exporter writes as an inference BatchNormalization"
)


def _module_outputs(module: torch.nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The module's tensor outputs; its buffers are restored after the run."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        with torch.no_grad():
            return [y for y in _pytree.tree_leaves(module(*inputs)) if isinstance(y, torch.Tensor)]
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])


def _float64_outputs(module: torch.nn.Module, inputs: tuple) -> list[torch.Tensor] | None:
    """The module's outputs computed in float64 (on a copy), or None where it cannot run so."""
    try:
        exact = copy.deepcopy(module).double()
        as64 = _pytree.tree_map(
            lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x,
            inputs,
        )
        return _module_outputs(exact, as64)
    except Exception as exc:  # noqa: BLE001 - then the difference stands as it is
        logger.info("export check: the module does not run in float64 (%s)", exc)
        return None


def _difference(out: np.ndarray, ref: torch.Tensor, name: str) -> str | None:
    """Why the graph's output differs from the module's beyond the tolerance, or None."""
    if ref.dtype == torch.bfloat16:
        return None
    ref_np = ref.detach().cpu().numpy()
    if out.shape != ref_np.shape:
        return (
            f"the exported graph's output {name!r} has shape {list(out.shape)} on the example "
            f"inputs, the module's {list(ref_np.shape)}"
        )
    if not np.issubdtype(ref_np.dtype, np.floating):
        return (
            None if np.array_equal(out, ref_np) else f"the exported graph's output {name!r} differs"
        )
    ref64, out64 = ref_np.astype(np.float64), out.astype(np.float64)
    finite = np.isfinite(ref64)
    if not np.array_equal(finite, np.isfinite(out64)):
        return (
            f"the exported graph's output {name!r} is non-finite elsewhere than the module's on "
            f"the example inputs. {_HINT}"
        )
    scale = float(np.abs(ref64[finite]).max()) if finite.any() else 0.0
    err = float(np.abs(out64[finite] - ref64[finite]).max()) if finite.any() else 0.0
    if err <= _CHECK_RTOL.get(ref.dtype, _CHECK_RTOL_DEFAULT) * max(scale, 1e-6):
        return None
    return (
        f"the exported graph computes something else than the module: output {name!r} "
        f"differs by up to {err:.3g} (the module's largest value is {scale:.3g}) on the "
        f"example inputs. {_HINT}"
    )


def _within_rounding(out: np.ndarray, ref: torch.Tensor, exact: torch.Tensor) -> bool:
    """Whether the graph is within ROUNDING_FACTOR times the module's own distance from its
    float64 result (a module that is itself non-finite where float64 is not: always)."""
    exact64 = exact.detach().cpu().numpy().astype(np.float64)
    finite = np.isfinite(exact64)

    def distance(values: np.ndarray) -> float:
        values = values.astype(np.float64)
        if not np.isfinite(values[finite]).all():
            return math.inf
        return float(np.abs(values[finite] - exact64[finite]).max()) if finite.any() else 0.0

    own = distance(ref.detach().cpu().numpy())
    return own == math.inf or distance(out) <= ROUNDING_FACTOR * own
