"""Where a batched request's time goes in the service: the server's own request and compute
histograms and its batch sizes, under binary load at concurrency 8, 32, then 8 again.

    python bench/service_split.py --work /tmp/bnfold-serving --gpu   # holds resnet18.onnx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench as sb  # noqa: E402
from load import run_load, v2_request  # noqa: E402
from serving_overhead import SERVER_SPLIT, histogram_sums, mean_between  # noqa: E402

# what it reads from /metrics: the server's request/compute split, and rows per run
SERIES = {**SERVER_SPLIT, "batch_rows": "bnfold_batch_rows"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bnfold-serving")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--env", action="append", default=[], help="extra BNFOLD_X=V for the service")
    p.add_argument("--gpu", action="store_true", help="the service must serve on CUDA")
    args = p.parse_args()
    if args.gpu:
        sb.PROVIDERS[:] = sb.CUDA_FIRST
    work = Path(args.work)
    service = sb.start_service(work, 18000, True, **dict(e.split("=", 1) for e in args.env))
    try:
        with httpx.Client(base_url=service.url, timeout=600) as api:
            api.headers["Authorization"] = f"Bearer {sb.TOKEN}"
            shape = [1, 3, 224, 224]
            record = sb.deploy(api, work, args.model, work / f"{args.model}.onnx", shape)
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        request = v2_request(args.model, record["inputs"][0]["name"], x, "binary")
        for c in (8, 32, 8):
            before = histogram_sums(service.url, args.model, SERIES)
            r = asyncio.run(
                run_load(service.url, *request, c, args.seconds, 10**6, "bnfold", "binary")
            )
            after = histogram_sums(service.url, args.model, SERIES)
            mean = mean_between(before, after)
            rows = mean.pop("batch_rows")
            print(json.dumps({
                "concurrency": c, "req_s": r.throughput_rps, "p50_ms": r.p50_ms,
                "server_mean_ms": {k: round(v * 1e3, 2) for k, v in mean.items()},
                "runs": after["batch_rows"][1] - before["batch_rows"][1],
                "mean_batch_rows": round(rows, 2),
            }), flush=True)  # fmt: skip
    finally:
        service.stop()


if __name__ == "__main__":
    main()
