"""A model's ONNX IR version, lowered to what the installed onnxruntime reads where that is exact.

onnx's helper writes its own newest IR version unless told otherwise (14 with onnx 1.23), and
onnxruntime refuses a model newer than it reads (13 for onnxruntime 1.31: "Unsupported model IR
version"), whatever the model holds. The IR version says which format features a model may
use; lowering it changes nothing else, so it is exact when the model uses none of the newer
ones. What a model needs:

1. its operator sets: ``onnx.helper.find_min_ir_version_for`` (opset 17 needs IR 8);
2. its tensor element types, wherever a type is named (graph inputs, outputs and value_info,
   nested in sequences, maps and optionals; initializers; tensor attributes; Cast's ``to``;
   subgraphs and functions: ``bnfold.onnx.walk``): IR 10 added int4 / uint4, 11 float4e2m1,
   12 float8e8m0, 13 int2 / uint2, 14 float6e2m3 / float6e3m2;
3. IR 14 also made opaque types available outside ONNX-ML builds: a model naming one needs it.

A model that needs more than onnxruntime reads is refused with what needs it.
"""

from __future__ import annotations

import functools

import onnx
from onnx import AttributeProto, TensorProto, helper

from bnfold.onnx.walk import graphs, nodes, tensors

__all__ = ["lower_for_runtime", "ort_max_ir_version", "required_ir_version"]

# the IR version that introduced each element type newer than IR 9 (older ones every reader has)
_TYPE_IR = {
    getattr(TensorProto, name): ir
    for name, ir in [
        ("UINT4", 10),
        ("INT4", 10),
        ("FLOAT4E2M1", 11),
        ("FLOAT8E8M0", 12),
        ("UINT2", 13),
        ("INT2", 13),
        ("FLOAT6E2M3", 14),
        ("FLOAT6E3M2", 14),
    ]
    if hasattr(TensorProto, name)  # an older onnx knows fewer types
}
_OPAQUE_IR = 14


@functools.cache
def ort_max_ir_version() -> int:
    """The newest ONNX IR version the installed onnxruntime loads (probed once)."""
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for version in range(onnx.IR_VERSION, 6, -1):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = version
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - any failure means "not this version"
            continue
        return version
    return 7


def required_ir_version(model: onnx.ModelProto) -> tuple[int, str]:
    """(the lowest IR version that holds `model`, what needs it)."""
    opsets = list(model.opset_import)
    need = [(helper.find_min_ir_version_for(opsets, ignore_unknown=True), "its operator sets")]

    def element(elem_type: int, where: str) -> None:
        if elem_type in _TYPE_IR:
            name = TensorProto.DataType.Name(elem_type).lower()
            need.append((_TYPE_IR[elem_type], f"{name} ({where})"))

    def type_proto(t: onnx.TypeProto, where: str) -> None:
        kind = t.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            element(getattr(t, kind).elem_type, where)
        elif kind == "sequence_type":
            type_proto(t.sequence_type.elem_type, where)
        elif kind == "optional_type":
            type_proto(t.optional_type.elem_type, where)
        elif kind == "map_type":
            element(t.map_type.key_type, where)
            type_proto(t.map_type.value_type, where)
        elif kind == "opaque_type":
            need.append((_OPAQUE_IR, f"an opaque type ({where})"))

    for g in graphs(model):
        for value in [*g.input, *g.output, *g.value_info]:
            type_proto(value.type, f"value {value.name!r}")
    for where, t in tensors(model):
        element(t.data_type, where)
    for where, node in nodes(model):
        for a in node.attribute:
            at = f"{where}, attribute {a.name!r} of node {node.name or node.op_type!r}"
            if a.type == AttributeProto.TYPE_PROTO:
                type_proto(a.tp, at)
            elif a.type == AttributeProto.INT and node.op_type == "Cast" and a.name == "to":
                element(a.i, at)
    return max(need, key=lambda item: item[0])


def lower_for_runtime(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """`model` as onnxruntime reads it, and a note of what changed: the model itself and None
    where onnxruntime reads its IR version, else a copy declaring the newest one onnxruntime
    reads. A ValueError when the model needs a newer IR version than that."""
    import onnxruntime as ort

    readable = ort_max_ir_version()
    if model.ir_version <= readable:
        return model, None
    needed, why = required_ir_version(model)
    if needed > readable:
        raise ValueError(
            f"the model needs ONNX IR version {needed} for {why}; onnxruntime "
            f"{ort.__version__} reads up to {readable}"
        )
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = readable
    return lowered, (
        f"IR version {model.ir_version} lowered to {readable}, the newest onnxruntime "
        f"{ort.__version__} reads: the model uses nothing newer than IR {needed} ({why}), so "
        "nothing else changes"
    )
