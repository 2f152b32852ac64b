"""bnfold.onnx.ir_version: a model declaring onnx's own newest IR version is lowered to what
onnxruntime reads where it needs nothing newer, and refused, naming what needs it, where not."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold.onnx.fold import fold_onnx
from bnfold.onnx.ir_version import lower_for_runtime, ort_max_ir_version, required_ir_version
from bnfold.onnx.verify import verify_onnx

NEWER = ort_max_ir_version() + 1


def _conv_bn(ir_version: int, opset: int = 17, extra: list | None = None) -> onnx.ModelProto:
    """x[N,3,8,8] -> Conv -> BatchNormalization -> y, declaring `ir_version`."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in [("w", (4, 3, 3, 3)), ("s", (4,)), ("t", (4,)), ("m", (4,))]
    ] + [numpy_helper.from_array(rng.uniform(0.5, 2, 4).astype(np.float32), "v")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"], name="bn"),
        *(extra or []),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


@pytest.fixture(scope="module")
def newer() -> onnx.ModelProto:
    if NEWER > onnx.IR_VERSION:
        pytest.skip(f"onnx {onnx.__version__} writes no IR version onnxruntime cannot read")
    model = _conv_bn(NEWER)
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(Exception, match="Unsupported model IR version"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return model


def test_a_newer_ir_version_is_lowered_in_a_copy_that_onnxruntime_runs(newer):
    lowered, note = lower_for_runtime(newer)
    assert newer.ir_version == NEWER  # the caller's model is not changed
    assert lowered.ir_version == ort_max_ir_version()
    assert f"IR version {NEWER} lowered to {ort_max_ir_version()}" in note
    assert "nothing newer than IR 8 (its operator sets)" in note
    lowered.ir_version = NEWER
    assert lowered == newer  # nothing else changed


def test_a_readable_model_comes_back_as_itself():
    model = _conv_bn(8)
    assert lower_for_runtime(model) == (model, None)


def test_a_newer_ir_version_is_folded_and_verified(newer):
    folded = fold_onnx(newer)
    assert "BatchNormalization" not in {n.op_type for n in folded.model.graph.node}
    check = verify_onnx(newer, folded.model)
    assert check.ok, check.summary()


@pytest.mark.parametrize(
    "extra, needed, names",
    [
        ([], 8, "its operator sets"),
        (
            [helper.make_node("Cast", ["y"], ["q"], to=TensorProto.INT4, name="to_int4")],
            10,
            "int4 (graph 'g', attribute 'to' of node 'to_int4')",
        ),
        (
            [
                helper.make_node(
                    "Constant",
                    [],
                    ["k"],
                    value=helper.make_tensor("k", TensorProto.FLOAT8E8M0, [1], [1.0]),
                    name="k8",
                )
            ],
            12,
            "float8e8m0 (graph 'g', attribute 'value' of node 'k8')",
        ),
    ],
)
def test_required_ir_version_names_what_needs_it(extra, needed, names):
    assert required_ir_version(_conv_bn(8, extra=extra)) == (needed, names)


def test_opsets_and_types_in_subgraphs_count():
    assert required_ir_version(_conv_bn(8, opset=21))[0] == 10
    then = helper.make_graph(
        [helper.make_node("Cast", ["y"], ["z"], to=TensorProto.UINT4, name="inner")],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.UINT4, None)],
    )
    branch = helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then)
    assert required_ir_version(_conv_bn(8, extra=[branch])) == (
        10,
        "uint4 (value 'z')",
    )


def test_a_model_that_needs_a_newer_ir_version_is_refused_naming_why():
    if not hasattr(TensorProto, "FLOAT6E2M3") or ort_max_ir_version() >= 14:
        pytest.skip("no element type newer than what onnxruntime reads")
    cast = helper.make_node("Cast", ["y"], ["q"], to=TensorProto.FLOAT6E2M3, name="to_fp6")
    model = _conv_bn(14, extra=[cast])
    with pytest.raises(ValueError, match=r"needs ONNX IR version 14 for float6e2m3 .*reads up to"):
        lower_for_runtime(model)


def test_verify_names_an_operator_onnxruntime_does_not_have():
    model = _conv_bn(8, extra=[helper.make_node("Frob", ["y"], ["z"], domain="x.y", name="f")])
    model.opset_import.append(helper.make_opsetid("x.y", 1))
    with pytest.raises(
        ValueError, match=r"^onnxruntime cannot load the original graph: .*x\.y:Frob.* not a "
    ):
        verify_onnx(model, model)


def test_optimize_takes_a_newer_ir_version_with_a_note(newer):
    from bnfold.optimizer.source import original_graph

    graph, module, notes = original_graph(newer, None, None)
    assert module is None and graph.ir_version == ort_max_ir_version()
    assert notes[0].startswith(f"IR version {NEWER} lowered to {ort_max_ir_version()}")
