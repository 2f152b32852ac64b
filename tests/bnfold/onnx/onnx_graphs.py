"""Helpers for the ONNX tests: small graphs built with onnx.helper, run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def bn_arrays(c: int, rng: np.random.Generator, zero_shift: bool = False) -> dict[str, np.ndarray]:
    """Scale, B, mean, var of a trained-looking BN (with t = B - s * mean = 0 if asked)."""
    scale = rng.uniform(0.5, 2.0, c).astype(np.float32)
    var = rng.uniform(0.5, 2.0, c).astype(np.float32)
    mean = rng.uniform(-1.0, 1.0, c).astype(np.float32)
    bias = rng.uniform(-1.0, 1.0, c).astype(np.float32)
    if zero_shift:
        mean = np.zeros(c, np.float32)
        bias = np.zeros(c, np.float32)
    return {"scale": scale, "B": bias, "mean": mean, "var": var}


class GraphBuilder:
    """Collects nodes and initializers; `model()` makes a checked ModelProto."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, *shape: int) -> str:
        return self.init(name, (self.rng.standard_normal(shape) * 0.3).astype(np.float32))

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> onnx.NodeProto:
        node = helper.make_node(
            op, inputs, outputs, name=f"{op.lower()}_{len(self.nodes)}", **attrs
        )
        self.nodes.append(node)
        return node

    def bn(self, x: str, y: str, c: int, zero_shift: bool = False, **attrs) -> onnx.NodeProto:
        params = bn_arrays(c, self.rng, zero_shift)
        names = [self.init(f"{y}_{k}", v) for k, v in params.items()]
        return self.node("BatchNormalization", [x, *names], [y], **attrs)

    def model(
        self,
        inputs: dict[str, list],
        outputs: dict[str, list | None],
        opset: int = 15,
        graph_inputs_extra: list[onnx.ValueInfoProto] = (),
        check: bool = True,
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()]
            + list(graph_inputs_extra),
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict, tol: float = 2e-5):
    for ra, rb in zip(run(a, feeds), run(b, feeds), strict=True):
        assert ra.shape == rb.shape
        scale = max(1.0, float(np.abs(ra).max()))
        np.testing.assert_allclose(rb, ra, rtol=0, atol=tol * scale)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
