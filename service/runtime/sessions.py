"""onnxruntime sessions and the choice of execution provider.

CUDA is tried only when onnxruntime lists it *and* a session really gets it: onnxruntime falls
back to the CPU silently (it only logs) when the CUDA libraries or a device are missing, so the
provider in use is read back from the session, reported per model, and ``require_gpu`` turns a
fallback into an error instead.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import BadRequest, ServiceUnavailable, first_line
from service.protocol.v2 import DATATYPES, Signature, TensorSpec

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

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

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        feeds = {k: _text(k, v) if v.dtype == object else v for k, v in inputs.items()}
        values = self.session.run(output_names, feeds)
        return dict(zip(output_names, values, strict=True))


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

    def __init__(self, require_gpu: bool = False, intra_op_threads: int = 0) -> None:
        self.require_gpu = require_gpu
        self.intra_op_threads = intra_op_threads
        self._cuda_usable: bool | None = None  # unknown until a session tells
        self._lock = threading.Lock()

    def create(self, model: bytes | str) -> LoadedSession:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # a fallback is detected below, not read from logs
        options.intra_op_num_threads = max(0, self.intra_op_threads)
        session = None
        with self._lock:
            if self._cuda_usable is None and CUDA not in ort.get_available_providers():
                self._cuda_usable = False
            if self._cuda_usable is not False:
                session = self._cuda_session(ort, model, options)
                if session is not None:  # a failure of this one model says nothing of CUDA
                    self._cuda_usable = session.get_providers()[0] == CUDA
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
        return LoadedSession(session, session.get_providers()[0], signature_of(session))

    @staticmethod
    def _cuda_session(ort: Any, model: bytes | str, options: Any) -> Any:
        try:
            return ort.InferenceSession(model, options, providers=[CUDA, CPU])
        except Exception as exc:
            logger.warning("a session with CUDA failed (%s); using the CPU", first_line(exc))
            return None

    def probe(self) -> str:
        """The provider a model would get here (used at start for ``require_gpu``)."""
        return self.create(_identity_model()).provider


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


def gpu_divergence(
    original: bytes | str, loaded: LoadedSession, input_shapes: dict[str, list[int]]
) -> dict[str, Any]:
    """How far the served (GPU) folded graph is from the original graph run on the CPU in fp32.

    Verification certifies the fold on the CPU; the CUDA provider computes convolutions and
    matmuls in TF32 by default, so this reports what serving on the GPU adds on top.
    """
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in loaded.signature.inputs:
        shape = input_shapes.get(spec.name) or [2 if d == -1 else d for d in spec.shape]
        dtype = DATATYPES[spec.datatype]
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=dtype)
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
