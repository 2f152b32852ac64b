"""Where a batched request's time goes in the service: the server's own request and compute
histograms and its batch sizes, under binary load at concurrency 8, 32, then 8 again.

    python bench/service_split.py --work /tmp/bnfold-serving --gpu   # holds resnet18.onnx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench as sb  # noqa: E402
from load import run_load, v2_request  # noqa: E402
from serving_overhead import _server_split  # noqa: E402


def batch_rows(url: str, model: str) -> tuple[float, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = dict.fromkeys(("sum", "count"), 0.0)
    pattern = r'^bnfold_batch_rows_(sum|count)\{model="%s"\} (\S+)$'
    for m in re.finditer(pattern % re.escape(model), text, re.M):
        found[m.group(1)] = float(m.group(2))
    return found["sum"], found["count"]


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
            if api.get(f"/v1/models/{args.model}").status_code != 200:
                files = {"file": ("m.onnx", (work / f"{args.model}.onnx").read_bytes())}
                data = {"name": args.model, "input_shape": "[2, 3, 224, 224]"}
                api.post("/v1/models", data=data, files=files).raise_for_status()
            folded = api.get(f"/v1/models/{args.model}/onnx").content
            (work / f"{args.model}.folded.onnx").write_bytes(folded)
            name = api.get(f"/v1/models/{args.model}").json()["inputs"][0]["name"]
        x = np.random.default_rng(0).standard_normal([1, 3, 224, 224]).astype(np.float32)
        request = v2_request(args.model, name, x, "binary")
        for c in (8, 32, 8):
            before, rows0 = (
                _server_split(service.url, args.model),
                batch_rows(service.url, args.model),
            )
            r = asyncio.run(
                run_load(service.url, *request, c, args.seconds, 10**6, "bnfold", "binary")
            )
            after, rows1 = (
                _server_split(service.url, args.model),
                batch_rows(service.url, args.model),
            )
            mean = {
                k: round(
                    (v[0] - before.get(k, (0, 0))[0])
                    / max(1, v[1] - before.get(k, (0, 0))[1])
                    * 1e3,
                    2,
                )
                for k, v in after.items()
            }
            runs = rows1[1] - rows0[1]
            print(json.dumps({
                "concurrency": c, "req_s": r.throughput_rps, "p50_ms": r.p50_ms,
                "server_mean_ms": mean, "runs": runs,
                "mean_batch_rows": round((rows1[0] - rows0[0]) / max(1, runs), 2),
            }), flush=True)  # fmt: skip
    finally:
        service.stop()


if __name__ == "__main__":
    main()
