"""bnfold.optimize end to end on a small CNN, real onnxruntime sessions (never timed here)."""

import json

import numpy as np
import onnx
import pytest
import torch
from optimize_graphs import small_cnn

import bnfold
from bnfold.optimizer import progress
from bnfold.optimizer.choice import MAX_NOISE


def test_optimize_module_candidates_and_report(cnn, fast_pipeline):
    x = torch.randn(2, 3, 16, 16)
    seen = []
    with progress.reporting(lambda stage, done, total: seen.append(stage)):
        result = bnfold.optimize(cnn, x)
    names = [c.name for c in result.candidates]
    assert names[:2] == ["fp32", "int8_data_free"]
    assert not any(n.startswith("int8_minmax") for n in names)  # no calibration given
    assert isinstance(result.model, onnx.ModelProto)
    report = result.report.to_dict()
    json.dumps(report)
    assert report["cpu"]["int8"] in {"amx", "vnni", "dotprod", "none"}
    assert "assumed from example inputs" in report["steps"]["data_free"]["input_ranges"]
    assert report["steps"]["bn_statistics"]["tensors"] == 3
    assert set(report["timing"]["batches"]) == {"batch=1", "batch=4"}
    for c in result.candidates:
        assert {"rel_l2", "cosine", "top1_agreement"} <= set(c.accuracy)
        assert set(c.latency) == {"batch=1", "batch=4"}
    chosen = result.chosen
    assert chosen.model is result.model
    # the choice rule (not a speed claim): within budget, not slower than fp32 beyond the
    # run's A/A noise, faster by more than it
    assert set(report["timing"]["aa_control"]) == {"batch=1", "batch=4"}
    noise = report["timing"]["choice"]["noise"]
    assert noise == max(abs(r - 1) for r in report["timing"]["aa_control"].values())
    if chosen.name != "fp32":
        assert chosen.budget_met and chosen.speedup > 1 + noise
        slack = min(noise, MAX_NOISE)
        assert all(v["ratio"] <= 1 + slack for v in chosen.latency.values())
    assert "exporting and folding" in seen and "timing" in seen
    assert result.report.table().splitlines()[0].startswith("candidate")


def test_optimize_onnx_with_calibration_and_labels(cnn, fast_pipeline, tmp_path):
    from bnfold.onnx.export import export_onnx

    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "cnn.onnx"
    export_onnx(cnn, (x,), path=path)
    calibration = [
        np.random.default_rng(i).standard_normal((4, 3, 16, 16)).astype(np.float32)
        for i in range(3)
    ]
    with torch.no_grad():
        labels = np.concatenate([cnn(torch.from_numpy(c)).argmax(1).numpy() for c in calibration])
    result = bnfold.optimize(
        str(path),
        calibration=calibration,
        labels=labels,
        budget=bnfold.Budget(max_accuracy_drop=50.0),
    )
    names = [c.name for c in result.candidates]
    assert {"int8_minmax", "int8_percentile", "int8_entropy"} <= set(names)
    fp32 = result.candidates[0]
    assert fp32.accuracy["rel_l2"] < 1e-5 and fp32.accuracy["accuracy"] == 1.0
    assert "calibration" in result.report.to_dict()["steps"]["data_free"]["input_ranges"]
    for c in result.candidates:
        assert "accuracy_drop_points" in c.accuracy
        # an INT8 graph really is one
        if c.precision == "int8":
            assert any(n.op_type == "QuantizeLinear" for n in c.model.graph.node)


def test_optimize_rejects_bad_arguments(cnn):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="only 'cpu' and 'cuda'"):
        bnfold.optimize(cnn, x, target="tpu")
    with pytest.raises(ValueError, match="labels"):
        bnfold.optimize(cnn, x, labels=np.zeros(2))
    with pytest.raises(ValueError, match="example_inputs"):
        bnfold.optimize(cnn)
    with pytest.raises(TypeError):
        bnfold.optimize(42)


def test_optimize_cuda_offers_a_checked_fp16_candidate(cnn, fast_pipeline):
    result = bnfold.optimize(cnn, torch.randn(2, 3, 16, 16), target="cuda")
    fp16 = next(c for c in result.candidates if c.name == "fp16")
    assert fp16.accuracy["rel_l2"] < 5e-3 and fp16.budget_met
    assert result.report.chosen == "fp32"  # not timed without a CUDA device
    graph_io = [*fp16.model.graph.input, *fp16.model.graph.output]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in graph_io)
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.model.graph.initializer)


def test_optimize_notes_a_reference_with_one_class_and_checks_rel_l2(cnn, fast_pipeline):
    with torch.no_grad():
        cnn.head.bias[3] = 100.0  # class 3 on every input: top-1 agreement of a constant
    result = bnfold.optimize(cnn, torch.randn(2, 3, 16, 16), target="cuda")
    notes = [n for n in result.report.notes if "one class on 100%" in n]
    assert len(notes) == 1 and "relative L2 <= 0.05" in notes[0]
    for c in result.candidates:
        assert c.accuracy["reference_top1_majority"] == 1.0
        assert c.budget_met == (
            c.accuracy["rel_l2"] <= 0.05 and c.accuracy["top1_agreement"] >= 0.99
        )
    # with a varied reference there is no such note
    assert not any(
        "one class" in n
        for n in bnfold.optimize(small_cnn(), torch.randn(2, 3, 16, 16), target="cuda").report.notes
    )


def test_fp16_keeps_overflowing_weights_in_fp32():
    from onnx import TensorProto, helper, numpy_helper

    from bnfold.optimizer.fp16 import to_fp16

    w = np.full((2, 2), 1e5, np.float32)  # beyond fp16; the products are not
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="big")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = to_fp16(model)
    assert result.overflow_nodes == ["big"]
    from bnfold.optimizer.timing import make_session

    session = make_session(result.model)
    out = session.run(None, {"x": np.full((1, 2), 1e-2, np.float32)})[0]
    np.testing.assert_allclose(out, [[2e3, 2e3]], rtol=1e-3)


def _non_batch_dims_static(value: onnx.ValueInfoProto) -> bool:
    return all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim[1:])


def test_optimize_module_graph_has_static_shapes_onnxruntime_resolves(cnn, fast_pipeline, tmp_path):
    # with H and W symbolic, onnxruntime sees shape expressions it cannot resolve and ran
    # MobileNetV3-Large's convolutions up to 7% slower (docs/BENCHMARKS.md, issue 13)
    from bnfold.optimizer.timing import make_session, session_options

    result = bnfold.optimize(cnn, torch.randn(2, 3, 16, 16))
    fp32 = result.candidates[0].model
    (x,) = fp32.graph.input
    dims = x.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value")  # the batch stays dynamic
    assert [d.dim_value for d in dims[1:]] == [3, 16, 16]
    assert all(_non_batch_dims_static(v) for v in fp32.graph.value_info)
    # as onnxruntime runs it, at the optimizer's own session options
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "ort.onnx")
    import onnxruntime as ort

    ort.InferenceSession(fp32.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    assert optimized.graph.value_info
    assert all(_non_batch_dims_static(v) for v in optimized.graph.value_info)
    session = make_session(result.model)
    for batch in (1, 5):
        (y,) = session.run(None, {x.name: np.zeros((batch, 3, 16, 16), np.float32)})
        assert y.shape == (batch, 10)
    assert any("spatial size" in n for n in result.report.notes)


def test_optimize_onnx_with_symbolic_spatial_dims_is_kept_and_noted(cnn, fast_pipeline):
    from bnfold.onnx.export import export_onnx

    dynamic = export_onnx(cnn, (torch.randn(2, 3, 16, 16),))  # H and W symbolic
    result = bnfold.optimize(dynamic, np.zeros((2, 3, 16, 16), np.float32))
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert not any(d.HasField("dim_value") for d in dims[2:])
    assert any("symbolic dims besides the batch" in n for n in result.report.notes)


def test_optimize_quantizes_spatial_means_as_global_pools(fast_pipeline):
    """A squeeze-excitation mean (keepdim) is a GlobalAveragePool in every INT8 candidate, so
    onnxruntime runs it in int8; the fp32 candidate keeps the graph as folded."""
    torch.manual_seed(0)

    class SE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.SiLU()
            )
            self.fc = torch.nn.Conv2d(8, 8, 1)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x):
            y = self.conv(x)
            y = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
            return self.head(y.mean((2, 3)))

    model = SE().eval()
    x = torch.randn(2, 3, 16, 16)
    result = bnfold.optimize(model, x, calibration=[x.numpy()])
    # the SE mean is rewritten; the head's mean drops its dims (keepdims=0) and stays
    assert result.report.steps["pooling"] == {"rewritten": 1, "skipped": {"keepdims=0": 1}}
    ops = {c.name: [n.op_type for n in c.model.graph.node] for c in result.candidates}
    assert ops["fp32"].count("ReduceMean") == 2
    for name in ("int8_data_free", "int8_minmax"):
        assert ops[name].count("ReduceMean") == 1 and "GlobalAveragePool" in ops[name]
    with torch.no_grad():
        expected = model(x).numpy()
    got = _run_onnx(result.candidates[-1].model, x.numpy())
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.99


def _run_onnx(model, x):
    from bnfold.optimizer.timing import make_session

    session = make_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _fixed_batch_graph(cnn, tmp_path, batch: int):
    from bnfold.onnx.export import export_onnx

    path = tmp_path / f"cnn_b{batch}.onnx"
    x = torch.randn(batch, 3, 16, 16)
    export_onnx(cnn, (x,), path=path, dynamic_batch=False, dynamic_spatial=False)
    first = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert first.dim_value == batch  # the graph takes this batch size only
    return path


def test_optimize_a_graph_that_fixes_its_batch_size(cnn, fast_pipeline, tmp_path):
    """Every set at the graph's one batch size: calibration re-split (3 sets of 4 rows into 12
    of 1), generated inputs as many rows in sets of 1, timing at batch 1 only."""
    path = _fixed_batch_graph(cnn, tmp_path, 1)
    calibration = [
        np.random.default_rng(i).standard_normal((4, 3, 16, 16)).astype(np.float32)
        for i in range(3)
    ]
    with torch.no_grad():
        labels = np.concatenate([cnn(torch.from_numpy(c)).argmax(1).numpy() for c in calibration])
    result = bnfold.optimize(str(path), calibration=calibration, labels=labels)
    assert {"int8_minmax", "int8_data_free"} <= {c.name for c in result.candidates}
    for c in result.candidates:
        assert c.accuracy["samples"] == 12 and c.accuracy["accuracy"] is not None, c.name
        assert set(c.latency) <= {"batch=1"}, c.latency
    assert set(result.candidates[0].latency) == {"batch=1"}
    generated = bnfold.optimize(str(path))
    assert generated.candidates[0].accuracy["samples"] == (
        1 + fast_pipeline.EVAL_BATCH * fast_pipeline.EVAL_BATCHES
    )


def test_optimize_refuses_calibration_that_does_not_fill_the_fixed_batches(
    cnn, fast_pipeline, tmp_path
):
    path = _fixed_batch_graph(cnn, tmp_path, 2)
    calibration = [np.zeros((5, 3, 16, 16), np.float32)]
    with pytest.raises(
        ValueError,
        match="calibration: 5 samples; the graph takes batches of "
        "exactly 2, so give a multiple of 2",
    ):
        bnfold.optimize(str(path), calibration=calibration)


def test_optimize_keeps_a_grouped_conv_transpose_in_fp32_with_the_reason(fast_pipeline):
    """onnxruntime's quantize_static fails on a grouped ConvTranspose's bias (per-channel
    scales along its weight's axis 1: C_out / group of them); it stays fp32, the plain
    ConvTranspose after it is quantized."""
    import models

    model = models.build("convtranspose_decoder")
    result = bnfold.optimize(model, models.example_inputs("convtranspose_decoder"))
    kept = result.report.to_dict()["steps"]["fp32_in_every_int8_graph"]
    assert len(kept) == 1 and "grouped ConvTranspose (group 4)" in next(iter(kept.values()))
    assert any("stays fp32 in every INT8 graph" in n for n in result.report.notes)
    (grouped,) = kept
    for c in result.candidates:
        if c.precision != "int8":
            continue
        nodes = {n.name: n for n in c.model.graph.node}
        produced = {o: n.op_type for n in c.model.graph.node for o in n.output}
        assert produced.get(nodes[grouped].input[1]) != "DequantizeLinear", c.name
        if c.name == "int8_data_free":  # the mixed candidates choose by timing too
            transposes = [n for n in nodes.values() if n.op_type == "ConvTranspose"]
            assert any(produced.get(n.input[1]) == "DequantizeLinear" for n in transposes)
