"""A closed-loop load generator for the bnfold service (and the plain baseline), loopback only.

``concurrency`` clients each send a request, wait for the reply, and send the next, over one
keep-alive HTTP/1.1 connection each, for at most ``duration`` seconds and ``max_requests``
requests. The client is a few lines of asyncio streams rather than an HTTP library, so that on a
small machine the generator spends little of the CPU it shares with the server. Bodies are built
once; every reply's status is checked.

    python bench/load.py --url http://127.0.0.1:8000 --model resnet18 --shape 1,3,224,224 \\
        --concurrency 1,8,32,64 --encoding binary --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
import urllib.request
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class LoadResult:
    target: str
    encoding: str
    concurrency: int
    requests: int
    failures: int
    seconds: float
    p50_ms: float
    p99_ms: float
    throughput_rps: float

    def to_dict(self) -> dict:
        return asdict(self)


def v2_request(
    model: str, input_name: str, x: np.ndarray, encoding: str
) -> tuple[str, dict[str, str], bytes]:
    """A KServe v2 infer request (Triton's binary extension for ``binary``)."""
    spec = {"name": input_name, "shape": list(x.shape), "datatype": "FP32"}
    if encoding == "binary":
        raw = np.ascontiguousarray(x, "<f4").tobytes()
        spec["parameters"] = {"binary_data_size": len(raw)}
        doc = {"inputs": [spec], "parameters": {"binary_data_output": True}}
        head = json.dumps(doc).encode()
        headers = {"Inference-Header-Content-Length": str(len(head))}
        return f"/v2/models/{model}/infer", headers, head + raw
    spec["data"] = x.reshape(-1).tolist()
    body = json.dumps({"inputs": [spec]}).encode()
    return f"/v2/models/{model}/infer", {"Content-Type": "application/json"}, body


def plain_request(x: np.ndarray, encoding: str) -> tuple[str, dict[str, str], bytes]:
    """A request to ``bench/plain_endpoint.py``."""
    if encoding == "binary":
        headers = {"X-Shape": ",".join(map(str, x.shape))}
        return "/infer", headers, np.ascontiguousarray(x, "<f4").tobytes()
    body = json.dumps({"shape": list(x.shape), "data": x.reshape(-1).tolist()}).encode()
    return "/infer", {"Content-Type": "application/json"}, body


class BlockingClient:
    """One keep-alive connection, one request at a time, blocking sockets: the least a client
    can add, for measuring what the server adds (``serving_overhead.py``)."""

    def __init__(self, url: str, path: str, headers: dict[str, str], body: bytes) -> None:
        parts = urlsplit(url)
        if parts.hostname not in LOOPBACK:
            raise SystemExit(f"load.py sends to loopback only, not {parts.hostname!r}")
        self.request = _http_request(parts.hostname, path, headers, body)
        self.sock = socket.create_connection((parts.hostname, parts.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self) -> tuple[int, bytes]:
        """Status and body of one request."""
        self.sock.sendall(self.request)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, body = data.split(b"\r\n\r\n", 1)
        length = _content_length(head)
        while len(body) < length:
            body += self._recv()
        return int(head[9:12]), body

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def _content_length(head: bytes) -> int:
    """The Content-Length of a response head (0 when it has none)."""
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            return int(line[15:])
    return 0


def _http_request(host: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _client(host, port, request: bytes, stop: float, budget: list[int], out, fails) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = _content_length(head)
            await reader.readexactly(length)
            out.append(time.perf_counter() - t0)
            if status != 200:
                fails.append(status)
    finally:
        writer.close()


async def run_load(
    url: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    concurrency: int,
    duration: float,
    max_requests: int,
    target: str = "",
    encoding: str = "",
) -> LoadResult:
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        raise SystemExit(f"load.py sends to loopback only, not {parts.hostname!r}")
    request = _http_request(parts.hostname, path, headers, body)
    latencies: list[float] = []
    failures: list[int] = []
    budget = [max_requests]
    start = time.perf_counter()
    stop = start + duration
    await asyncio.gather(
        *(
            _client(parts.hostname, parts.port, request, stop, budget, latencies, failures)
            for _ in range(concurrency)
        )
    )
    seconds = time.perf_counter() - start
    latencies.sort()
    n = len(latencies)
    return LoadResult(
        target=target,
        encoding=encoding,
        concurrency=concurrency,
        requests=n,
        failures=len(failures),
        seconds=round(seconds, 3),
        p50_ms=round(statistics.median(latencies) * 1e3, 3) if n else float("nan"),
        p99_ms=round(latencies[min(n - 1, int(n * 0.99))] * 1e3, 3) if n else float("nan"),
        throughput_rps=round(n / seconds, 2),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="a deployed model (v2); omit for bench/plain_endpoint.py")
    p.add_argument("--shape", required=True, help="input shape, e.g. 1,3,224,224")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--encoding", choices=["binary", "json"], default="binary")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency")
    p.add_argument("--max-requests", type=int, default=100_000, help="per concurrency")
    args = p.parse_args()
    shape = [int(d) for d in args.shape.split(",")]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    if args.model:
        with urllib.request.urlopen(f"{args.url}/v2/models/{args.model}", timeout=10) as r:
            input_name = json.load(r)["inputs"][0]["name"]
        path, headers, body = v2_request(args.model, input_name, x, args.encoding)
    else:
        path, headers, body = plain_request(x, args.encoding)
    for c in (int(c) for c in args.concurrency.split(",")):
        result = asyncio.run(
            run_load(args.url, path, headers, body, c, args.duration, args.max_requests,
                     args.model or "plain", args.encoding)
        )  # fmt: skip
        print(json.dumps(result.to_dict()), flush=True)


if __name__ == "__main__":
    main()
