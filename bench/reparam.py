"""Structural reparameterization: bnfold vs timm's own reparameterize_model vs dynamo export.

For RepVGG and MobileOne from timm (seeded random weights, BN statistics calibrated on a random
batch then perturbed, as in bench/torch_fold.py), three ONNX graphs of the same model:

- bnfold: `bnfold.fold` (BN folding + branch merging) then `bnfold.export_onnx`;
- timm:   `timm.utils.reparameterize_model` (model-specific code) then `bnfold.export_onnx`;
- dynamo: `torch.onnx.export(dynamo=True, optimize=True)` of the unmodified model.

Reported: BatchNormalization and Conv nodes in each graph, relative L2 error against the eval
original (through onnxruntime), and onnxruntime CPU latency per image: ORT_ENABLE_ALL for all,
intra-op threads fixed, the three sessions run interleaved, median of the rounds.

    python bench/reparam.py --models mobileone_s0 repvgg_a0 --rounds 30 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from torch_fold import build, count_onnx_bn, rel_l2  # noqa: E402

import bnfold  # noqa: E402


def _count(proto, op: str) -> int:
    return sum(node.op_type == op for node in proto.graph.node)


def _session(proto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), opts, ["CPUExecutionProvider"])


def graphs(name: str) -> tuple[dict, torch.Tensor, torch.Tensor]:
    import timm

    model, x = build(f"timm:{name}")
    with torch.no_grad():
        ref = model(x)
    out = {}
    t = time.perf_counter()
    folded = bnfold.fold(model, (x,))
    out["bnfold"] = (bnfold.export_onnx(folded.module, (x,)), time.perf_counter() - t)
    reparam = timm.utils.reparameterize_model(copy.deepcopy(model))
    out["timm"] = (bnfold.export_onnx(reparam, (x,)), None)
    with contextlib.redirect_stdout(None), contextlib.redirect_stderr(None):
        program = torch.onnx.export(copy.deepcopy(model), (x,), dynamo=True, optimize=True)
    out["dynamo"] = (program.model_proto, None)
    return out, x, ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mobileone_s0", "repvgg_a0"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(
        "| model | graph | BatchNormalization | Conv | rel L2 vs eval original "
        "| ORT CPU ms/image (median) | vs timm |\n|---|---|---|---|---|---|---|"
    )
    for name in args.models:
        protos, x, ref = graphs(name)
        sessions = {k: _session(p, args.threads) for k, (p, _) in protos.items()}
        feeds = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
        errors = {}
        for k, s in sessions.items():
            out = s.run(None, feeds[k])[0]
            errors[k] = rel_l2(torch.from_numpy(np.asarray(out)), ref)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for k, s in sessions.items():  # warm-up
            for _ in range(3):
                s.run(None, feeds[k])
        for _ in range(args.rounds):
            for k, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append((time.perf_counter() - t) * 1e3)
        medians = {k: statistics.median(v) for k, v in times.items()}
        for k, (proto, _) in protos.items():
            print(
                f"| {name} | {k} | {count_onnx_bn(proto)} | {_count(proto, 'Conv')} "
                f"| {errors[k]:.1e} | {medians[k]:.2f} | {medians[k] / medians['timm']:.2f}x |"
            )


if __name__ == "__main__":
    main()
