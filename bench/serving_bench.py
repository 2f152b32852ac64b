"""Serving benchmark: the bnfold service against in-process onnxruntime and a hand-written
FastAPI endpoint (``bench/plain_endpoint.py``), on a small MLP and a ResNet-18 at 224x224.

For each model: the original graph is uploaded through ``POST /v1/models`` (folded, verified,
deployed), then the folded graph is served three ways and loaded with ``bench/load.py`` at each
concurrency, binary and JSON, with dynamic batching on and off. In-process onnxruntime runs the
same folded graph: batch-1 latency, and throughput at batch 1..64 (its best is the bar for the
service's throughput). A soak at concurrency 32 samples the server's resident memory.

    .venv/bin/python bench/serving_bench.py --duration 5 --soak 600 \\
        --out bench/results/serving.json

``--gpu`` runs all three on the CUDA provider (the service with ``BNFOLD_REQUIRE_GPU=1``, so a
silent fallback to the CPU stops the run) and names the GPU in the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import plain_request, run_load, v2_request  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789"
CONCURRENCY = (1, 8, 32, 64)
CPU_ONLY = ["CPUExecutionProvider"]
CUDA_FIRST = ["CUDAExecutionProvider", "CPUExecutionProvider"]
# what in-process onnxruntime and the plain endpoint run on; ``--gpu`` switches to CUDA_FIRST
PROVIDERS = list(CPU_ONLY)
SERVER_ENV: dict[str, str] = {}  # ``--env BNFOLD_X=V``: extra settings for every service start


def onnxruntime_session(path: Path, options=None):
    """A session on ``PROVIDERS``, refusing one that did not get the first of them."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), options, providers=PROVIDERS)
    if session.get_providers()[0] != PROVIDERS[0]:
        raise SystemExit(f"{path.name}: onnxruntime gave {session.get_providers()[0]}")
    return session


def gpu_name() -> str:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def export_models(work: Path) -> dict[str, tuple[Path, list[int]]]:
    """Original (unfolded) ONNX graphs: the zoo's MLP, and torchvision's ResNet-18."""
    import torch
    import torchvision

    import bnfold
    import models

    out = {}
    mlp = work / "mlp.onnx"
    if not mlp.exists():
        (x,) = models.example_inputs("mlp_bn_after_act", batch=2)
        graph = bnfold.export_onnx(
            models.build("mlp_bn_after_act").eval(), (x,), dynamic_batch=True
        )
        mlp.write_bytes(graph.SerializeToString())
    out["mlp"] = (mlp, [1, *models.input_shapes("mlp_bn_after_act")[0][1:]])
    resnet = work / "resnet18.onnx"
    if not resnet.exists():
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=1000).eval()
        with torch.no_grad():
            graph = bnfold.export_onnx(net, (torch.randn(2, 3, 224, 224),), dynamic_batch=True)
        resnet.write_bytes(graph.SerializeToString())
    out["resnet18"] = (resnet, [1, 3, 224, 224])
    return out


class Proc:
    def __init__(self, command: list[str], env: dict[str, str], log: Path, url: str) -> None:
        self.url = url
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
        full_env.update(env, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            command, env=full_env, cwd=ROOT, stdout=open(log, "ab"), stderr=subprocess.STDOUT
        )

    def wait(self, path: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "server exited"
            try:
                if httpx.get(self.url + path, timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.url)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def start_service(work: Path, port: int, batching: bool, **extra: str) -> Proc:
    env = {
        **SERVER_ENV,
        "BNFOLD_GRPC_PORT": "0",
        **extra,
        "BNFOLD_STORE": str(work / "store"),
        "BNFOLD_PORT": str(port),
        "BNFOLD_API_TOKEN": TOKEN,
        "BNFOLD_DEPLOY_DEFAULTS": "0",
        "BNFOLD_DYNAMIC_BATCHING": "1" if batching else "0",
        "BNFOLD_REQUIRE_GPU": "1" if PROVIDERS == CUDA_FIRST else "0",
    }
    command = [sys.executable, "-m", "service", "--log-level", "warning"]
    proc = Proc(command, env, work / "service.log", f"http://127.0.0.1:{port}")
    proc.wait("/v2/health/ready")
    return proc


def deploy(api: httpx.Client, work: Path, name: str, path: Path, shape: list[int]) -> dict:
    """Upload ``path`` as ``name`` unless it is deployed; save its folded graph as
    ``work/NAME.folded.onnx``; return its record."""
    if api.get(f"/v1/models/{name}").status_code != 200:
        r = api.post(
            "/v1/models",
            data={"name": name, "input_shape": json.dumps([2, *shape[1:]])},
            files={"file": (path.name, path.read_bytes())},
        )
        r.raise_for_status()
    (work / f"{name}.folded.onnx").write_bytes(api.get(f"/v1/models/{name}/onnx").content)
    return api.get(f"/v1/models/{name}").json()


def start_plain(work: Path, name: str) -> Proc:
    """``bench/plain_endpoint.py`` serving the folded graph of ``name``."""
    command = [sys.executable, "bench/plain_endpoint.py", str(work / f"{name}.folded.onnx")]
    command += ["--providers", ",".join(PROVIDERS)]
    plain = Proc([*command, "--port", "18100"], {}, work / "plain.log", "http://127.0.0.1:18100")
    plain.wait("/health")
    return plain


def in_process(model: Path, shape: list[int], duration: float) -> dict:
    session = onnxruntime_session(model)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    result: dict = {"throughput_rows_per_s": {}}
    for batch in CONCURRENCY:
        x = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
        session.run(None, {name: x})
        times = []
        stop = time.perf_counter() + duration
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            session.run(None, {name: x})
            times.append(time.perf_counter() - t0)
        rows = batch * len(times) / sum(times)
        result["throughput_rows_per_s"][batch] = round(rows, 1)
        if batch == 1:
            times.sort()
            result["p50_ms"] = round(statistics.median(times) * 1e3, 3)
            result["p99_ms"] = round(times[int(len(times) * 0.99)] * 1e3, 3)
    result["best_batch_rows_per_s"] = max(result["throughput_rows_per_s"].values())
    return result


class HealthProbe:
    """Asks ``url`` every 0.1 s from a thread while in a ``with`` block; keeps the latencies."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._probe)

    def _probe(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._done.wait(0.1):
                t0 = time.perf_counter()
                client.get(self.url).raise_for_status()
                self.latencies.append(time.perf_counter() - t0)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def interleaved_targets(
    work: Path, name: str, entry: dict, shape: list[int], rounds: int, seconds: float
) -> dict:
    """Issue 5's throughput bars measured close together: in alternating rounds, in-process
    onnxruntime at its best batch, the service at concurrency 32 with batching (binary), and
    the plain endpoint at concurrency 32 (binary). Medians over the rounds. During each load a
    thread asks the server's health route every 0.1 s: what an orchestrator's probe sees."""
    session = onnxruntime_session(work / f"{name}.folded.onnx")
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    best = max(entry["in_process"]["throughput_rows_per_s"].items(), key=lambda kv: kv[1])[0]
    xb = rng.standard_normal([int(best), *shape[1:]]).astype(np.float32)
    x = xb[:1].copy()
    service = start_service(work, 18000, batching=True)
    plain = start_plain(work, name)
    rows: dict[str, list[float]] = {"in_process": [], "bnfold": [], "plain": []}
    health: dict[str, list[float]] = {"bnfold": [], "plain": []}
    health_paths = {"bnfold": "/v2/health/ready", "plain": "/health"}
    try:
        v2req = v2_request(name, entry["input_name"], x, "binary")
        plainreq = plain_request(x, "binary")
        for _ in range(rounds):
            stop, n, t0 = time.perf_counter() + seconds, 0, time.perf_counter()
            while time.perf_counter() < stop:
                session.run(None, {input_name: xb})
                n += len(xb)
            rows["in_process"].append(n / (time.perf_counter() - t0))
            for key, url, req in (("bnfold", service.url, v2req), ("plain", plain.url, plainreq)):
                with HealthProbe(url + health_paths[key]) as probe:
                    r = asyncio.run(run_load(url, *req, 32, seconds, 10**7, key, "binary"))
                health[key] += probe.latencies
                assert r.failures == 0, r
                rows[key].append(r.throughput_rps)
    finally:
        service.stop()
        plain.stop()
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "best_batch": int(best),
        "rounds": rounds,
        "seconds_per_round": seconds,
        "per_round": {k: [round(v, 1) for v in vs] for k, vs in rows.items()},
        "median_rows_per_s": {k: round(v, 1) for k, v in med.items()},
        "bnfold_vs_in_process": round(med["bnfold"] / med["in_process"], 3),
        "bnfold_vs_plain": round(med["bnfold"] / med["plain"], 3),
        "health_under_load_ms": {
            k: {"probes": len(v), "p50": round(statistics.median(v) * 1e3, 1),
                "max": round(max(v) * 1e3, 1)}
            for k, v in health.items() if v
        },
    }  # fmt: skip
    print(json.dumps(result), flush=True)
    return result


def sweep(url, path, headers, body, target, encoding, duration, max_requests) -> list[dict]:
    rows = []
    for c in CONCURRENCY:
        r = asyncio.run(
            run_load(url, path, headers, body, c, duration, max_requests, target, encoding)
        )
        print(json.dumps(r.to_dict()), flush=True)
        rows.append(r.to_dict())
    return rows


def soak(work: Path, report: dict, seconds: float) -> dict:
    """ResNet-18 at concurrency 32 with batching for ``seconds``; resident memory every 5 s."""
    name = "resnet18"
    x = np.random.default_rng(0).standard_normal([1, 3, 224, 224]).astype(np.float32)
    service = start_service(work, 18000, batching=True)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not done.wait(5):
            samples.append((round(time.monotonic() - t0, 1), round(service.rss_mib(), 1)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    req = v2_request(name, report["models"][name]["input_name"], x, "binary")
    print(f"== soak {name} concurrency 32 for {seconds:g} s", flush=True)
    load = asyncio.run(
        run_load(service.url, *req, 32, seconds, 10**9, "bnfold batching on", "binary")
    )
    done.set()
    sampler.join()
    service.stop()
    after_minute = [m for t, m in samples if t >= 60]
    growth = round(after_minute[-1] - after_minute[0], 1) if after_minute else None
    result = {
        "model": name,
        **load.to_dict(),
        "rss_mib": samples,
        "rss_growth_after_first_minute_mib": growth,
    }
    print(json.dumps(result), flush=True)
    return result


def render(report: dict) -> str:
    """The markdown tables of docs/BENCHMARKS.md from a results file."""
    lines = []
    for name, entry in report["models"].items():
        ort = entry["in_process"]
        lines += [
            f"**{name}** (input {'x'.join(map(str, entry['input_shape']))}; fold: "
            f"{entry['fold'].get('total', 0)} BN, {entry['fold'].get('kept', 0)} kept). "
            f"In-process onnxruntime: batch 1 p50 {ort['p50_ms']:.3f} ms, p99 "
            f"{ort['p99_ms']:.3f} ms; rows/s by batch "
            + ", ".join(f"{b}: {v:,.0f}" for b, v in ort["throughput_rows_per_s"].items())
            + f" (best {ort['best_batch_rows_per_s']:,.0f}).",
            "",
            "| server | tensors | conc. | requests | failed | p50 ms | p99 ms | req/s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in entry["cells"]:
            lines.append(
                f"| {c['target']} | {c['encoding']} | {c['concurrency']} | {c['requests']} | "
                f"{c['failures']} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
                f"{c['throughput_rps']:,.1f} |"
            )
        lines.append("")
        t = entry.get("targets")
        if t:
            med = t["median_rows_per_s"]
            lines += [
                f"Interleaved ({t['rounds']} rounds of {t['seconds_per_round']:g} s, medians): "
                f"in-process batch {t['best_batch']} {med['in_process']:,.1f} rows/s; bnfold "
                f"concurrency 32 binary with batching {med['bnfold']:,.1f} req/s "
                f"(**{t['bnfold_vs_in_process']:.0%}** of in-process); plain endpoint "
                f"{med['plain']:,.1f} req/s (bnfold **{t['bnfold_vs_plain']:.2f}x**).",
                "",
            ]
            health = t.get("health_under_load_ms", {})
            if health:
                lines += [
                    "Health route polled every 0.1 s during those loads: "
                    + "; ".join(
                        f"{key} p50 {h['p50']:,.1f} ms, max {h['max']:,.1f} ms "
                        f"({h['probes']} probes)"
                        for key, h in health.items()
                    )
                    + ".",
                    "",
                ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", help="print the markdown tables of a results file and exit")
    p.add_argument("--work", default="/tmp/bnfold-serving")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    p.add_argument("--max-requests", type=int, default=50_000)
    p.add_argument("--soak", type=float, default=600.0, help="seconds; 0 to skip")
    p.add_argument("--target-rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench/results/serving.json"))
    p.add_argument("--gpu", action="store_true", help="everything on the CUDA provider")
    p.add_argument("--env", action="append", default=[], help="extra BNFOLD_X=V for the service")
    p.add_argument("--redo-soak", action="store_true", help="re-run only the soak of --out")
    p.add_argument(
        "--redo-targets",
        action="store_true",
        help="re-measure only the interleaved targets of --out",
    )
    args = p.parse_args()
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    work = Path(args.work)
    if args.gpu:
        PROVIDERS[:] = CUDA_FIRST
    SERVER_ENV.update(e.split("=", 1) for e in args.env)
    if args.redo_soak:
        report = json.loads(Path(args.out).read_text())
        report["soak"] = soak(work, report, args.soak)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
        return
    if args.redo_targets:
        report = json.loads(Path(args.out).read_text())
        report["server_env"] = SERVER_ENV
        for name, entry in report["models"].items():
            print(f"== {name} interleaved targets", flush=True)
            entry["targets"] = interleaved_targets(
                work, name, entry, entry["input_shape"], args.target_rounds, 2 * args.duration
            )
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
        return
    work.mkdir(parents=True, exist_ok=True)
    originals = export_models(work)
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "providers": PROVIDERS,
        "server_env": SERVER_ENV,
        "gpu": gpu_name() if args.gpu else None,
        "load_average_at_start": os.getloadavg(),
        "duration_per_cell_s": args.duration,
        "models": {},
    }

    service = start_service(work, 18000, batching=True)
    with httpx.Client(base_url=service.url, timeout=600) as api:
        api.headers["Authorization"] = f"Bearer {TOKEN}"
        for name, (path, shape) in originals.items():
            record = deploy(api, work, name, path, shape)
            report["models"][name] = {
                "input_shape": shape,
                "fold": record["fold_report"]["counts"],
                "savings": record.get("savings"),
                "input_name": record["inputs"][0]["name"],
            }
    service.stop()

    for name, (_, shape) in originals.items():
        entry = report["models"][name]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        print(f"== {name} in-process onnxruntime", flush=True)
        entry["in_process"] = in_process(work / f"{name}.folded.onnx", shape, args.duration)
        print(json.dumps(entry["in_process"]), flush=True)
        cells = entry["cells"] = []
        for batching in (True, False):
            service = start_service(work, 18000, batching)
            for encoding in ("binary", "json") if batching else ("binary",):
                label = f"bnfold batching {'on' if batching else 'off'}"
                print(f"== {name} {label} {encoding}", flush=True)
                req = v2_request(name, entry["input_name"], x, encoding)
                cells += sweep(service.url, *req, label, encoding, args.duration, args.max_requests)
            service.stop()
        plain = start_plain(work, name)
        for encoding in ("binary", "json"):
            print(f"== {name} plain endpoint {encoding}", flush=True)
            req = plain_request(x, encoding)
            cells += sweep(
                plain.url, *req, "plain FastAPI", encoding, args.duration, args.max_requests
            )
        plain.stop()
        print(f"== {name} interleaved targets", flush=True)
        entry["targets"] = interleaved_targets(
            work, name, entry, shape, args.target_rounds, 2 * args.duration
        )

    if args.soak > 0:
        report["soak"] = soak(work, report, args.soak)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
