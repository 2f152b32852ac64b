"""What one request costs in the service above the server stack it runs on (issue 15), HTTP
and gRPC, all in one interleaved run.

Five ways to answer the same request, timed in a new random order each round, so that
whatever else the machine does falls on all alike (and no way always follows the same one:
a 40 us MLP run right after a gRPC call measured 2.5x its time right after another run):

- ``in_process``: ``session.run`` of the folded graph in this process, with the session
  options the service uses (the same intra-op threads; spinning as the service has it), and
  ``in_process_aa``, a second session of the same graph timed the same way: the A/A control
  (its ratio to the first, ``aa_ratio``, should be 1);
- ``service_http``: a binary v2 request to the service (one blocking keep-alive connection,
  ``load.BlockingClient``);
- ``service_grpc``: the same tensor as a serialized ``ModelInferRequest`` over one gRPC channel,
  sent and received as bytes (no protobuf work in the client);
- ``bare_http``: the same HTTP request to ``http_floor_app.py`` (uvicorn, uvloop, httptools: the
  service's stack; reads the body, answers 4 kB);
- ``bare_grpc``: the same gRPC message to ``grpc_floor_app.py`` (grpc.aio on uvloop, answers
  4 kB).

Per round: ``added = service - in_process`` and ``excess = added - bare`` for each transport;
the figures are medians over rounds (with quartiles). The target: excess <= 1.0 ms.

``--throughput`` then alternates, in rounds, in-process onnxruntime at its best batch, the
service under 32 concurrent HTTP clients (``load.run_load``) and 32 concurrent gRPC calls.

    .venv/bin/python bench/request_overhead.py --rounds 300 --throughput 3 \\
        --out bench/results/request_overhead.json [--env BNFOLD_X=V]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_bench  # noqa: E402
from load import BlockingClient, run_load, v2_request  # noqa: E402
from serving_bench import TOKEN, Proc, deploy, export_models, start_service  # noqa: E402

HERE = Path(__file__).resolve().parent
METHOD = "/inference.GRPCInferenceService/ModelInfer"
HTTP_PORT, GRPC_PORT, BARE_HTTP, BARE_GRPC = 18000, 18001, 18300, 18301
WAYS = ("in_process", "in_process_aa", "service_http", "service_grpc", "bare_http", "bare_grpc")


def grpc_request(model: str, input_name: str, x: np.ndarray) -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    return request.SerializeToString()


def session_options(threads: int, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def latency(model: str, folded: Path, shape: list[int], args) -> dict:
    session = serving_bench.onnxruntime_session(
        folded, session_options(args.threads, args.spinning)
    )
    # the A/A control: a second session of the same graph, timed like the first
    control = serving_bench.onnxruntime_session(
        folded, session_options(args.threads, args.spinning)
    )
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    http = BlockingClient(f"http://127.0.0.1:{HTTP_PORT}", *v2_request(model, name, x, "binary"))
    bare_http = BlockingClient(
        f"http://127.0.0.1:{BARE_HTTP}", *v2_request(model, name, x, "binary")
    )
    message = grpc_request(model, name, x)
    channels = [grpc.insecure_channel(f"127.0.0.1:{p}", OPTIONS) for p in (GRPC_PORT, BARE_GRPC)]
    service_grpc, bare_grpc = (c.unary_unary(METHOD) for c in channels)  # bytes in, bytes out

    def http_call(client: BlockingClient) -> None:
        status, _ = client.send()
        if status != 200:
            raise SystemExit(f"HTTP {status}")

    calls = {
        "in_process": lambda: session.run(None, {name: x}),
        "in_process_aa": lambda: control.run(None, {name: x}),
        "service_http": lambda: http_call(http),
        "service_grpc": lambda: service_grpc(message, timeout=60),
        "bare_http": lambda: http_call(bare_http),
        "bare_grpc": lambda: bare_grpc(message, timeout=60),
    }
    for _ in range(args.warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(WAYS)
        rng.shuffle(order)  # a fixed order would give each way the same neighbour every round
        for way in order:
            t0 = time.perf_counter()
            calls[way]()
            times[way].append(time.perf_counter() - t0)
    http.close()
    bare_http.close()
    for c in channels:
        c.close()

    def minus(a: list[float], b: list[float]) -> list[float]:
        return [x - y for x, y in zip(a, b, strict=True)]

    per_round = {
        "added_http": minus(times["service_http"], times["in_process"]),
        "added_grpc": minus(times["service_grpc"], times["in_process"]),
    }
    per_round["excess_http"] = minus(per_round["added_http"], times["bare_http"])
    per_round["excess_grpc"] = minus(per_round["added_grpc"], times["bare_grpc"])
    return {
        "model": model,
        "shape": shape,
        "rounds": args.rounds,
        "p50_ms": {w: _ms(statistics.median(t)) for w, t in times.items()},
        **{k: _ms(statistics.median(v)) for k, v in per_round.items()},
        "quartiles_ms": {k: _quartiles(v) for k, v in per_round.items()},
        "aa_ratio": round(
            statistics.median(times["in_process_aa"]) / statistics.median(times["in_process"]), 3
        ),
    }


async def grpc_load(message: bytes, concurrency: int, duration: float) -> dict:
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{GRPC_PORT}", OPTIONS) as channel:
        call = channel.unary_unary(METHOD)
        start = time.perf_counter()
        stop = start + duration

        async def client() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await call(message, timeout=60)
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(client() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"requests": len(latencies), "rps": round(len(latencies) / seconds, 2)}


def throughput(model: str, folded: Path, shape: list[int], args) -> dict:
    """Rounds of: in-process at its best batch, the service at 32 HTTP clients, at 32 gRPC."""
    session = serving_bench.onnxruntime_session(
        folded, session_options(args.threads, args.spinning)
    )
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    rounds = []
    for _ in range(args.throughput):
        best = 0.0
        for batch in (1, 8, 32, 64):
            xb = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
            session.run(None, {name: xb})
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.duration / 4:
                session.run(None, {name: xb})
                n += batch
            best = max(best, n / (time.perf_counter() - t0))
        path, headers, body = v2_request(model, name, x, "binary")
        http = asyncio.run(
            run_load(f"http://127.0.0.1:{HTTP_PORT}", path, headers, body, 32, args.duration, 10**9)
        )
        grpc_result = asyncio.run(grpc_load(grpc_request(model, name, x), 32, args.duration))
        rounds.append(
            {
                "in_process_best_rows_per_s": round(best, 2),
                "http_c32_rps": http.throughput_rps,
                "http_failures": http.failures,
                "grpc_c32_rps": grpc_result["rps"],
            }
        )
    ratio = {
        k: round(statistics.median(r[k] / r["in_process_best_rows_per_s"] for r in rounds), 3)
        for k in ("http_c32_rps", "grpc_c32_rps")
    }
    return {"model": model, "rounds": rounds, "median_ratio_to_in_process_best": ratio}


OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [_ms(q[0]), _ms(q[2])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bnfold-overhead")
    p.add_argument("--models", default="resnet18,mlp")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads, both")
    p.add_argument(
        "--spinning", action="store_true", help="in-process session spins (ORT's default)"
    )
    p.add_argument("--throughput", type=int, default=0, help="rounds of the throughput phase")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per throughput cell")
    p.add_argument("--env", action="append", default=[], help="extra BNFOLD_X=V for the server")
    p.add_argument("--out", help="append the JSON result to this file")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    exported = export_models(work)
    extra = dict(e.split("=", 1) for e in args.env)
    service = start_service(
        work,
        HTTP_PORT,
        batching=True,
        BNFOLD_GRPC_PORT=str(GRPC_PORT),
        BNFOLD_INTRA_OP_THREADS=str(args.threads),
        **extra,
    )
    bare = [
        Proc([sys.executable, str(HERE / "http_floor_app.py"), "--port", str(BARE_HTTP)], {},
             work / "bare_http.log", f"http://127.0.0.1:{BARE_HTTP}"),
        Proc([sys.executable, str(HERE / "grpc_floor_app.py"), "--port", str(BARE_GRPC),
              "--uvloop"], {}, work / "bare_grpc.log", ""),
    ]  # fmt: skip
    result: dict = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "in_process_spinning": args.spinning,
        "server_env": extra,
        "latency": [],
    }
    try:
        bare[0].wait("/")
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{BARE_GRPC}")).result(30)
        with httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=600
        ) as api:
            for model in args.models.split(","):
                path, shape = exported[model]
                deploy(api, work, model, path, shape)
        for model in args.models.split(","):
            _, shape = exported[model]
            result["latency"].append(latency(model, work / f"{model}.folded.onnx", shape, args))
            print(json.dumps(result["latency"][-1]), flush=True)
        if args.throughput:
            _, shape = exported["resnet18"]
            folded = work / "resnet18.folded.onnx"
            result["throughput"] = throughput("resnet18", folded, shape, args)
            print(json.dumps(result["throughput"]), flush=True)
    finally:
        service.stop()
        for proc in bare:
            proc.stop()
    if args.out:
        with open(args.out, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
