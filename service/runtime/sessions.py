"""onnxruntime sessions and the choice of execution provider.

CUDA is tried only when onnxruntime lists it *and* a session really gets it: onnxruntime falls
back to the CPU silently (it only logs) when the CUDA libraries or a device are missing, so the
provider in use is read back from the session, reported per model, and ``require_gpu`` turns a
fallback into an error instead.

A batched model can also get one ``BucketSession`` per batch bucket (``runtime/buckets.py``),
built and warmed by ``bucket_sessions.add_buckets``. A bucket's shapes never change, so it can run
through IO binding (``io_binding``): its input and output buffers are bound once, its host
buffers are page-locked on CUDA (where torch can pin them), and with ``cuda_graph`` the CUDA
provider captures the run once and replays it. Each step falls back, with its reason in the
model's ``batching`` record: no IO binding for inputs that are text or whose other dimensions
vary, no CUDA graph on the CPU provider or where onnxruntime refuses one (a node it cannot put
on the GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.errors import BadRequest, ServiceUnavailable, first_line
from service.protocol.v2 import DATATYPES, Signature, TensorSpec

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from service.runtime.bucket_sessions import BucketSession

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# what the CUDA provider re-plans whenever a run's input shape differs from the previous run's
# (cuDNN's algorithm choice and descriptors; see batcher.GPU_REPLANS for what it costs)
REPLANNED_ON_NEW_SHAPE = frozenset({"Conv", "ConvTranspose"})

# onnxruntime's type strings -> v2 datatypes
ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
    "tensor(bfloat16)": "BF16",
}


class ModelLoadError(Exception):
    """The stored graph could not be turned into a session."""


@dataclass
class LoadedSession:
    session: Any  # onnxruntime.InferenceSession
    provider: str
    signature: Signature
    replans_on_new_batch: bool = False  # a new batch size costs a re-plan (convolutions on CUDA)
    buckets: dict[int, BucketSession] = field(default_factory=dict)  # by rows, sorted
    bucket_report: dict[str, Any] | None = None  # what add_buckets measured and chose

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """A run of exactly a bucket's rows goes to that bucket's session, any other to the
        model's own session."""
        feeds = {k: _text(k, v) if v.dtype == object else v for k, v in inputs.items()}
        first = next(iter(feeds.values()), None)
        if self.buckets and first is not None and first.ndim:
            bucket = self.buckets.get(first.shape[0])
            if bucket is not None:
                return bucket.run(feeds, output_names)
        values = self.session.run(output_names, feeds)
        return dict(zip(output_names, values, strict=True))

    def staging(self, rows: int) -> dict[str, np.ndarray] | None:
        """The host buffers the bucket of ``rows`` rows reads its inputs from (buckets.pad
        writes a batch straight into them), or None."""
        bucket = self.buckets.get(rows)
        return bucket.staging if bucket is not None and bucket.staging else None


def _text(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime string tensors take ``str``; it would ``str()`` a bytes object instead."""
    out = np.empty(array.shape, dtype=object)
    try:
        out.flat[:] = [v.decode() if isinstance(v, bytes) else v for v in array.flat]
    except UnicodeDecodeError:
        raise BadRequest(
            f"input {name!r}: BYTES elements must be UTF-8 text for this model"
        ) from None
    return out


class SessionFactory:
    """Builds sessions with the best provider this machine really offers.

    The first session tries CUDA when onnxruntime lists it; if that session does not get it
    (missing CUDA libraries, no device) later ones go straight to the CPU instead of failing
    the same way, and logging the same errors, for every model.
    """

    def __init__(
        self,
        require_gpu: bool = False,
        intra_op_threads: int = 0,
        cudnn_conv_algo_search: str = "HEURISTIC",
        intra_op_spinning: bool = False,
    ) -> None:
        self.require_gpu = require_gpu
        self.intra_op_threads = intra_op_threads
        self.intra_op_spinning = intra_op_spinning
        self.cuda_options = {"cudnn_conv_algo_search": cudnn_conv_algo_search}
        self._cuda_usable: bool | None = None  # unknown until a session tells
        self.cpu_reason: str | None = None  # why CUDA is not used, once that is known
        self._lock = threading.Lock()

    def options(self, ort: Any) -> Any:
        """The session options every session of the service starts from."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, self.intra_op_threads)
        # spinning intra-op threads keep their cores busy after a run, against the event loop,
        # the other models' sessions and, on a small machine, the clients (Settings)
        spin = "1" if self.intra_op_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        return options

    def create(self, model: bytes | str) -> LoadedSession:
        import onnxruntime as ort

        options = self.options(ort)
        options.log_severity_level = 3  # a fallback is detected below, not read from logs
        session = None
        with self._lock:
            if self._cuda_usable is None and CUDA not in ort.get_available_providers():
                self._cuda_usable = False
                self.cpu_reason = "this onnxruntime build has no CUDA execution provider"
            if self._cuda_usable is None:
                _preload_cuda_libraries(ort)
            if self._cuda_usable is not False:
                session = self._cuda_session(ort, model, options)
                if session is not None:  # a failure of this one model says nothing of CUDA
                    self._cuda_usable = session.get_providers()[0] == CUDA
                    if not self._cuda_usable:
                        self.cpu_reason = cuda_unusable_reason(ort)
        on_gpu = session is not None and session.get_providers()[0] == CUDA
        if self.require_gpu and not on_gpu:
            raise ServiceUnavailable(
                "require_gpu is set but the CUDA execution provider is not usable here "
                f"(onnxruntime offers {ort.get_available_providers()}); refusing to use the CPU"
            )
        if session is None:
            try:
                session = ort.InferenceSession(model, options, providers=[CPU])
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelLoadError(first_line(exc)) from exc
        provider = session.get_providers()[0]
        replans = provider == CUDA and bool(op_types(model) & REPLANNED_ON_NEW_SHAPE)
        return LoadedSession(session, provider, signature_of(session), replans)

    def _cuda_session(self, ort: Any, model: bytes | str, options: Any) -> Any:
        # quietly: onnxruntime's own logger prints its failure to load the CUDA provider in red
        # (an ERROR and a WARNING) before falling back; the fallback is detected and explained
        # here instead, once (cuda_unusable_reason)
        set_severity = getattr(ort, "set_default_logger_severity", None)
        if set_severity is not None:
            set_severity(4)
        try:
            return ort.InferenceSession(model, options, providers=[(CUDA, self.cuda_options), CPU])
        except Exception as exc:
            logger.warning("a session with CUDA failed (%s); using the CPU", first_line(exc))
            return None
        finally:
            if set_severity is not None:
                set_severity(2)  # onnxruntime's default: warnings

    def probe(self) -> str:
        """The provider a model would get here (used at start for ``require_gpu``)."""
        return self.create(_identity_model()).provider


def op_types(model: bytes | str) -> set[str]:
    """Every op type in the graph, its subgraphs and its functions (weights are not loaded)."""
    import onnx

    if isinstance(model, bytes):
        proto = onnx.load_model_from_string(model)
    else:
        proto = onnx.load(model, load_external_data=False)
    found: set[str] = set()
    graphs = [proto.graph, *(f for f in proto.functions)]
    while graphs:
        for node in graphs.pop().node:
            found.add(node.op_type)
            for attr in node.attribute:
                graphs += [attr.g] if attr.HasField("g") else []
                graphs += list(attr.graphs)
    return found


def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN from NVIDIA's pip wheels when they sit beside onnxruntime.

    ``pip install onnxruntime-gpu[cuda,cudnn]`` puts them in site-packages, where the dynamic
    loader does not look; onnxruntime's ``preload_dlls`` loads them from there and then from the
    loader's usual path (a CUDA base image). It prints what it cannot find: that goes to the
    debug log, and a session that then misses the libraries falls back as usual.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or not _cuda_driver_present():
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except Exception as exc:  # a missing folder or library: the session check below decides
        logger.debug("onnxruntime.preload_dlls failed: %s", first_line(exc))
    if printed.getvalue().strip():
        logger.debug("onnxruntime.preload_dlls: %s", printed.getvalue().strip())


def cuda_unusable_reason(ort: Any) -> str:
    """Why a session asked for CUDA got the CPU, found without onnxruntime's logs: no driver, or
    a library the CUDA provider needs that the loader cannot find (named by the loader)."""
    if not _cuda_driver_present():
        return (
            "NVIDIA's driver (libcuda.so.1) is not loadable: no GPU here, or the container was "
            "started without --gpus"
        )
    provider = (
        Path(getattr(ort, "__file__", "")).parent / "capi" / "libonnxruntime_providers_cuda.so"
    )
    if provider.is_file():
        try:
            ctypes.CDLL(str(provider))
        except OSError as exc:
            return (
                f"onnxruntime's CUDA provider cannot load ({first_line(exc)}); install CUDA 13 "
                "and cuDNN 9, e.g. pip install 'onnxruntime-gpu[cuda,cudnn]'"
            )
    return "onnxruntime's CUDA provider found no usable device"


def _cuda_driver_present() -> bool:
    """Whether NVIDIA's driver library loads. Without it CUDA cannot work, and preloading the
    CUDA and cuDNN wheels would only cost memory: on the CPU benchmark machine, where torch's
    CUDA build brought them, a process's resident memory grew by 187 MiB."""
    if not sys.platform.startswith("linux"):
        return True  # let onnxruntime's own loader decide
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def cpu_session(model: bytes | str) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, providers=[CPU])


def signature_of(session: Any) -> Signature:
    def spec(arg: Any) -> TensorSpec:
        shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])]
        datatype = ORT_TYPES.get(arg.type)
        if datatype is None:
            raise ModelLoadError(f"{arg.name!r} has type {arg.type}, which v2 cannot carry")
        return TensorSpec(arg.name, datatype, shape)

    return Signature(
        [spec(a) for a in session.get_inputs()], [spec(a) for a in session.get_outputs()]
    )


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def example_feeds(
    signature: Signature, input_shapes: dict[str, list[int]] | None, rows: int | None = None
) -> dict[str, np.ndarray]:
    """Inputs to time or check a session with: each input at its shape in ``input_shapes``
    (the upload's example), else its own with 2 for a variable dimension; ``rows`` on dim 0
    when given. Floats are standard normal (seed 0), other types zeros."""
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in signature.inputs:
        shape = list(
            (input_shapes or {}).get(spec.name) or [2 if d == -1 else d for d in spec.shape]
        )
        if rows is not None and shape:
            shape[0] = rows
        dtype = DATATYPES[spec.datatype]
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
    return feeds


def outputs_close(want: np.ndarray, got: np.ndarray) -> bool:
    """A bucket's output against the model's own session on the same inputs: the same shape,
    and values equal up to what another convolution algorithm may round differently (a wrong
    binding or a stale buffer is far off)."""
    want, got = np.asarray(want), np.asarray(got)
    if want.shape != got.shape:
        return False
    if want.dtype.kind not in "fc":
        return bool(np.array_equal(want, got))
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return bool(np.allclose(got, want, rtol=1e-3, atol=1e-3 * scale + 1e-6, equal_nan=True))


def gpu_divergence(
    original: bytes | str, loaded: LoadedSession, input_shapes: dict[str, list[int]]
) -> dict[str, Any]:
    """How far the served (GPU) folded graph is from the original graph run on the CPU in fp32.

    Verification certifies the fold on the CPU; the CUDA provider computes convolutions and
    matmuls in TF32 by default, so this reports what serving on the GPU adds on top.
    """
    feeds = example_feeds(loaded.signature, input_shapes)
    names = [o.name for o in loaded.signature.outputs]
    want = cpu_session(original).run(names, feeds)
    got = loaded.run(feeds, names)
    outputs = []
    for name, w, g in zip(names, want, [got[n] for n in names], strict=True):
        w64, g64 = np.asarray(w, np.float64), np.asarray(g, np.float64)
        max_abs = float(np.max(np.abs(g64 - w64))) if w64.size else 0.0
        scale = float(np.max(np.abs(w64))) if w64.size else 0.0
        outputs.append(
            {"name": name, "max_abs_err": max_abs, "max_rel_err": max_abs / scale if scale else 0.0}
        )
    return {
        "provider": loaded.provider,
        "reference": "original graph on CPUExecutionProvider, fp32",
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "max_abs_err": max((o["max_abs_err"] for o in outputs), default=0.0),
        "outputs": outputs,
    }
