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
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from bnfold.optimizer import progress
from bnfold.optimizer.accuracy import compare
from bnfold.optimizer.bias_correct import correct_biases
from bnfold.optimizer.bn_stats import consistency, read_bn_stats
from bnfold.optimizer.budget import Budget
from bnfold.optimizer.by_batch import crossover, plan, route_by_batch
from bnfold.optimizer.candidates import Candidate, OptimizeReport, OptimizeResult
from bnfold.optimizer.choice import choose, run_noise
from bnfold.optimizer.equalize import equalize
from bnfold.optimizer.graph import copy_model, name_nodes
from bnfold.optimizer.hardware import cpu_features
from bnfold.optimizer.inputs import InputSpec, as_feeds, check_feeds, input_spec
from bnfold.optimizer.mixed import search_mixed
from bnfold.optimizer.output_bias import correct_output_bias
from bnfold.optimizer.pooling import reduce_mean_as_global_pool
from bnfold.optimizer.quantize import CALIBRATION_METHODS, calibrate, quantize, ranges_cache
from bnfold.optimizer.ranges import propagate_ranges
from bnfold.optimizer.timing import make_session, time_interleaved

__all__ = ["optimize"]

logger = logging.getLogger(__name__)

LARGE_BATCH = 8
TIMING_ROUNDS = 20
SEARCH_ROUNDS = 10
EVAL_BATCHES = 8  # generated inputs for accuracy: this many batches of EVAL_BATCH
EVAL_BATCH = 8
THREADS: int | None = None  # onnxruntime's default, as the service creates sessions


def _original_graph(model, inputs: tuple | None) -> tuple[onnx.ModelProto, object, list[str]]:
    """(graph with BN intact, torch module or None, notes)."""
    import torch

    if isinstance(model, torch.nn.Module):
        from bnfold.onnx.export import export_onnx

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
    if isinstance(model, onnx.ModelProto):
        return model, None, _symbolic_dims_note(model)
    if isinstance(model, str | os.PathLike):
        proto = onnx.load(os.fspath(model))
        return proto, None, _symbolic_dims_note(proto)
    raise TypeError(f"model must be an nn.Module, an onnx.ModelProto or a path, not {type(model)}")


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


def _run(model: onnx.ModelProto, feeds: Sequence[dict]) -> list[np.ndarray]:
    session = make_session(model, THREADS)
    outs = [session.run(None, f) for f in feeds]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def _reference(module, original: onnx.ModelProto, feeds: Sequence[dict]) -> list[np.ndarray]:
    if module is None:
        return _run(original, feeds)
    import torch

    outs = []
    module.eval()
    with torch.no_grad():
        for feed in feeds:
            y = module(*[torch.from_numpy(v) for v in feed.values()])
            ys = y if isinstance(y, list | tuple) else (y,)
            outs.append([t.detach().numpy() for t in ys])
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def _timing_feeds(spec: InputSpec, fp32: onnx.ModelProto) -> dict[str, dict]:
    static = any(
        v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].HasField("dim_value")
        for v in fp32.graph.input
        if v.name in spec.names
    )
    batches = [next(iter(spec.example.values())).shape[0]] if static else [1, LARGE_BATCH]
    return {f"batch={b}": spec.generated(b, 1, seed=1)[0] for b in batches}


def _example_tuple(example_inputs, calibration) -> tuple | None:
    source = example_inputs if example_inputs is not None else (calibration or [None])[0]
    if source is None:
        return None
    return tuple(source) if isinstance(source, list | tuple) else (source,)


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
    import torch

    with progress.stage("exporting and folding"):
        inputs = _example_tuple(example_inputs, calibration)
        if inputs is not None:
            inputs = tuple(
                torch.as_tensor(np.asarray(x)) if not hasattr(x, "detach") else x for x in inputs
            )
        original, module, more = _original_graph(model, inputs)
        notes += more
        from bnfold.onnx.fold import fold_onnx

        stats, stat_notes = read_bn_stats(original)
        folded_result = fold_onnx(original)
        fp32 = name_nodes(copy_model(folded_result.model))
    spec = input_spec(original, example_inputs if example_inputs is not None else None, calibration)
    calib_feeds = as_feeds(spec.names, calibration) if calibration else None
    if calib_feeds:
        check_feeds(original, calib_feeds, "calibration")
    check_feeds(original, [spec.example], spec.assumed)
    eval_feeds = calib_feeds or [spec.example, *spec.generated(EVAL_BATCH, EVAL_BATCHES)]
    label_array = (
        None
        if labels is None
        else np.asarray(labels.detach().numpy() if hasattr(labels, "detach") else labels).reshape(
            -1
        )
    )
    if label_array is not None and calib_feeds is None:
        raise ValueError("labels are the class indices of the calibration inputs: give both")
    with progress.stage("reference outputs"):
        reference = _reference(module, original, eval_feeds)
    if label_array is not None and len(label_array) != len(reference[0]):
        raise ValueError(f"{len(label_array)} labels for {len(reference[0])} calibration samples")

    def evaluate(candidate_model: onnx.ModelProto, feeds=None) -> tuple[bool, dict]:
        # `feeds`: the same rows as eval_feeds, batched otherwise
        acc = compare(reference, _run(candidate_model, feeds or eval_feeds), label_array)
        met, _ = budget.check(acc)
        return met, acc

    candidates: list[Candidate] = [
        Candidate("fp32", "fp32", "BatchNorm folded (fold_onnx), fp32", fp32)
    ]
    steps: dict = {
        "fold": {
            "modified": folded_result.modified,
            "nodes_before": folded_result.nodes_before,
            "nodes_after": folded_result.nodes_after,
        },
        "bn_statistics": {"tensors": len(stats), "notes": stat_notes},
    }
    if target == "cuda":
        return _optimize_cuda(candidates, steps, evaluate, budget, spec, notes)
    tmp = tempfile.TemporaryDirectory(prefix="bnfold-optimize-")
    # the graph every INT8 candidate is quantized from: the same function as fp32, in the
    # form onnxruntime's int8 kernels cover (the fp32 candidate stays as folded)
    quantizable = copy_model(fp32)
    steps["pooling"] = reduce_mean_as_global_pool(quantizable).to_dict()
    caches: dict[str, tuple] = {}  # candidate -> (source graph, ranges cache, method, exclude)
    try:
        # step 2: data-free
        with progress.stage("INT8 data-free: equalization, ranges, bias correction", 3) as step:
            data_free = copy_model(quantizable)
            bn = {k: v for k, v in stats.items()}
            eq = equalize(data_free, bn)
            step()
            steps["bn_statistics"]["observed_std_over_gamma"] = consistency(
                fp32, stats, (calib_feeds or [spec.example])[0]
            )
            range_feeds = (
                calib_feeds[:8]
                if calib_feeds
                else [spec.example, *spec.generated(EVAL_BATCH, 3, 2)]
            )
            ranges, replaced = propagate_ranges(data_free, bn, range_feeds, threads=THREADS)
            step()
            # a graph output (the logits) that no BN describes has a range that depends on
            # correlations between channels, which BN statistics do not carry: its producer
            # stays in fp32 rather than clip on a guessed range
            outputs = {o.name for o in data_free.graph.output}
            unknown = [
                n.name
                for n in data_free.graph.node
                if any(o in outputs and o not in bn for o in n.output)
            ]
            bc = correct_biases(data_free, ranges, exclude=set(unknown))
            cache = ranges_cache(ranges, Path(tmp.name, "data_free.json"))
            int8 = quantize(data_free, cache, exclude=unknown)
            caches["int8_data_free"] = (data_free, cache, "minmax", unknown)
        input_note = (
            "graph input ranges from the calibration inputs"
            if calib_feeds
            else f"graph input ranges assumed from {spec.assumed} (no calibration given)"
        )
        steps["data_free"] = {
            "equalization": eq.to_dict(),
            "bias_correction": bc.to_dict(),
            "bn_sampled_tensors": len(replaced),
            "fp32_outputs": unknown,
            "input_ranges": input_note,
            "high_bias_absorption": "not applied",
        }
        candidates.append(
            Candidate(
                "int8_data_free",
                "int8",
                "QDQ int8 (per-channel weights, uint8 activations); activation ranges from BN "
                f"statistics, {len(eq.pairs)} pairs equalized, {bc.corrected} biases corrected; "
                + input_note,
                int8,
            )
        )
        # step 3: calibrated
        if calib_feeds:
            with progress.stage("INT8 calibrated", len(CALIBRATION_METHODS)) as step:
                for method in CALIBRATION_METHODS:
                    cache = Path(tmp.name, f"{method}.json")
                    q = calibrate(quantizable, calib_feeds, method, cache)
                    how = (
                        f"QDQ int8, onnxruntime quantize_static calibrated with {method} on "
                        f"{len(calib_feeds)} input sets"
                    )
                    source, corrected, bias = correct_output_bias(
                        quantizable,
                        _run(q, eval_feeds),
                        reference,
                        lambda m, cache=cache, method=method: quantize(m, cache, method=method),
                    )
                    steps.setdefault("output_bias", {})[f"int8_{method}"] = bias.to_dict()
                    if corrected is not None:
                        q = corrected
                        before, after = bias.held_out_rel_l2_before, bias.held_out_rel_l2_after
                        how += (
                            f"; output bias corrected on them (held-out rel L2 {before:.4f} -> "
                            f"{after:.4f})"
                        )
                    caches[f"int8_{method}"] = (source or quantizable, cache, method, [])
                    candidates.append(Candidate(f"int8_{method}", "int8", how, q))
                    step()
        with progress.stage("accuracy", len(candidates)) as step:
            for c in candidates:
                c.budget_met, c.accuracy = evaluate(c.model)
                c.budget_met, c.budget_reasons = budget.check(c.accuracy)
                step()
        timing_feeds = _timing_feeds(spec, fp32)
        with progress.stage("timing", len(timing_feeds)) as step:
            aa = _time_all(candidates, timing_feeds)
            step()
        # step 4: mixed, from the best INT8 candidate
        base = _best_int8(candidates)
        source, cache, method, base_exclude = caches[base.name]
        types = len({n.op_type for n in source.graph.node})
        with progress.stage(f"INT8 mixed precision from {base.name}", 2 * types + 1) as step:
            search = search_mixed(
                source,
                lambda exclude: quantize(
                    source, cache, method=method, exclude=[*base_exclude, *exclude]
                ),
                evaluate,
                timing_feeds,
                threads=THREADS,
                rounds=SEARCH_ROUNDS,
                progress=step,
                accuracy_feed=eval_feeds[0],
            )
        steps["mixed"] = {"from": base.name, **search.to_dict()}
        if search.exclude:
            mixed = Candidate(
                "int8_mixed",
                "int8",
                f"{base.name} with {len(search.exclude)} nodes kept in fp32, chosen by measurement",
                search.model,
                excluded_nodes=list(search.exclude),
            )
            mixed.accuracy = evaluate(mixed.model)[1]
            mixed.budget_met, mixed.budget_reasons = budget.check(mixed.accuracy)
            candidates.append(mixed)
            with progress.stage("timing all candidates again", len(timing_feeds)):
                aa = _time_all(candidates, timing_feeds)
        else:
            notes.append("mixed precision: no operator was worth keeping in fp32")
        # step 6: a graph per batch size, where no one candidate is the fastest at every batch
        routing = plan(*_measured(candidates), run_noise(aa), reference=candidates[0].name)
        routed = None
        if routing:
            routing = _with_crossover(routing, candidates, spec)
            routed = _routed(routing, candidates, evaluate, eval_feeds, budget)
        steps["by_batch"] = routing.to_dict() if routing else {"built": False}
        if routed is not None:
            candidates.append(routed)
            with progress.stage("timing with the graph routed by batch", len(timing_feeds)):
                aa = _time_all(candidates, timing_feeds)
        elif routing:
            steps["by_batch"]["built"] = False
            notes.append("routing by batch: too few evaluation samples to verify both graphs")
    finally:
        tmp.cleanup()
    choice = choose(*_measured(candidates), aa, reference=candidates[0].name)
    chosen = next(c for c in candidates if c.name == choice.chosen)
    why = choice.why
    report = OptimizeReport(
        target=target,
        cpu=cpu_features(),
        budget=budget.to_dict(),
        chosen=chosen.name,
        why=why,
        inputs={
            **spec.describe(),
            "calibration_sets": len(calib_feeds or []),
            "evaluated_on": (
                "calibration inputs"
                if calib_feeds
                else f"{len(eval_feeds)} generated/example input sets"
            ),
            "labels": label_array is not None,
        },
        timing={
            "method": "interleaved, order rotating each round (timing.run_orders), sessions "
            "created in both orders, intra-op spinning off, median of paired ratios to fp32",
            "rounds": TIMING_ROUNDS,
            "aa_control": aa,  # a second fp32 session over the first, same rounds
            "choice": choice.to_dict(),
            "threads": THREADS or "onnxruntime default",
            "batches": list(timing_feeds),
        },
        steps=steps,
        candidates=[c.to_dict() for c in candidates],
        notes=notes,
    )
    return OptimizeResult(chosen.model, candidates, report)


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


def _optimize_cuda(candidates, steps, evaluate, budget, spec, notes) -> OptimizeResult:
    """fp32 and fp16 candidates, checked through onnxruntime here; timed only on a CUDA
    device, which this function does not have: the fp32 graph is chosen, fp16 is offered."""
    from bnfold.optimizer.fp16 import to_fp16

    fp32 = candidates[0]
    with progress.stage("fp16 for CUDA"):
        half = to_fp16(fp32.model)
    steps["fp16"] = half.to_dict()
    candidates.append(
        Candidate(
            "fp16",
            "fp16",
            "fp16 weights and compute, fp32 graph inputs and outputs (onnxruntime's float16 "
            f"converter); {len(half.overflow_nodes)} node(s) with weights beyond 65504 and "
            f"{len(half.kept_fp32) - len(half.overflow_nodes)} fp16-sensitive node(s) in fp32",
            half.model,
            excluded_nodes=list(half.kept_fp32),
        )
    )
    with progress.stage("accuracy", len(candidates)) as step:
        for c in candidates:
            c.accuracy = evaluate(c.model)[1]
            c.budget_met, c.budget_reasons = budget.check(c.accuracy)
            step()
    notes.append(
        "target cuda: candidates are checked for accuracy through onnxruntime on this machine "
        "but not timed (no CUDA device here); the fp32 graph is chosen, and the fp16 candidate "
        "is in .candidates with its accuracy"
    )
    report = OptimizeReport(
        target="cuda",
        cpu=cpu_features(),
        budget=budget.to_dict(),
        chosen=fp32.name,
        why="not timed on a CUDA device: nothing shown faster than fp32",
        inputs=spec.describe(),
        timing={"method": "none: needs a CUDA device"},
        steps=steps,
        candidates=[c.to_dict() for c in candidates],
        notes=notes,
    )
    return OptimizeResult(fp32.model, candidates, report)
