"""Helpers of the service tests: a real uvicorn server in a subprocess, inline models."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789"

# small limits so that the limit tests send little
TEST_ENV = {
    "BNFOLD_MAX_UPLOAD_BYTES": str(4 << 20),
    "BNFOLD_MAX_REQUEST_BYTES": str(1 << 20),
    "BNFOLD_MAX_TENSOR_ELEMENTS": str(1 << 16),
    "BNFOLD_WORKER_TIMEOUT_S": "120",
}


def cuda_usable() -> bool:
    """Whether onnxruntime gives a session the CUDA provider here (a GPU and its libraries)."""
    from service.runtime.sessions import CUDA, SessionFactory

    return SessionFactory().probe() == CUDA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    store: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    ready_after_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_hostport(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log(self) -> Path:
        return self.store.parent / f"server-{self.port}.log"

    def start(self, wait: bool = True, timeout: float = 90) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
        env.update(self.env)
        env.update({"BNFOLD_STORE": str(self.store), "BNFOLD_PORT": str(self.port)})
        env.setdefault("BNFOLD_GRPC_PORT", str(self.grpc_port))
        env["PYTHONPATH"] = str(ROOT)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdout=open(self.log, "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if wait:
            self.wait_ready(timeout)
            self.ready_after_s = time.monotonic() - t0
        return self

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """kill -9 the server and every worker it started (they share its session)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


# -- models built inline ------------------------------------------------------------------------


def conv_bn_model(channels: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BatchNormalization -> Relu -> y, batch dimension dynamic."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    scale = rng.uniform(0.5, 2, channels).astype(np.float32)
    shift = rng.standard_normal(channels).astype(np.float32)
    mean = rng.standard_normal(channels).astype(np.float32)
    var = rng.uniform(0.5, 2, channels).astype(np.float32)
    inits = [
        numpy_helper.from_array(a, n)
        for a, n in [(w, "w"), (b, "b"), (scale, "s"), (shift, "t"), (mean, "m"), (var, "v")]
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["y"], name="relu"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 8, 8])
    graph = helper.make_graph(nodes, "conv_bn", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# v2 datatype -> ONNX element type, for the identity model
ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def all_datatypes_model(datatypes: list[str] | None = None) -> onnx.ModelProto:
    """in_<TYPE>[N, 3] -> Identity -> out_<TYPE>, for every v2 datatype (or those given)."""
    inputs, outputs, nodes = [], [], []
    for dt, elem in ONNX_TYPES.items():
        if datatypes is not None and dt not in datatypes:
            continue
        inputs.append(helper.make_tensor_value_info(f"in_{dt}", elem, ["N", 3]))
        outputs.append(helper.make_tensor_value_info(f"out_{dt}", elem, ["N", 3]))
        nodes.append(helper.make_node("Identity", [f"in_{dt}"], [f"out_{dt}"]))
    graph = helper.make_graph(nodes, "identity_all", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def seed_store(
    root: Path,
    name: str,
    model: onnx.ModelProto | bytes,
    input_shapes: dict[str, list[int]] | None = None,
    note: str = "seeded by the tests",
) -> None:
    """Deploy a graph straight into a store, as a previous run would have left it.

    For graphs that ingest cannot verify (bnfold generates float inputs only), so that the
    protocol tests can cover every datatype; ``input_shapes`` is what an upload would have
    recorded (the example shapes batch buckets warm up with)."""
    from service.store import ModelStore

    store = ModelStore(root)
    store.open()
    data = model if isinstance(model, bytes) else model.SerializeToString()
    version = hashlib.sha256(data).hexdigest()[:16]
    scratch = store.scratch_dir("seed-")
    (scratch / "model.onnx").write_bytes(data)
    record = {
        "name": name,
        "version": version,
        "platform": "onnxruntime_onnx",
        "source": {"format": "onnx", "note": note},
        "input_shapes": input_shapes or {},
        "fold_report": {},
        "verification": {},
        "gpu_divergence": None,
        "deployed_at": "2026-01-01T00:00:00Z",
    }
    store.deploy(name, version, scratch / "model.onnx", record)


def upload(client: httpx.Client, name: str, data: bytes, filename="model.onnx", **fields):
    form = {"name": name, **{k: str(v) for k, v in fields.items()}}
    return client.post("/v1/models", data=form, files={"file": (filename, data)})
