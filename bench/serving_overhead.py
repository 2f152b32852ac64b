"""What the service adds to one request: in-process onnxruntime batch-1 latency and the
service's concurrency-1 binary latency, measured in alternating rounds so that the noise of a
shared machine falls on both alike. Needs the store that ``serving_bench.py`` left behind.

    .venv/bin/python bench/serving_overhead.py --model resnet18 --rounds 4 --seconds 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import run_load, v2_request  # noqa: E402
from serving_bench import start_service  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bnfold-serving")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--shape", default="1,3,224,224")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads, both")
    args = p.parse_args()
    import onnxruntime as ort

    work = Path(args.work)
    shape = [int(d) for d in args.shape.split(",")]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(work / f"{args.model}.folded.onnx"), options)
    name = session.get_inputs()[0].name
    threads = {"BNFOLD_INTRA_OP_THREADS": str(args.threads)}
    service = start_service(work, 18000, batching=True, **threads)
    rounds = []
    try:
        request = v2_request(args.model, name, x, "binary")
        for _ in range(args.rounds):
            times = []
            stop = time.perf_counter() + args.seconds
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                session.run(None, {name: x})
                times.append(time.perf_counter() - t0)
            ort_p50 = statistics.median(times) * 1e3
            served = asyncio.run(
                run_load(service.url, *request, 1, args.seconds, 10**6, "bnfold", "binary")
            )
            rounds.append({"ort_p50_ms": round(ort_p50, 3), "service_p50_ms": served.p50_ms})
            print(json.dumps(rounds[-1]), flush=True)
    finally:
        service.stop()
    added = [r["service_p50_ms"] - r["ort_p50_ms"] for r in rounds]
    print(json.dumps({"model": args.model, "threads": args.threads, "added_p50_ms_by_round": added,
                      "added_p50_ms_median": round(statistics.median(added), 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
