"""BatchNormalization left in ONNX graphs by fold_onnx and by the other BN fusers.

    .venv/bin/python bench/onnx_coverage.py [--models resnet18,timm:dla34,zoo:preact_net]
        [--size 64] [--static-batch] [--json results.json]
    .venv/bin/python bench/onnx_coverage.py --models placements --static-batch

`placements` names the small modules of `onnx_models.PLACEMENTS`: a BN with a node the
exporter writes between it and the layer it folds into (Transpose, Reshape, Pad).

Each model is exported with its BN intact (bnfold.export_onnx, dynamic batch, static spatial
dims), then handed to:
fold_onnx, onnxscript's optimizer (what the dynamo exporter's optimize=True runs),
onnxoptimizer's fuse_bn_into_conv, onnxsim, and onnxruntime's own optimizer (ORT_ENABLE_EXTENDED,
the optimized graph saved and counted). fold_onnx's output is also verified in onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from onnx_models import PLACEMENTS, all_names, build  # noqa: E402

from bnfold.onnx.export import export_onnx  # noqa: E402
from bnfold.onnx.fold import fold_onnx  # noqa: E402
from bnfold.onnx.verify import verify_onnx  # noqa: E402


def bn_count(model: onnx.ModelProto) -> int:
    def count(graph):
        n = 0
        for node in graph.node:
            n += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                if attr.HasField("g"):
                    n += count(attr.g)
        return n

    return count(model.graph)


def with_static_input(model: onnx.ModelProto, shapes: list[list[int]]) -> onnx.ModelProto:
    """Some tools only work with static shapes; give them the benchmark's input shape."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for value, shape in zip(m.graph.input, shapes, strict=False):
        for dim, size in zip(value.type.tensor_type.shape.dim, shape, strict=True):
            dim.Clear()
            dim.dim_value = size
    return m


def onnxscript_rewriter(model):
    import onnxscript.optimizer

    return onnxscript.optimizer.optimize(model)


def onnxoptimizer_fuse(model):
    import onnxoptimizer

    return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])


def onnxsim_simplify(model, shapes):
    import onnxsim

    simplified, ok = onnxsim.simplify(with_static_input(model, shapes))
    if not ok:
        raise RuntimeError("onnxsim check failed")
    return simplified


def ort_optimizer(model):
    """ORT_ENABLE_EXTENDED: the highest level whose saved graph still names BN. ENABLE_ALL's
    NCHWc layout pass turns a standalone BN into an NCHWc depthwise 1x1 Conv, which computes
    the BN rather than folding it, and would read as 0 here."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(path)


TOOLS = ("onnxscript", "onnxoptimizer", "onnxsim", "ort")


def measure(name: str, size: int, static_batch: bool = False) -> dict:
    row: dict = {"model": name}
    model, inputs, meta = build(name, size)
    t0 = time.perf_counter()
    # static spatial dims: they do not change what folds, and torch.export's symbolic
    # reasoning about them takes minutes on some models (timm's tf_* "same" padding)
    exported = export_onnx(model, inputs, dynamic_batch=not static_batch, dynamic_spatial=False)
    row["export_s"] = round(time.perf_counter() - t0, 1)
    row["nodes"] = len(exported.graph.node)
    row["bn_exported"] = bn_count(exported)
    shapes = meta["shapes"]
    batches = (1, 3)
    if static_batch:  # the graph takes the example's batch size only
        batches = (inputs[0].shape[0],)
        shapes = [[batches[0], *s[1:]] for s in shapes]
    input_shapes = {v.name: s for v, s in zip(exported.graph.input, shapes, strict=False)}

    t0 = time.perf_counter()
    result = fold_onnx(exported)
    row["fold_s"] = round(time.perf_counter() - t0, 2)
    row["bnfold"] = bn_count(result.model)
    row["bnfold_nodes"] = len(result.model.graph.node)
    check = verify_onnx(exported, result.model, input_shapes=input_shapes, batch_sizes=batches)
    row["verify_ok"] = check.ok
    row["verify_max_rel"] = check.max_rel_err

    tools = {
        "onnxscript": lambda: onnxscript_rewriter(exported),
        "onnxoptimizer": lambda: onnxoptimizer_fuse(exported),
        "onnxsim": lambda: onnxsim_simplify(exported, shapes),
        "ort": lambda: ort_optimizer(exported),
    }
    for tool, run in tools.items():
        try:
            row[tool] = bn_count(run())
        except Exception as exc:  # noqa: BLE001 - a tool failing on a model is a result
            row[tool] = None
            row[f"{tool}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    others = [row[t] for t in tools if row[t] is not None]
    row["bnfold_le_best"] = not others or row["bnfold"] <= min(others)
    return row


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | BN exported | bnfold | onnxscript | onnxoptimizer | onnxsim | ORT | "
        "bnfold <= best | verify max rel err | fold s |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error']} |" + " |" * 8)
            continue
        cell = {t: "fail" if r.get(t) is None else str(r[t]) for t in TOOLS}
        lines.append(
            f"| {r['model']} | {r['bn_exported']} | {r['bnfold']} | {cell['onnxscript']} | "
            f"{cell['onnxoptimizer']} | {cell['onnxsim']} | {cell['ort']} | "
            f"{'yes' if r['bnfold_le_best'] else 'NO'} | {r['verify_max_rel']:.1e}"
            f"{'' if r['verify_ok'] else ' FAIL'} | {r['fold_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated; default: all")
    parser.add_argument("--size", type=int, default=64, help="input height/width for images")
    parser.add_argument(
        "--static-batch", action="store_true", help="export a fixed batch size (static shapes)"
    )
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    names = args.models.split(",") if args.models else all_names()
    if names == ["placements"]:
        names = [f"placement:{n}" for n in PLACEMENTS]
    rows = []
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            rows.append(measure(name, args.size, args.static_batch))
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": name, "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
