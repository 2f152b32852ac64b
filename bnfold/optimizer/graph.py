"""Small helpers on ONNX protos shared by the optimize steps: consumers, initializers,
constants, inferred ranks."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["GraphIndex", "attribute", "constants", "copy_model", "name_nodes", "value_types"]


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node named (exclusion lists name nodes); unique names kept, others made up."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant of the graph by name: initializers and Constant nodes' ``value``."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def value_types(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """(rank, elem_type) by value name, from onnx shape inference (none where it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is a help here
        inferred = model
    out = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = info.type.tensor_type
        if info.type.HasField("tensor_type") and t.HasField("shape"):
            out[info.name] = (len(t.shape.dim), t.elem_type)
    return out


def attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper_value(attr)
    return default


def helper_value(attr: onnx.AttributeProto):
    return onnx.helper.get_attribute_value(attr)


class GraphIndex:
    """Producers, consumers and initializers of one graph, for in-place weight edits."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
            for name in node.output:
                self.producer[name] = node
        self.graph_outputs = {o.name for o in graph.output}

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def weight(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def private_weight(self, name: str) -> bool:
        """An initializer used by exactly one node input, so editing it changes nothing else."""
        return name in self.initializers and len(self.consumers.get(name, [])) == 1

    def set_weight(self, name: str, value: np.ndarray) -> None:
        tensor = self.initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    def add_weight(self, name: str, value: np.ndarray) -> str:
        tensor = numpy_helper.from_array(value.astype(np.float32), name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        return name
