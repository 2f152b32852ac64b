"""optimize: the fastest graph on this machine that stays within an accuracy budget.

1. The model as an ONNX graph with its BatchNorm intact (an nn.Module is exported with
   ``export_onnx``, batch dynamic, other dims those of the example inputs), BN statistics read
   from it (`bn_stats`), then folded with ``fold_onnx``: the folded fp32 graph is the first
   candidate and the reference for speed. Every INT8 candidate is quantized from a copy of it
   whose spatial ReduceMeans are GlobalAveragePools (`pooling`), which onnxruntime runs in int8.
2. INT8 data-free: cross-layer equalization where exact (`equalize`), ranges from the BN
   statistics propagated through the graph (`ranges`), analytic bias correction (`bias_correct`),
   then onnxruntime's quantizer with those ranges (`quantize`).
3. INT8 calibrated, when calibration inputs are given: each of onnxruntime's calibration
   methods (`quantize.CALIBRATION_METHODS`), then the biases of the layers that make the
   graph's outputs corrected by the mean error on the calibration inputs, where two-fold
   cross-validation says that lowers the error (`output_bias`).
4. INT8 mixed: the best INT8 candidate with operators kept in fp32 where measurement says
   they lose time or accuracy (`mixed`).
5. Every candidate is measured against the eval-mode original (`accuracy`) and timed with the
   serving options against the fp32 graph (`timing`, batch 1 and `LARGE_BATCH`), with a
   second fp32 session in the same rounds as the A/A control. `choice.choose` picks: within
   the budget, not slower than fp32 beyond the A/A noise at any batch, and the largest
   geometric-mean speedup if it beats fp32 by more than the noise; else the fp32 graph.
6. Before the choice, where the fastest candidate within the budget at batch 1 is not the one
   at `LARGE_BATCH` and no candidate is within the noise of both, the two are joined into one
   graph routed by batch size (`by_batch`; the boundary timed at 2, 4, ... below
   `LARGE_BATCH`), measured like the others and chosen by the same rule.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bnfold.onnx.fold import fold_onnx
from bnfold.onnx.runtime import is_runtime_error, runtime_reason
from bnfold.optimizer import progress
from bnfold.optimizer.accuracy import class_indices, compare
from bnfold.optimizer.bias_correct import correct_biases
from bnfold.optimizer.bn_stats import consistency, read_bn_stats
from bnfold.optimizer.budget import Budget
from bnfold.optimizer.by_batch import crossover, plan, route_by_batch
from bnfold.optimizer.candidates import Candidate, OptimizeReport, OptimizeResult
from bnfold.optimizer.choice import choose, run_noise
from bnfold.optimizer.cuda import optimize_cuda
from bnfold.optimizer.equalize import equalize
from bnfold.optimizer.graph import copy_model, name_nodes
from bnfold.optimizer.hardware import cpu_features
from bnfold.optimizer.inputs import InputSpec, as_feeds, check_feeds, input_spec, rebatch
from bnfold.optimizer.mixed import search_mixed
from bnfold.optimizer.output_bias import correct_output_bias
from bnfold.optimizer.pooling import reduce_mean_as_global_pool
from bnfold.optimizer.quantize import (
    CALIBRATION_METHODS,
    calibrate,
    quantize,
    ranges_cache,
    unquantizable,
)
from bnfold.optimizer.ranges import propagate_ranges
from bnfold.optimizer.source import original_graph, reference_outputs
from bnfold.optimizer.timing import make_session, time_interleaved

__all__ = ["optimize"]

logger = logging.getLogger(__name__)

LARGE_BATCH = 8
TIMING_ROUNDS = 20
SEARCH_ROUNDS = 10
EVAL_BATCHES = 8  # generated inputs for accuracy: this many batches of EVAL_BATCH
EVAL_BATCH = 8
THREADS: int | None = None  # onnxruntime's default, as the service creates sessions


@dataclass
class _Setting:
    """What every stage measures against: the inputs, the eval-mode reference and the budget."""

    spec: InputSpec
    calib_feeds: list[dict] | None
    eval_feeds: list[dict]
    reference: list[np.ndarray]
    labels: np.ndarray | None
    budget: Budget

    def evaluate(self, model: onnx.ModelProto, feeds=None) -> tuple[bool, dict]:
        """(budget met, accuracy) of `model`; `feeds`: the rows of eval_feeds, batched otherwise."""
        accuracy = compare(self.reference, _run(model, feeds or self.eval_feeds), self.labels)
        return self.budget.check(accuracy)[0], accuracy

    def reference_notes(self) -> list[str]:
        """A note where top-1 agreement on these inputs would be met by a constant answer."""
        own = compare(self.reference, self.reference)
        if own["top1_agreement"] is None or self.budget.min_top1_agreement is None:
            return []
        if self.budget.top1_decides(own):
            return []
        limit = self.budget.rel_l2_limit(own)
        return [
            f"the original gives one class on {own['reference_top1_majority']:.0%} of the "
            f"{own['samples']} evaluation inputs, so answering that class always would meet "
            f"top-1 agreement >= {self.budget.min_top1_agreement}: candidates are held to "
            f"relative L2 <= {limit} as well. Calibration inputs from real data (with labels) "
            "make top-1 a test."
        ]

    def measure(self, candidate: Candidate) -> None:
        """Sets the candidate's accuracy and its verdict against the budget."""
        candidate.accuracy = self.evaluate(candidate.model)[1]
        candidate.budget_met, candidate.budget_reasons = self.budget.check(candidate.accuracy)


def optimize(
    model,
    example_inputs=None,
    *,
    target: str = "cpu",
    budget: Budget | None = None,
    calibration: Sequence | None = None,
    labels=None,
) -> OptimizeResult:
    """The fastest verified graph of `model` for `target` (see the module docstring).

    `model`: nn.Module, onnx.ModelProto or path. `calibration`: a list of input tuples (or
    arrays, for one input), one batch each; `labels`: their class indices, concatenated.
    """
    if target not in ("cpu", "cuda"):
        raise ValueError(f"target {target!r}: only 'cpu' and 'cuda' are supported")
    budget = budget or Budget()
    calibration = list(calibration) if calibration is not None else None
    notes: list[str] = []
    with progress.stage("exporting and folding"):
        original, module, more = original_graph(model, example_inputs, calibration)
        notes += more
        stats, stat_notes = read_bn_stats(original)
        folded = fold_onnx(original)
        fp32 = name_nodes(copy_model(folded.model))
    setting = _setting(original, module, example_inputs, calibration, labels, budget)
    notes += setting.reference_notes()
    candidates = [Candidate("fp32", "fp32", "BatchNorm folded (fold_onnx), fp32", fp32)]
    steps: dict = {
        "fold": {
            "modified": folded.modified,
            "nodes_before": folded.nodes_before,
            "nodes_after": folded.nodes_after,
        },
        "bn_statistics": {"tensors": len(stats), "notes": stat_notes},
    }
    if target == "cuda":
        return optimize_cuda(
            candidates[0], steps, setting.measure, budget, setting.spec.describe(), notes
        )
    # the graph every INT8 candidate is quantized from: the same function as fp32, in the
    # form onnxruntime's int8 kernels cover (the fp32 candidate stays as folded)
    quantizable = copy_model(fp32)
    steps["pooling"] = reduce_mean_as_global_pool(quantizable).to_dict()
    steps["fp32_in_every_int8_graph"] = kept = unquantizable(quantizable)
    notes += [f"{name} stays fp32 in every INT8 graph: {why}" for name, why in kept.items()]
    steps["bn_statistics"]["observed_std_over_gamma"] = consistency(
        fp32, stats, (setting.calib_feeds or [setting.spec.example])[0]
    )
    with tempfile.TemporaryDirectory(prefix="bnfold-optimize-") as tmp:
        sources: dict[str, _Source] = {}
        data_free, sources["int8_data_free"], steps["data_free"] = _data_free(
            quantizable, stats, setting, Path(tmp)
        )
        candidates.append(data_free)
        if setting.calib_feeds:
            calibrated, steps["output_bias"] = _calibrated(quantizable, setting, Path(tmp))
            for candidate, source in calibrated:
                candidates.append(candidate)
                sources[candidate.name] = source
        with progress.stage("accuracy", len(candidates)) as step:
            for c in candidates:
                setting.measure(c)
                step()
        timing_feeds = _timing_feeds(setting.spec, fp32)
        with progress.stage("timing", len(timing_feeds)) as step:
            aa = _time_all(candidates, timing_feeds)
            step()
        mixed, steps["mixed"] = _mixed(candidates, sources, setting, timing_feeds, notes)
        if mixed is not None:
            candidates.append(mixed)
            with progress.stage("timing all candidates again", len(timing_feeds)):
                aa = _time_all(candidates, timing_feeds)
        routed, steps["by_batch"] = _by_batch(candidates, setting, aa, notes)
        if routed is not None:
            candidates.append(routed)
            with progress.stage("timing with the graph routed by batch", len(timing_feeds)):
                aa = _time_all(candidates, timing_feeds)
    return _result(candidates, aa, setting, target, steps, notes, list(timing_feeds))


def _setting(original, module, example_inputs, calibration, labels, budget) -> _Setting:
    """The inputs checked against the original graph, and its reference outputs on them."""
    spec = input_spec(original, example_inputs, calibration)
    calib_feeds = as_feeds(spec.names, calibration) if calibration else None
    if calib_feeds and spec.fixed_batch:
        calib_feeds = rebatch(calib_feeds, spec.fixed_batch, "calibration")
    if calib_feeds:
        check_feeds(original, calib_feeds, "calibration")
    check_feeds(original, [spec.example], spec.assumed)
    eval_feeds = calib_feeds or [spec.example, *spec.generated(EVAL_BATCH, EVAL_BATCHES)]
    label_array = None
    if labels is not None:
        if calib_feeds is None:
            raise ValueError("labels are the class indices of the calibration inputs: give both")
        label_array = np.asarray(
            labels.detach().numpy() if hasattr(labels, "detach") else labels
        ).reshape(-1)
    with progress.stage("reference outputs"):
        try:
            reference = reference_outputs(module, original, eval_feeds, _run)
        except Exception as exc:
            if module is not None or not is_runtime_error(exc):
                raise
            raise ValueError(
                f"onnxruntime cannot run the original graph: {runtime_reason(exc)}"
            ) from None
    if label_array is not None:
        if len(label_array) != len(reference[0]):
            raise ValueError(
                f"{len(label_array)} labels for {len(reference[0])} calibration samples"
            )
        scores = reference[0]
        classes = scores.shape[1] if scores.ndim == 2 and scores.shape[1] > 1 else None
        label_array = class_indices(label_array, classes)
    return _Setting(spec, calib_feeds, eval_feeds, reference, label_array, budget)


# what an INT8 candidate was quantized from, so the mixed search can quantize it again:
# (source graph, ranges cache, calibration method, nodes it keeps in fp32)
_Source = tuple[onnx.ModelProto, Path, str, list[str]]


def _data_free(
    quantizable: onnx.ModelProto, stats: dict, setting: _Setting, tmp: Path
) -> tuple[Candidate, _Source, dict]:
    """Step 2: equalization, ranges from the BN statistics, analytic bias correction."""
    spec, calib_feeds = setting.spec, setting.calib_feeds
    with progress.stage("INT8 data-free: equalization, ranges, bias correction", 3) as step:
        model = copy_model(quantizable)
        bn = dict(stats)  # equalization rescales the statistics of the tensors it scales
        eq = equalize(model, bn)
        step()
        range_feeds = (
            calib_feeds[:8] if calib_feeds else [spec.example, *spec.generated(EVAL_BATCH, 3, 2)]
        )
        ranges, replaced = propagate_ranges(model, bn, range_feeds, threads=THREADS)
        step()
        # a graph output (the logits) that no BN describes has a range that depends on
        # correlations between channels, which BN statistics do not carry: its producer
        # stays in fp32 rather than clip on a guessed range
        outputs = {o.name for o in model.graph.output}
        unknown = [
            n.name for n in model.graph.node if any(o in outputs and o not in bn for o in n.output)
        ]
        bc = correct_biases(model, ranges, exclude=set(unknown) | set(unquantizable(model)))
        cache = ranges_cache(ranges, tmp / "data_free.json")
        int8 = quantize(model, cache, exclude=unknown)
    input_note = (
        "graph input ranges from the calibration inputs"
        if calib_feeds
        else f"graph input ranges assumed from {spec.assumed} (no calibration given)"
    )
    step_report = {
        "equalization": eq.to_dict(),
        "bias_correction": bc.to_dict(),
        "bn_sampled_tensors": len(replaced),
        "fp32_outputs": unknown,
        "input_ranges": input_note,
        "high_bias_absorption": "not applied",
    }
    candidate = Candidate(
        "int8_data_free",
        "int8",
        "QDQ int8 (per-channel weights, uint8 activations); activation ranges from BN "
        f"statistics, {len(eq.pairs)} pairs equalized, {bc.corrected} biases corrected; "
        + input_note,
        int8,
    )
    return candidate, (model, cache, "minmax", unknown), step_report


def _calibrated(
    quantizable: onnx.ModelProto, setting: _Setting, tmp: Path
) -> tuple[list[tuple[Candidate, _Source]], dict]:
    """Step 3: each of onnxruntime's calibration methods, the output bias corrected where that
    helps; ([(candidate, source)], the output bias correction's report by candidate)."""
    feeds = setting.calib_feeds
    made, output_bias = [], {}
    with progress.stage("INT8 calibrated", len(CALIBRATION_METHODS)) as step:
        for method in CALIBRATION_METHODS:
            name, cache = f"int8_{method}", tmp / f"{method}.json"
            q = calibrate(quantizable, feeds, method, cache)
            how = (
                f"QDQ int8, onnxruntime quantize_static calibrated with {method} on "
                f"{len(feeds)} input sets"
            )
            source, corrected, bias = correct_output_bias(
                quantizable,
                _run(q, setting.eval_feeds),
                setting.reference,
                lambda m, cache=cache, method=method: quantize(m, cache, method=method),
            )
            output_bias[name] = bias.to_dict()
            if corrected is not None:
                q = corrected
                before, after = bias.held_out_rel_l2_before, bias.held_out_rel_l2_after
                how += (
                    f"; output bias corrected on them (held-out rel L2 {before:.4f} -> {after:.4f})"
                )
            candidate = Candidate(name, "int8", how, q)
            made.append((candidate, (source or quantizable, cache, method, [])))
            step()
    return made, output_bias


def _mixed(
    candidates: list[Candidate],
    sources: dict[str, _Source],
    setting: _Setting,
    timing_feeds: dict[str, dict],
    notes: list[str],
) -> tuple[Candidate | None, dict]:
    """Step 4: the best INT8 candidate with the nodes that measurement says lose time or
    accuracy kept in fp32; (the candidate or None when no node was worth it, its report)."""
    base = _best_int8(candidates)
    source, cache, method, base_exclude = sources[base.name]
    types = len({n.op_type for n in source.graph.node})
    with progress.stage(f"INT8 mixed precision from {base.name}", 2 * types + 1) as step:
        search = search_mixed(
            source,
            lambda exclude: quantize(
                source, cache, method=method, exclude=[*base_exclude, *exclude]
            ),
            setting.evaluate,
            timing_feeds,
            threads=THREADS,
            rounds=SEARCH_ROUNDS,
            progress=step,
            accuracy_feed=setting.eval_feeds[0],
        )
    step_report = {"from": base.name, **search.to_dict()}
    if not search.exclude:
        notes.append("mixed precision: no operator was worth keeping in fp32")
        return None, step_report
    mixed = Candidate(
        "int8_mixed",
        "int8",
        f"{base.name} with {len(search.exclude)} nodes kept in fp32, chosen by measurement",
        search.model,
        excluded_nodes=list(search.exclude),
    )
    setting.measure(mixed)
    return mixed, step_report


def _by_batch(
    candidates: list[Candidate], setting: _Setting, aa: dict[str, float], notes: list[str]
) -> tuple[Candidate | None, dict]:
    """Step 6: one graph routed by batch size, where no one candidate is the fastest at every
    batch; (the routed candidate or None, the routing's report)."""
    routing = plan(*_measured(candidates), run_noise(aa), reference=candidates[0].name)
    if not routing:
        return None, {"built": False}
    routing = _with_crossover(routing, candidates, setting.spec)
    routed = _routed(routing, candidates, setting.evaluate, setting.eval_feeds, setting.budget)
    step_report = routing.to_dict()
    if routed is None:
        step_report["built"] = False
        notes.append("routing by batch: too few evaluation samples to verify both graphs")
    return routed, step_report


def _result(
    candidates: list[Candidate],
    aa: dict[str, float],
    setting: _Setting,
    target: str,
    steps: dict,
    notes: list[str],
    batches: list[str],
) -> OptimizeResult:
    """The choice among the measured candidates, and the report that says why."""
    choice = choose(*_measured(candidates), aa, reference=candidates[0].name)
    chosen = next(c for c in candidates if c.name == choice.chosen)
    calib_feeds = setting.calib_feeds
    report = OptimizeReport(
        target=target,
        cpu=cpu_features(),
        budget=setting.budget.to_dict(),
        chosen=chosen.name,
        why=choice.why,
        inputs={
            **setting.spec.describe(),
            "calibration_sets": len(calib_feeds or []),
            "evaluated_on": (
                "calibration inputs"
                if calib_feeds
                else f"{len(setting.eval_feeds)} generated/example input sets"
            ),
            "labels": setting.labels is not None,
        },
        timing={
            "method": "interleaved, order rotating each round (timing.run_orders), sessions "
            "created in both orders, intra-op spinning off, median of paired ratios to fp32",
            "rounds": TIMING_ROUNDS,
            "aa_control": aa,  # a second fp32 session over the first, same rounds
            "choice": choice.to_dict(),
            "threads": THREADS or "onnxruntime default",
            "batches": batches,
        },
        steps=steps,
        candidates=[c.to_dict() for c in candidates],
        notes=notes,
    )
    return OptimizeResult(chosen.model, candidates, report)


def _run(model: onnx.ModelProto, feeds: Sequence[dict]) -> list[np.ndarray]:
    session = make_session(model, THREADS)
    outs = [session.run(None, f) for f in feeds]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def _timing_feeds(spec: InputSpec, fp32: onnx.ModelProto) -> dict[str, dict]:
    static = any(
        v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].HasField("dim_value")
        for v in fp32.graph.input
        if v.name in spec.names
    )
    batches = [next(iter(spec.example.values())).shape[0]] if static else [1, LARGE_BATCH]
    return {f"batch={b}": spec.generated(b, 1, seed=1)[0] for b in batches}


def _time_all(candidates: list[Candidate], timing_feeds: dict[str, dict]) -> dict[str, float]:
    """Time every candidate against fp32 in one run per batch; returns the A/A control by
    batch (a second fp32 session's ratio to the first, in the same rounds)."""
    fp32 = candidates[0].name
    control = f"{fp32}'"
    models = {c.name: c.model for c in candidates}
    models[control] = candidates[0].model
    aa = {}
    for label, feeds in timing_feeds.items():
        result = time_interleaved(
            models, feeds, reference=fp32, threads=THREADS, rounds=TIMING_ROUNDS
        )
        aa[label] = result[control]["ratio"]
        for c in candidates:
            c.latency[label] = {
                "median_ms": result[c.name]["median_ms"],
                "ratio": result[c.name]["ratio"],
            }
    return aa


def _measured(candidates: list[Candidate]) -> tuple[dict, dict]:
    """(name -> batch -> time over fp32's, name -> budget met): what the choice rules read."""
    return (
        {c.name: {b: v["ratio"] for b, v in c.latency.items()} for c in candidates},
        {c.name: c.budget_met for c in candidates},
    )


def _rebatched(feeds: Sequence[dict], size: int) -> list[dict]:
    """The same rows in batches of `size` (the last one smaller), in order."""
    whole = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    rows = len(next(iter(whole.values())))
    return [{k: v[i : i + size] for k, v in whole.items()} for i in range(0, rows, size)]


def _with_crossover(routing, candidates: list[Candidate], spec: InputSpec):
    """`routing` with its boundary measured: the two graphs timed against each other at the
    powers of two between batch 1 and `LARGE_BATCH` (`by_batch.crossover`)."""
    by_name = {c.name: c for c in candidates}
    small, large = by_name[routing.small].model, by_name[routing.large].model
    between = {}
    batch = 2 * routing.max_small
    while batch < LARGE_BATCH:
        feeds = spec.generated(batch, 1, seed=1)[0]
        timed = time_interleaved(
            {"large": large, "small": small},
            feeds,
            reference="large",
            threads=THREADS,
            rounds=SEARCH_ROUNDS,
        )
        between[batch] = timed["small"]["ratio"]
        if not between[batch] < 1.0:
            break
        batch *= 2
    return crossover(routing, between)


def _routed(routing, candidates, evaluate_batches, eval_feeds, budget) -> Candidate | None:
    """The routed candidate, its accuracy the worse of its two branches, each measured
    through the routed graph (rows one batch of `max_small` at a time, then in batches above
    it); None when there are too few rows to run the large branch."""
    by_name = {c.name: c for c in candidates}
    small, large = by_name[routing.small], by_name[routing.large]
    rows = sum(len(next(iter(f.values()))) for f in eval_feeds)
    if rows <= routing.max_small:
        return None
    model = route_by_batch(small.model, large.model, routing.max_small)
    precisions = dict.fromkeys((small.precision, large.precision))
    routed = Candidate(
        routing.name,
        "+".join(precisions),
        f"{small.name} at batch <= {routing.max_small}, {large.name} above (one graph, an If "
        "on the batch size)",
        model,
        excluded_nodes=list(large.excluded_nodes),
        notes=[
            "boundary timed at batch "
            + (", ".join(f"{b} ({r:.3f}x)" for b, r in routing.between.items()) or "none")
            + f" ({small.name}'s time over {large.name}'s)",
            "holds both graphs' weights",
        ],
    )
    accuracies = [
        evaluate_batches(model, _rebatched(eval_feeds, size))[1]
        for size in (routing.max_small, max(LARGE_BATCH, routing.max_small + 1))
    ]
    routed.accuracy = max(accuracies, key=lambda a: a["rel_l2"])
    checks = [budget.check(a) for a in accuracies]
    routed.budget_met = all(met for met, _ in checks)
    routed.budget_reasons = [r for _, reasons in checks for r in reasons]
    return routed


def _best_int8(candidates: list[Candidate]) -> Candidate:
    int8 = [c for c in candidates if c.precision == "int8"]
    met = [c for c in int8 if c.budget_met]
    if met:
        return max(met, key=lambda c: c.speedup or 0.0)
    return min(int8, key=lambda c: c.accuracy["rel_l2"])
