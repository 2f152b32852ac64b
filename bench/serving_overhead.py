"""What the service adds to one request over in-process onnxruntime, measured in pairs.

Each pair is one in-process ``session.run`` of the folded graph and, right after it, one binary
v2 request to the service for the same input (a blocking keep-alive client on loopback, see
``load.BlockingClient``). Both run onnxruntime with the same number of intra-op threads and
never at the same time, so whatever else the shared machine is doing falls on both alike; the
added latency is the median of the per-pair differences. The medians of each side, and the
server's own split (its ``request`` and ``compute`` histograms), come with it.

``--floor`` also times ``http_floor_app.py`` (a bare uvicorn app that only reads the body and
answers 4 kB) with the same client and body: what uvicorn and loopback cost before any work.

Needs the store that ``serving_bench.py`` left behind.

    .venv/bin/python bench/serving_overhead.py --model resnet18 --pairs 400 --threads 1
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench  # noqa: E402
from load import BlockingClient, v2_request  # noqa: E402
from serving_bench import Proc, onnxruntime_session, start_service  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bnfold-serving")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--shape", default="1,3,224,224")
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads, both")
    p.add_argument("--floor", action="store_true", help="also time a bare uvicorn app")
    p.add_argument("--env", action="append", default=[], help="extra BNFOLD_X=V for the server")
    p.add_argument("--gpu", action="store_true", help="both on the CUDA provider")
    args = p.parse_args()
    if args.gpu:
        serving_bench.PROVIDERS[:] = serving_bench.CUDA_FIRST
    import onnxruntime as ort

    work = Path(args.work)
    shape = [int(d) for d in args.shape.split(",")]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime_session(work / f"{args.model}.folded.onnx", options)
    name = session.get_inputs()[0].name
    extra = dict(e.split("=", 1) for e in args.env)
    service = start_service(
        work, 18000, batching=True, BNFOLD_INTRA_OP_THREADS=str(args.threads), **extra
    )
    try:
        client = BlockingClient(service.url, *v2_request(args.model, name, x, "binary"))
        for _ in range(args.warmup):
            session.run(None, {name: x})
            client.send()
        before = histogram_sums(service.url, args.model, SERVER_SPLIT)
        local, served = [], []
        for _ in range(args.pairs):
            t0 = time.perf_counter()
            session.run(None, {name: x})
            t1 = time.perf_counter()
            status, _ = client.send()
            t2 = time.perf_counter()
            if status != 200:
                raise SystemExit(f"the service answered {status}")
            local.append(t1 - t0)
            served.append(t2 - t1)
        after = histogram_sums(service.url, args.model, SERVER_SPLIT)
        client.close()
    finally:
        service.stop()
    floor = _floor(work, v2_request(args.model, name, x, "binary"), args) if args.floor else {}
    added = sorted(s - lo for s, lo in zip(served, local, strict=True))
    n = len(added)
    server = {k: round(v * 1e3, 3) for k, v in mean_between(before, after).items()}
    print(json.dumps({
        "model": args.model, "shape": shape, "threads": args.threads, "pairs": n,
        "providers": serving_bench.PROVIDERS,
        "server_env": extra,
        "in_process_p50_ms": round(statistics.median(local) * 1e3, 3),
        "service_p50_ms": round(statistics.median(served) * 1e3, 3),
        "added_p50_ms": round(added[n // 2] * 1e3, 3),
        "added_p25_p75_ms": [round(added[n // 4] * 1e3, 3), round(added[3 * n // 4] * 1e3, 3)],
        "server_mean_ms": server,
        **floor,
    }))  # fmt: skip


def _floor(work: Path, request, args) -> dict:
    """p50 of the same request against ``http_floor_app.py``."""
    app = Path(__file__).resolve().parent / "http_floor_app.py"
    proc = Proc([sys.executable, str(app)], {}, work / "floor.log", "http://127.0.0.1:18300")
    try:
        proc.wait("/")
        client = BlockingClient(proc.url, *request)
        times = []
        for i in range(args.warmup + args.pairs):
            t0 = time.perf_counter()
            client.send()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        client.close()
    finally:
        proc.stop()
    return {"bare_uvicorn_p50_ms": round(statistics.median(times) * 1e3, 3)}


_SERIES_LINE = r'^%s_(sum|count)\{model="%s"\} (\S+)$'

# the server's own split of a request: short name -> its histogram in /metrics
SERVER_SPLIT = {
    "request": "bnfold_infer_request_seconds",
    "compute": "bnfold_infer_compute_seconds",
}


def histogram_sums(url: str, model: str, series: dict[str, str]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram in ``series`` for ``model``; (0, 0) before its first
    observation, when the server does not list it yet."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = {short: [0.0, 0.0] for short in series}
    for short, metric in series.items():
        for m in re.finditer(_SERIES_LINE % (metric, re.escape(model)), text, re.M):
            found[short][m.group(1) == "count"] = float(m.group(2))
    return {k: (v[0], v[1]) for k, v in found.items()}


def mean_between(before: dict, after: dict) -> dict[str, float]:
    """Each histogram's mean observation between two ``histogram_sums`` readings."""
    return {k: (after[k][0] - before[k][0]) / max(1.0, after[k][1] - before[k][1]) for k in after}


if __name__ == "__main__":
    main()
