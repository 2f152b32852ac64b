"""onnxruntime CPU latency: unfolded vs folded graphs, and the dynamo + ORT_ENABLE_ALL anchor.

    .venv/bin/python bench/onnx_latency.py [--models resnet18,mobilenet_v3_small]
        [--size 224] [--batch 1] [--threads 1] [--rounds 30]

Graphs per model: U = bnfold.export_onnx (BN intact), F = fold_onnx(U), A = the anchor,
torch.onnx.export(dynamo=True, optimize=True) whose onnxscript rewriter fuses Conv+BN.
U and F run at each ORT level (DISABLE_ALL, ENABLE_BASIC, ENABLE_ALL), A at ENABLE_ALL.
Sessions use fixed thread counts; runs are interleaved (one run of every session per round,
the order rotating); the median per session is reported, and paired ratios: the median over
rounds of one session's time over another's in the same round, which cancels drift.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnx_models import build  # noqa: E402

from bnfold.onnx.export import export_onnx, ort_max_ir_version  # noqa: E402
from bnfold.onnx.fold import fold_onnx  # noqa: E402

LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PAIRS = [("F/off", "U/off"), ("F/basic", "U/basic"), ("F/all", "U/all"), ("F/all", "A/all")]
DEFAULT_MODELS = "resnet18,resnet50,mobilenet_v3_small,efficientnet_b0,regnet_y_400mf,timm:dla34"


def anchor_export(model: torch.nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            optimize=True,
            dynamic_shapes=({0: torch.export.Dim.AUTO},),
        )
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, ort_max_ir_version())
    return proto


def session(model: onnx.ModelProto, level: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def bench_model(name: str, size: int, batch: int, threads: int, rounds: int) -> dict:
    model, _, _ = build(name, size)
    x = torch.randn(batch, 3, size, size)
    unfolded = export_onnx(model, (x,), dynamic_spatial=False)  # like the anchor
    folded = fold_onnx(unfolded).model
    anchor = anchor_export(model, torch.cat([x, x]) if batch == 1 else x)
    configs = {f"U/{lv}": (unfolded, lv) for lv in LEVELS}
    configs.update({f"F/{lv}": (folded, lv) for lv in LEVELS})
    configs["A/all"] = (anchor, "all")
    sessions = {k: session(m, lv, threads) for k, (m, lv) in configs.items()}
    feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    outputs = {k: s.run(None, feeds[k])[0] for k, s in sessions.items()}  # warm-up + check
    ref = outputs["U/off"]
    max_diff = max(float(np.abs(o - ref).max()) for o in outputs.values())
    for _ in range(2):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    row = {"model": name, "max_abs_diff": max_diff}
    row.update({k: statistics.median(v) * 1e3 for k, v in times.items()})
    # paired: the ratio of two sessions' times within one round, median over rounds; drift
    # and neighbours' load hit both halves of a pair alike
    for a, b in PAIRS:
        row[f"{a}÷{b}"] = statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
    bn = {
        "U": sum(n.op_type == "BatchNormalization" for n in unfolded.graph.node),
        "F": sum(n.op_type == "BatchNormalization" for n in folded.graph.node),
        "A": sum(n.op_type == "BatchNormalization" for n in anchor.graph.node),
    }
    row["bn"] = bn
    row["same_ops_as_anchor"] = _op_counts(folded) == _op_counts(anchor)
    return row


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def markdown(rows: list[dict]) -> str:
    cols = ["U/off", "F/off", "U/basic", "F/basic", "U/all", "F/all", "A/all"]
    pairs = [f"{a}÷{b}" for a, b in PAIRS]
    lines = [
        "| model | BN U/F/A | "
        + " | ".join(f"{c} ms" for c in cols)
        + " | "
        + " | ".join(pairs)
        + " | F ops = A ops |",
        "|" + "---|" * (len(cols) + len(pairs) + 3),
    ]
    for r in rows:
        bn = r["bn"]
        cells = " | ".join(f"{r[c]:.2f}" for c in cols)
        ratios = " | ".join(f"{r[p]:.3f}" for p in pairs)
        same = "yes" if r["same_ops_as_anchor"] else "no"
        lines.append(
            f"| {r['model']} | {bn['U']}/{bn['F']}/{bn['A']} | {cells} | {ratios} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    rows = []
    for name in args.models.split(","):
        print(f"== {name}", file=sys.stderr, flush=True)
        rows.append(bench_model(name, args.size, args.batch, args.threads, args.rounds))
        print(rows[-1], file=sys.stderr, flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
