"""What the repairs in front add to a recalibration: recalibrate_onnx with and without
``align_input`` on a torchvision ResNet-18 at 224x224 (random weights, BN statistics measured
on uniform inputs, 4 batches of 16, cumulative), 64 samples in batches of 32 of a squared
inversion (the input map is fitted, the denoising filter is not) and of the uniform inputs
with Gaussian noise of std 0.2 (the denoising filters are fitted and re-estimated too); one
process, wall clock of each call.

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
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # the cumulative average: the population statistics of the data
    with torch.no_grad():  # statistics as training would leave them
        for _ in range(4):
            model(torch.rand(16, 3, 224, 224))
    graph = bnfold.export_onnx(model.eval(), (torch.rand(2, 3, 224, 224),), dynamic_batch=True)
    rng = np.random.default_rng(0)
    uniform = rng.uniform(0, 1, (64, 3, 224, 224)).astype(np.float32)
    data = {
        "inverted": (1 - uniform) ** 2,
        "noisy": uniform + np.float32(0.2) * rng.standard_normal(uniform.shape, np.float32),
    }
    name = graph.graph.input[0].name
    recalibrate_onnx(graph, [{name: uniform[:4]}])  # warm-up: the first session pays more
    out = {}
    for shift, x in data.items():
        batches = [{name: x[i : i + 32]} for i in range(0, 64, 32)]
        for align in (False, True):
            start = time.perf_counter()
            result = recalibrate_onnx(graph, batches, align_input=align)
            key = f"{shift}, align_input={align}"
            out[key] = {
                "seconds": time.perf_counter() - start,
                "input_alignment": result.input_alignment,
                "input_denoising": result.input_denoising,
            }
            print(f"{key}: {out[key]['seconds']:.1f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
