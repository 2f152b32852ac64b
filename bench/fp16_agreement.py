"""How far fp16 top-1 agreement with fp32 can be read, by number of inputs: the ImageNet-trained
EfficientNet-Lite0 (`imagenet_trained`) on natural crops, fp16 as `bnfold.optimizer.fp16`
makes it (onnxruntime, CPU provider) and as torch's own `.half()` makes it, each against the
folded fp32 graph, on the first 256, 512, ... crops; with the fp32 top-2 gaps of the flips.

    .venv/bin/python bench/fp16_agreement.py [--crops 1024] [--graph .whl/c1/lite0.folded.onnx]

The graph is the folded Lite0 that `bench/device_wheels.sh` exports (made here when missing).
No timing: accuracy only, so it may run beside other work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import imagenet_trained  # noqa: E402

from bnfold.optimizer.accuracy import compare, flipped_gaps, logit_stats  # noqa: E402
from bnfold.optimizer.fp16 import to_fp16  # noqa: E402

BATCH = 32


def _folded(path: Path) -> onnx.ModelProto:
    if path.is_file():
        return onnx.load(str(path))
    import bnfold
    from bnfold.onnx.export import export_onnx

    x = torch.from_numpy(imagenet_trained.natural_crops(2, torch.Generator().manual_seed(0)))
    return bnfold.fold_onnx(export_onnx(imagenet_trained.build(), (x,))).model


def _ort(model: onnx.ModelProto, crops: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: crops[i : i + BATCH]})[0] for i in range(0, len(crops), BATCH)]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=1024)
    p.add_argument("--graph", type=Path, default=Path(".whl/c1/lite0.folded.onnx"))
    args = p.parse_args()
    crops = imagenet_trained.natural_crops(args.crops, torch.Generator().manual_seed(0))
    fp32 = _folded(args.graph)
    want = _ort(fp32, crops)
    net = imagenet_trained.build().half()
    with torch.no_grad():
        half = [
            net(torch.from_numpy(crops[i : i + BATCH]).half()) for i in range(0, len(crops), BATCH)
        ]
    got = {"bnfold fp16 (ort CPU)": _ort(to_fp16(fp32).model, crops)}
    got["torch .half()"] = torch.cat(half).float().numpy()
    top = np.sort(want, axis=1)
    gaps = top[:, -1] - top[:, -2]
    n = 256
    while n <= args.crops:
        row: dict = {"crops": n, "reference": logit_stats(want[:n])}
        for label, out in got.items():
            acc = compare([want[:n]], [out[:n]])
            row[label] = {
                "top1_agreement": acc["top1_agreement"],
                "rel_l2": acc["rel_l2"],
                "flipped_gaps": [round(g, 4) for g in flipped_gaps(want[:n], out[:n])],
            }
        row["share_gap_below_0.02"] = float(np.mean(gaps[:n] < 0.02))
        print(json.dumps(row), flush=True)
        n *= 2


if __name__ == "__main__":
    main()
