"""What input alignment adds to a recalibration: recalibrate_onnx with and without
``align_input`` on a torchvision ResNet-18 at 224x224 (random weights, BN statistics measured
on uniform inputs, as training would leave them), 64 samples of a squared inversion in batches
of 32; one process, wall clock of each call.

    .venv/bin/python bench/alignment_cost.py [--out bench/results/alignment_cost.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torchvision

    import bnfold
    from bnfold.drift import recalibrate_onnx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=100).train()
    with torch.no_grad():  # statistics as training would leave them
        for _ in range(4):
            model(torch.rand(16, 3, 224, 224))
    graph = bnfold.export_onnx(model.eval(), (torch.rand(2, 3, 224, 224),), dynamic_batch=True)
    x = (1 - np.random.default_rng(0).uniform(0, 1, (64, 3, 224, 224))).astype(np.float32) ** 2
    name = graph.graph.input[0].name
    batches = [{name: x[i : i + 32]} for i in range(0, 64, 32)]
    out = {}
    for align in (False, True):
        start = time.perf_counter()
        result = recalibrate_onnx(graph, batches, align_input=align)
        out[f"align_input={align}"] = {
            "seconds": time.perf_counter() - start,
            "input_alignment": result.input_alignment,
        }
        print(f"align_input={align}: {out[f'align_input={align}']['seconds']:.1f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
