"""The fold pass: capture the model, fold every BatchNorm call site that eval mode lets us
fold, and say for every one of them what happened.

For each BN call site, in graph order, until nothing changes (so Conv -> BN -> BN folds both):
0. a BN whose input is a constant (weight standardization) is computed once
   (patterns/constant_bn.py);
1. a BN that normalizes with batch statistics in eval mode stays;
2. else fold backward into its producer (patterns/producer_bn.py);
3. else fold forward into its consumers (patterns/bn_consumer.py);
4. else it stays, with both reasons.
Then sums of parallel branches merge into one conv (branches.py); when one did, back to 0: a
BN after the sum now follows a conv.

The user's model is never touched: we fold an eval-mode deep copy. When the whole model cannot
be captured as one graph, each child module is captured and folded on its own (recursively),
so one untraceable corner costs only the BNs inside it.

In half precision (fp16/bf16) the folded weights are rounded once more; the pass measures the
folded and the unfolded model against a float64 run and keeps the unfolded model if folding
made the error worse.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnfold.branches import merge_branches
from bnfold.capture import CaptureError, bn_site, fetch_attr, trace
from bnfold.compose import compose_affine
from bnfold.patterns import (
    FoldContext,
    Folded,
    Rejected,
    fold_into_consumers,
    fold_into_producer,
    precompute_constant_bn,
)
from bnfold.report import Action, BNEntry, FoldReport, MergeEntry

log = logging.getLogger(__name__)

__all__ = ["FoldResult", "fold"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class FoldResult:
    module: nn.Module  # eval mode, called like the original
    report: FoldReport


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _site_names(gm: fx.GraphModule, prefix: str) -> dict[fx.Node, str]:
    """Readable names per BN call site: the module path, with '#k' when a module is called
    more than once; the node name for functional BN."""
    names: dict[fx.Node, str] = {}
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if bn_site(node, gm) is None:
            continue
        base = str(node.target) if node.op == "call_module" else node.name
        counts[base] = counts.get(base, 0) + 1
        names[node] = prefix + base + (f"#{counts[base]}" if counts[base] > 1 else "")
    return names


def _try_fold(site, ctx: FoldContext, backward: bool, forward: bool):
    outcome = precompute_constant_bn(site, ctx)
    if isinstance(outcome, Folded):
        return outcome, Action.PRECOMPUTED
    if site.foldable_reason:
        return Rejected(site.foldable_reason), None
    reasons = []
    if backward:
        outcome = fold_into_producer(site, ctx)
        if isinstance(outcome, Folded):
            return outcome, Action.FOLDED_BACKWARD
        reasons.append(f"not into its producer: {outcome.reason}")
    if forward:
        outcome = fold_into_consumers(site, ctx)
        if isinstance(outcome, Folded):
            return outcome, Action.FOLDED_FORWARD
        reasons.append(f"not into its consumers: {outcome.reason}")
    return Rejected("; ".join(reasons) or "folding disabled"), None


def fold_graph(
    gm: fx.GraphModule,
    report: FoldReport,
    *,
    prefix: str = "",
    backward: bool = True,
    forward: bool = True,
    merge: bool = True,
    only: frozenset[str] | None = None,
) -> int:
    """Fold the BN call sites of a traced graph in place. Returns how many were folded.

    `only`: fold just the call sites of these names (the precision guard's trials)."""
    ctx = FoldContext(gm)
    names = _site_names(gm, prefix)
    reasons: dict[fx.Node, str] = {}
    sites = (gm, ctx, report, names, reasons, only, backward, forward)
    folded = _fold_sites(*sites)
    if merge:
        merged, left = [], []
        while True:
            merges, merged_bn = _merge(gm, report, names, prefix)
            folded += merged_bn
            merged += [m for m in merges if m.into]
            left = [m for m in merges if not m.into]  # the last pass's word on the others
            if len(left) == len(merges):
                break
            # a BN after a merged sum now follows a conv: RepViT's BN(conv(x) + conv1x1(x) + x)
            folded += _fold_sites(*sites)
        report.merges.extend([*merged, *left])
        for c in compose_affine(gm):
            c.name, c.layers = prefix + c.name, [prefix + n for n in c.layers]
            c.into = c.into and prefix + c.into
            report.compositions.append(c)
    for node in gm.graph.nodes:
        site = bn_site(node, gm)
        if site is not None:
            report.add(BNEntry(names[node], site.kind, Action.KEPT, [], reasons.get(node, "")))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def _fold_sites(gm, ctx, report, names, reasons, only, backward, forward) -> int:
    """Steps 0-4 of the module docstring over every BN call site, until nothing changes."""
    folded = 0
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            site = bn_site(node, gm)
            if site is None:
                continue
            if only is not None and names[node] not in only:
                reasons[node] = "not selected"
                continue
            outcome, action = _try_fold(site, ctx, backward, forward)
            if isinstance(outcome, Rejected):
                reasons[node] = outcome.reason
                continue
            report.add(
                BNEntry(names[node], site.kind, action, outcome.targets, "; ".join(outcome.notes))
            )
            folded += 1
            changed = True
    return folded


def _record_calls(model: nn.Module, example_inputs: tuple) -> dict[int, list]:
    """Positional inputs of every call of every submodule during one forward pass
    (None for a call with keyword arguments, which we do not replay)."""
    calls: dict[int, list] = {}

    def hook(module, args, kwargs):
        calls.setdefault(id(module), []).append(None if kwargs else args)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _merge(
    gm: fx.GraphModule, report: FoldReport, names: dict, prefix: str
) -> tuple[list[MergeEntry], int]:
    """Merge parallel branches; BNs that were branches are reported as merged. Returns the
    merge entries and how many BNs were merged."""
    bn_nodes = {node.name: node for node in gm.graph.nodes if bn_site(node, gm) is not None}
    merges = merge_branches(gm)
    merged_bn = 0
    for m in merges:
        m.name = prefix + m.name
        for i, label in enumerate(m.branches):
            node = bn_nodes.get(label)
            if node is None:
                m.branches[i] = prefix + label
                continue
            m.branches[i] = names[node]
            if m.into:
                site_kind = (
                    type(fetch_attr(gm, str(node.target))).__name__
                    if (node.op == "call_module")
                    else str(getattr(node.target, "__name__", node.target))
                )
                report.add(
                    BNEntry(names[node], site_kind, Action.MERGED, [prefix + m.into],
                            "a branch of a sum of parallel branches, merged into one conv")
                )  # fmt: skip
                merged_bn += 1
        if m.into:
            m.into = prefix + m.into
    return merges, merged_bn


def _fold_children(
    parent: nn.Module, calls: dict[int, list], report: FoldReport, prefix: str, **flags
) -> None:
    for name in [n for n, _ in parent.named_children()]:
        _fold_module(parent, name, calls, report, f"{prefix}{name}", **flags)


def _fold_module(
    parent: nn.Module, name: str, calls: dict[int, list], report: FoldReport, path: str, **flags
) -> None:
    """Capture and fold `parent.<name>` on its own, with the inputs it was called with;
    if it cannot be captured, go down to its children."""
    child = getattr(parent, name)
    recorded = calls.get(id(child))
    if not recorded:
        return
    if _is_bn_module(child) or "FrozenBatchNorm" in type(child).__name__:
        reason = "its producer and consumers are in a part of the model that could not be captured"
        report.add(BNEntry(path, type(child).__name__, Action.KEPT, [], reason))
        return
    ranks = {None if a is None else tuple(getattr(x, "ndim", -1) for x in a) for a in recorded}
    try:
        if None in ranks or len(ranks) != 1:
            raise CaptureError("called with keyword arguments or inputs of different ranks")
        gm = trace(child, recorded[0])
    except CaptureError:
        _fold_children(child, calls, report, f"{path}.", **flags)
        return
    if fold_graph(gm, report, prefix=f"{path}.", **flags):
        setattr(parent, name, gm)
    _fold_opaque(gm, calls, report, f"{path}.", **flags)


def _opaque_calls(gm: fx.GraphModule) -> list[str]:
    """Modules the tracer kept as one call although they are not stock torch.nn layers
    (timm's notrace modules): BN inside them is only reached by folding them on their own."""
    targets = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and bn_site(node, gm) is None:
            m = gm.get_submodule(str(node.target))
            if not type(m).__module__.startswith("torch.nn") and node.target not in targets:
                targets.append(str(node.target))
    return targets


def _fold_opaque(
    gm: fx.GraphModule, calls: dict[int, list], report: FoldReport, prefix: str, **flags
) -> None:
    for target in _opaque_calls(gm):
        parent_name, _, leaf = target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        _fold_module(parent, leaf, calls, report, f"{prefix}{target}", **flags)


def _is_bn_module(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.dtype
    return None


def _error_vs_float64(model: nn.Module, reference64: nn.Module, inputs: tuple) -> float:
    """Max abs error against float64 over the inputs and verify's generated input sets."""
    from bnfold.verification import flatten_outputs, generated_cases

    worst = 0.0
    with torch.no_grad():
        for _, args in generated_cases(inputs):
            ref = flatten_outputs(reference64(*[_to64(x) for x in args]))
            out = flatten_outputs(model(*args))
            for (_, o), (_, r) in zip(out, ref, strict=True):
                if o.numel():
                    worst = max(worst, float((o.to(torch.float64) - r).abs().max()))
    return worst


def _to64(x: Any) -> Any:
    return x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _precision_guard(
    original: nn.Module, folded: nn.Module, report: FoldReport, inputs: tuple, flags: dict
) -> tuple[nn.Module, FoldReport]:
    """In fp16/bf16 the folded weights are rounded once more. Keep a fold only if the model
    stays at least as accurate as the unfolded one against a float64 run: first all folds
    together, else each fold greedily, in graph order, keeping those that do not push the
    error above the unfolded model's."""
    dtype = _float_dtype(original)
    if dtype not in _LOW_PRECISION or not report.folded:
        return folded, report
    reference64 = copy.deepcopy(original).to(torch.float64)
    baseline = _error_vs_float64(original, reference64, inputs)
    error = _error_vs_float64(folded, reference64, inputs)
    if error <= baseline:
        report.notes.append(
            f"{dtype}: max error against float64 {error:.3g} folded, {baseline:.3g} unfolded"
        )
        return folded, report
    candidates = [e.name for e in report.folded]
    allowed: frozenset[str] = frozenset()
    best_module, best_report, best_error = copy.deepcopy(original), None, baseline
    for name in candidates:
        trial, trial_report = _fold_copy(original, inputs, {**flags, "only": allowed | {name}})
        trial_error = _error_vs_float64(trial, reference64, inputs)
        if trial_error <= baseline:
            allowed |= {name}
            best_module, best_report, best_error = trial, trial_report, trial_error
    if best_report is None:
        best_report = FoldReport()
        best_report.entries = [copy.copy(e) for e in report.entries]
        for entry in best_report.entries:
            entry.action, entry.targets = Action.KEPT, []
    for entry in best_report.entries:
        if entry.name in candidates and entry.name not in allowed:
            entry.reason = (
                f"folding it in {dtype} raised the max error against float64 above the "
                f"unfolded model's {baseline:.3g}"
            )
    best_report.notes = report.notes + [
        f"{dtype}: all folds together raised the max error against float64 from "
        f"{baseline:.3g} to {error:.3g}; kept {len(candidates) - len(allowed)} of "
        f"{len(candidates)} folds back (now {best_error:.3g})"
    ]
    return best_module, best_report


def _fold_copy(original: nn.Module, inputs: tuple, flags: dict) -> tuple[nn.Module, FoldReport]:
    """Fold a deep copy of the eval-mode `original`."""
    report = FoldReport()
    work = copy.deepcopy(original)
    try:
        gm = trace(work, inputs)
    except CaptureError as exc:
        report.notes.append(
            f"{type(original).__name__} could not be captured as one graph ({exc}); "
            "its submodules were captured and folded one by one"
        )
        _fold_children(work, _record_calls(work, inputs), report, "", **flags)
        return work, report
    fold_graph(gm, report, **flags)
    if _opaque_calls(gm):
        _fold_opaque(gm, _record_calls(gm, inputs), report, "", **flags)
    return gm, report


def fold(
    model: nn.Module,
    example_inputs: Any,
    *,
    backward: bool = True,
    forward: bool = True,
    merge_branches: bool = True,
) -> FoldResult:
    """Fold every foldable BatchNorm of `model`; the model itself is left unchanged.

    `example_inputs`: a tensor or a tuple of the model's positional inputs, used to capture
    the graph and to prove axes from real shapes. `merge_branches`: after folding, merge sums
    of parallel conv / BN / identity branches of one input into one conv (branches.py), and
    compose sequential affine layers when that is cheaper (compose.py).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold takes a torch.nn.Module, not {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    original = copy.deepcopy(model).eval()
    try:
        with torch.no_grad():
            original(*inputs)
    except Exception as exc:  # the caller's inputs, not our pass, are wrong: say so plainly
        raise ValueError(
            f"the model does not run on the example inputs ({type(exc).__name__}: {exc})"
        ) from exc
    flags = {"backward": backward, "forward": forward, "merge": merge_branches}
    module, report = _fold_copy(original, inputs, flags)
    module, report = _precision_guard(original, module, report, inputs, flags)
    if model.training:
        report.notes.insert(
            0, "the model was in train mode: its eval-mode copy was folded (the model is unchanged)"
        )
    module.eval()
    log.info("fold: %s", report.counts())
    return FoldResult(module, report)
