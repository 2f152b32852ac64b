"""Torch and ONNX folds compared on every architecture of bench/torch_fold.py.

The comparison and its rule (BN left, branch merges, the closed list of side-specific reasons
that excuse a difference) are tests/bnfold/test_fold_parity.py's; that test runs a subset,
this runs them all. Random weights, randomized BN statistics, one 2x3xSxS input (S = 64, or
the model's own size where it needs one).

    python bench/fold_parity.py --jobs 2 --out bench/out/fold_parity.jsonl
    python bench/fold_parity.py --models resnet18 timm:repghostnet_050
    python bench/fold_parity.py --render bench/out/fold_parity.jsonl
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests" / "bnfold")]


MAX_PARAMS = 100_000_000  # larger models (ViT-H, RegNet-Y 128GF) take minutes and GBs to export


def compare_one(name: str, size: int = 64) -> dict:
    import torch

    torch.set_num_threads(1)
    from test_fold_parity import build_architecture, disagreements, fold_both

    row: dict = {"model": name}
    t = time.perf_counter()
    try:
        try:
            model, inputs = build_architecture(name, size)
            with torch.no_grad():
                model(*inputs)
        except Exception:  # noqa: BLE001 - a fixed-size model (ViT): its own input size
            model, inputs = build_architecture(name, 224)
        row["size"] = inputs[0].shape[-1]
        params = sum(p.numel() for p in model.parameters())
        if params > MAX_PARAMS:
            return row | {"error": f"skipped: {params / 1e6:.0f}M parameters"}
        torch_side, onnx_side = fold_both(model, inputs)
    except Exception as exc:  # noqa: BLE001 - a model that does not export is a result
        return row | {"error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    row["seconds"] = round(time.perf_counter() - t, 1)
    for side, s in (("torch", torch_side), ("onnx", onnx_side)):
        row[f"{side}_bn_left"] = s.bn_left
        row[f"{side}_merges"] = sum(s.merges.values())
    row["problems"] = disagreements(torch_side, onnx_side)
    row["agree"] = not row["problems"]
    row["same_counts"] = (torch_side.bn_left, torch_side.merges) == (
        onnx_side.bn_left,
        onnx_side.merges,
    )
    return row


def render(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [
        "| model | BN left torch | BN left ONNX | merges torch | merges ONNX | agree |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["model"]):
        if "error" in r:
            lines.append(f"| {r['model']} | error: {r['error'][:80]} | | | | |")
            continue
        verdict = "yes" if r["same_counts"] else "excused" if r["agree"] else "NO"
        lines.append(
            f"| {r['model']} | {r['torch_bn_left']} | {r['onnx_bn_left']} | "
            f"{r['torch_merges']} | {r['onnx_merges']} | {verdict} |"
        )
    done = [r for r in rows if "error" not in r]
    same = sum(r["same_counts"] for r in done)
    excused = sum(r["agree"] and not r["same_counts"] for r in done)
    lines.append(
        f"\n{len(rows)} models, {len(rows) - len(done)} not compared (build or export failed); "
        f"of {len(done)} compared: {same} identical, {excused} differ with a side-specific "
        f"reason, {len(done) - same - excused} disagree."
    )
    for r in done:
        for p in r["problems"]:
            lines.append(f"- {r['model']}: {p}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/out/fold_parity.jsonl"))
    parser.add_argument("--render", type=Path)
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return
    from torch_fold import model_names

    names = args.models or model_names()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (
        args.out.open("w") as f,
        mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool,
    ):
        for row in pool.imap_unordered(compare_one, names):
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
    print(render(args.out))


if __name__ == "__main__":
    main()
