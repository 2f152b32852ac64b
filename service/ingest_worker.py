"""The ingest worker: ``python -m service.ingest_worker LIMITS_JSON JOB_DIR``.

Runs in its own process so that a model that crashes onnxruntime or torch takes down only this
process. It sets its resource limits first, before any user byte is read (done here rather than
in a ``preexec_fn``, which is unsafe in the threaded server). It reads ``job.json`` and
``upload`` from the job directory, and writes ``result.json`` (a status and the reports) and, on
success, ``folded.onnx`` and ``original.onnx``.

Uploaded bytes are never unpickled: ONNX is parsed as protobuf, weights with
``safetensors.torch.load`` (a JSON header and raw buffers), and ``torch.load`` is disabled in
this process as a second line of defence.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from pathlib import Path
from typing import Any


class Refused(Exception):
    """The upload cannot be deployed; ``status`` is the HTTP status the client gets."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def set_limits(limits: dict[str, int]) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.get("memory_bytes"):
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    if limits.get("cpu_s"):
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 5))
    if limits.get("file_bytes"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"],) * 2)


def _no_unpickling(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("unpickling is disabled in the ingest worker")


def _disable_unpickling() -> None:
    import torch

    torch.load = _no_unpickling


# -- parsing ------------------------------------------------------------------------------------


def external_data_refs(model: Any) -> list[str]:
    """Names of every tensor in the model (graphs, subgraphs, functions) stored outside it.

    Wider than onnx's own tensor walk (and so ``bnfold.onnx.external_data``): sparse
    initializers and sparse attribute tensors are checked too."""
    from onnx import AttributeProto, TensorProto

    found: list[str] = []

    def tensor(t: Any) -> None:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            found.append(t.name or "<unnamed>")

    def graph(g: Any) -> None:
        for t in g.initializer:
            tensor(t)
        for st in g.sparse_initializer:
            tensor(st.values)
            tensor(st.indices)
        for node in g.node:
            nodes_attrs(node.attribute)

    def nodes_attrs(attrs: Any) -> None:
        for a in attrs:
            if a.type == AttributeProto.TENSOR:
                tensor(a.t)
            elif a.type == AttributeProto.TENSORS:
                for t in a.tensors:
                    tensor(t)
            elif a.type == AttributeProto.SPARSE_TENSOR:
                tensor(a.sparse_tensor.values)
            elif a.type == AttributeProto.GRAPH:
                graph(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for g in a.graphs:
                    graph(g)

    graph(model.graph)
    for fn in model.functions:
        for node in fn.node:
            nodes_attrs(node.attribute)
    return found


def parse_onnx(data: bytes) -> Any:
    require("onnx")
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Refused(
            400, f"the file is not a valid ONNX model (protobuf parse failed: {exc})"
        ) from None
    # before anything else looks at the graph: external data names a path on *our* disk
    external = external_data_refs(model)
    if external:
        raise Refused(
            400,
            f"ONNX models with external data are refused (tensors {external[:5]}); "
            "save the model with all tensors inside the file",
        )
    if not model.graph.node:
        raise Refused(400, "the file is not a usable ONNX model: its graph has no nodes")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises ValidationError and C++ errors
        raise Refused(400, f"the ONNX model does not pass onnx.checker: {exc}") from None
    return model


def model_from_safetensors(data: bytes, architecture: str, input_shape: Any) -> tuple[Any, Any]:
    """Build the zoo architecture with uploaded weights; return the unfolded ONNX + inputs."""
    from safetensors import SafetensorError, deserialize

    try:
        deserialize(data)  # validates header and buffers (JSON + raw bytes: no code runs)
    except (SafetensorError, ValueError, OSError) as exc:
        raise Refused(400, f"the file is not a valid safetensors state dict: {exc}") from None
    require("torch", "models", *_FOLDING)
    import models

    if architecture not in models.names():
        raise Refused(
            400, f"unknown architecture {architecture!r}; known: {sorted(models.names())}"
        )
    _disable_unpickling()
    from safetensors.torch import load

    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise Refused(400, f"the file is not a valid safetensors state dict: {exc}") from None
    module = models.get_spec(architecture).make()  # the architecture only: no training
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise Refused(
            400, f"the weights do not fit architecture {architecture!r}: {_first_lines(exc)}"
        ) from None
    return export_zoo_module(module, architecture, input_shape)


def export_zoo_module(module: Any, architecture: str, input_shape: Any) -> tuple[Any, Any]:
    import torch

    import bnfold
    import models

    module.eval()
    if input_shape is None:
        example = tuple(models.example_inputs(architecture, batch=2))
    else:
        # one shape, or shapes by input name (the zoo's models take their inputs in order)
        shapes = list(input_shape.values()) if isinstance(input_shape, dict) else [input_shape]
        expected = len(models.input_shapes(architecture))
        if len(shapes) != expected:
            raise Refused(
                400, f"{architecture!r} takes {expected} input(s), input_shape gives {len(shapes)}"
            )
        example = tuple(torch.randn(*s) for s in shapes)
    try:
        with torch.no_grad():
            original = bnfold.export_onnx(module, example, dynamic_batch=True)
    except Exception as exc:
        raise Refused(
            422, f"exporting {architecture!r} to ONNX failed: {_first_lines(exc)}"
        ) from None
    return original, example


def _first_lines(exc: BaseException, n: int = 3) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return " / ".join(lines[:n]) + (" ..." if len(lines) > n else "")


def _input_shapes(original: Any, input_shape: Any) -> dict[str, list[int]] | None:
    """The caller's ``input_shape``: one list for a one-input model, or a dict by name."""
    if input_shape is None:
        return None
    names = [i.name for i in original.graph.input]
    inits = {t.name for t in original.graph.initializer}
    names = [n for n in names if n not in inits]
    if isinstance(input_shape, dict):
        unknown = sorted(set(input_shape) - set(names))
        if unknown:
            raise Refused(400, f"input_shape names unknown inputs {unknown}; inputs are {names}")
        return input_shape
    if len(names) != 1:
        raise Refused(
            400, f"the model has inputs {names}: give input_shape as an object by input name"
        )
    return {names[0]: input_shape}


# -- one job ------------------------------------------------------------------------------------


def process(job_dir: Path) -> dict[str, Any]:
    job = json.loads((job_dir / "job.json").read_text())
    kind, arch = job["kind"], job.get("architecture")
    input_shape = job.get("input_shape")
    rtol, atol = job.get("rtol", 1e-4), job.get("atol", 1e-5)

    if kind == "onnx":
        original = parse_onnx((job_dir / "upload").read_bytes())
        require(*_FOLDING)
        example = None
        source = {"format": "onnx"}
    elif kind == "safetensors":
        original, example = model_from_safetensors(
            (job_dir / "upload").read_bytes(), arch, input_shape
        )
        source = {"format": "safetensors", "architecture": arch}
    elif kind == "zoo":
        require("torch", "models", *_FOLDING)
        import models
        from service.default_graphs import shipped_graph

        _disable_unpickling()
        shipped = shipped_graph(arch) if input_shape is None else None
        if shipped is not None:
            # the same export, made ahead (service/default_graphs.py): seconds saved at start
            import onnx

            original, example = onnx.load(shipped), None
            input_shape = {
                value.name: [2, *shape[1:]]
                for value, shape in zip(
                    original.graph.input, models.input_shapes(arch), strict=False
                )
            }
        else:
            original, example = export_zoo_module(models.build(arch), arch, input_shape)
        source = {"format": "zoo", "architecture": arch, "shipped_graph": shipped is not None}
    else:
        raise Refused(400, f"unknown job kind {kind!r}")

    import bnfold

    shapes = _input_shapes(original, input_shape) if kind in ("onnx", "zoo") else None
    if example is not None:
        names = [i.name for i in original.graph.input]
        shapes = {n: list(t.shape) for n, t in zip(names, example, strict=False)}
    try:
        folded = bnfold.fold_onnx(original)
    except Exception as exc:
        raise Refused(422, f"folding failed: {_first_lines(exc)}") from None
    fold_report = folded.report.to_dict()
    try:
        verification = bnfold.verify_onnx(
            original, folded.model, None, rtol=rtol, atol=atol, input_shapes=shapes
        )
    except Exception as exc:
        raise Refused(
            422, f"verification could not run: {_first_lines(exc)}", fold_report=fold_report
        ) from None
    if not verification.ok and verification.error:
        raise Refused(
            422,
            f"verification could not run the graphs: {_first_lines(verification.error, 1)}; "
            "nothing was deployed",
            fold_report=fold_report,
            verification=verification.to_dict(),
        )
    if not verification.ok:
        raise Refused(
            422,
            "verification failed: the folded graph differs from the original beyond "
            f"rtol={rtol:g}, atol={atol:g} (max_abs_err={verification.max_abs_err:.3g}); "
            "nothing was deployed",
            fold_report=fold_report,
            verification=verification.to_dict(),
        )
    folded_bytes = folded.model.SerializeToString()
    # the final load test: a session on the exact bytes that will be served
    import onnxruntime as ort

    try:
        ort.InferenceSession(folded_bytes, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise Refused(
            422, f"onnxruntime cannot load the folded graph: {_first_lines(exc)}"
        ) from None
    try:
        savings = measure_savings(original, folded.model, shapes or {})
    except Exception as exc:  # a measurement, not a reason to refuse the model
        savings = {"error": _first_lines(exc, 1)}
    (job_dir / "folded.onnx").write_bytes(folded_bytes)
    if kind == "onnx":
        os.link(job_dir / "upload", job_dir / "original.onnx")
    else:
        (job_dir / "original.onnx").write_bytes(original.SerializeToString())
    return {
        "status": 200,
        "source": source,
        "input_shapes": shapes or {},
        "fold_report": fold_report,
        "verification": verification.to_dict(),
        "savings": savings,
    }


def measure_savings(original: Any, folded: Any, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """What folding saved: nodes, BatchNorm nodes, and the median latency of each graph.

    Timed on one CPU thread (the worker's OMP_NUM_THREADS=1) at the verification's input
    shapes (a variable dimension as 1), for at most ~0.2 s per graph so deploys stay quick."""
    import time

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    out: dict[str, Any] = {}
    feeds = None
    for graph, model in (("original", original), ("folded", folded)):
        out[f"{graph}_nodes"] = len(model.graph.node)
        out[f"{graph}_batchnorm"] = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        if feeds is None:
            feeds = _timing_feeds(session, shapes, np)
        session.run(None, feeds)  # warm-up: first runs allocate
        times: list[float] = []
        deadline = time.perf_counter() + 0.2
        while len(times) < 3 or (len(times) < 50 and time.perf_counter() < deadline):
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        out[f"{graph}_latency_s"] = float(np.median(times))
    out["input_shapes"] = {k: list(v.shape) for k, v in feeds.items()}
    out["threads"] = 1
    return out


_FLOAT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
}


def _timing_feeds(session: Any, shapes: dict[str, list[int]], np: Any) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        shape = shapes.get(arg.name) or [
            d if isinstance(d, int) and d > 0 else 1 for d in arg.shape
        ]
        if arg.type in ("tensor(float)", "tensor(double)", "tensor(float16)"):
            dtype = {"tensor(float)": np.float32, "tensor(double)": np.float64}.get(
                arg.type, np.float16
            )
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise ValueError(f"input {arg.name!r} of type {arg.type}: no timing input")
    return feeds


def run_job(job_dir: Path) -> None:
    try:
        result = process(job_dir)
    except Refused as exc:
        result = {"status": exc.status, "error": str(exc), **exc.extra}
    except MemoryError:
        result = {"status": 413, "error": "processing the model ran out of the worker's memory"}
    except Exception as exc:
        traceback.print_exc()  # to the worker's log, which the server keeps to itself
        result = {"status": 422, "error": f"the model could not be processed: {_first_lines(exc)}"}
    write_result(job_dir, result)


def write_result(job_dir: Path, result: dict[str, Any]) -> None:
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job_dir / "result.json")


def require(*modules: str) -> None:
    """Import libraries the job needs. Called in stages, so that a file that is not a model at
    all is refused before torch is loaded, and a limit too tight for the libraries themselves
    reads as a configuration problem rather than as a fault of the model."""
    import importlib

    limit = _LIMITS.get("memory_bytes")
    for name in modules:
        try:
            importlib.import_module(name)
        except (ImportError, OSError, MemoryError) as exc:
            raise Refused(
                503,
                f"the ingest worker could not load {name} within its resource limits (memory "
                f"{limit} bytes, BNFOLD_WORKER_MEMORY_BYTES): {_first_lines(exc, 1)}",
            ) from None


_LIMITS: dict[str, int] = {}
_FOLDING = ("onnxruntime", "bnfold.onnx.fold", "bnfold.onnx.verify")


def main(argv: list[str]) -> int:
    _LIMITS.update(json.loads(argv[0]))
    set_limits(_LIMITS)
    _die_with_parent()
    run_job(Path(argv[1]))
    return 0


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the server dies, so a killed server leaves no orphan worker."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
