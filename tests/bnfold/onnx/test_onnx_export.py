"""export_onnx: dynamic dims, checker, onnxruntime, torch parity, BN kept exactly as folded."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx_graphs import run
from torch import nn

import bnfold
from bnfold.onnx.export import _within_rounding, export_onnx, ort_max_ir_version


class _Net(nn.Module):
    """Conv-BN-ReLU (foldable), ReLU-BN-ReLU (not foldable), pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(x))
        return self.head(x.mean(dim=(2, 3)))


def _bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory) -> tuple[onnx.ModelProto, str]:
    path = tmp_path_factory.mktemp("export") / "net.onnx"
    return export_onnx(net, (torch.randn(1, 3, 8, 8),), path=path), str(path)


def test_export_keeps_every_batchnorm_of_an_unfolded_module(exported):
    model, _ = exported
    assert _bn_count(model) == 2  # onnxscript's Conv+BN fusion is not applied


def test_export_writes_a_checked_model_that_onnxruntime_loads(exported):
    model, path = exported
    assert onnx.load(path) == model
    assert model.ir_version <= ort_max_ir_version()
    onnx.checker.check_model(model, full_check=True)


def test_export_has_dynamic_batch_and_spatial_dims(exported):
    model, _ = exported
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 3, 8, 8), (5, 3, 12, 10)])
def test_export_matches_torch_eval(net, exported, shape):
    model, _ = exported
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = net(x).numpy()
    (got,) = run(model, {model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_export_of_a_folded_module_holds_exactly_the_kept_batchnorms(net):
    x = torch.randn(2, 3, 8, 8)
    result = bnfold.fold(net, (x,))
    kept = len(result.report.kept)
    assert kept == 1  # bn2 sits between two ReLUs

    model = export_onnx(result.module, (x,))

    assert _bn_count(model) == kept
    (got,) = run(model, {model.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, net(x).numpy(), rtol=1e-4, atol=1e-5)


def test_fold_onnx_on_an_exported_graph_matches_the_torch_fold(exported):
    from bnfold.onnx.fold import fold_onnx
    from bnfold.onnx.verify import verify_onnx

    model, _ = exported
    result = fold_onnx(model)

    assert _bn_count(result.model) == 1  # bn2 sits between two ReLUs, as on the torch side
    (kept,) = result.report.kept
    assert "Relu" in kept.reason
    check = verify_onnx(model, result.model, input_shapes={model.graph.input[0].name: [1, 3, 8, 8]})
    assert check.ok, check.summary()


class _BatchStatisticsBN(nn.Module):
    """F.batch_norm(training=True) with running statistics, in an eval-mode module: it
    normalises with the batch's statistics (and updates the running ones) on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.linspace(-1, 1, 4))
        self.register_buffer("var", torch.linspace(0.5, 2, 4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, training=True, eps=1e-3)


def test_an_export_that_computes_something_else_is_refused_and_the_module_is_unchanged(tmp_path):
    torch.manual_seed(0)
    model = _BatchStatisticsBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "wrong.onnx"

    with pytest.raises(bnfold.ExportMismatch, match="computes something else than the module"):
        export_onnx(model, (torch.randn(4, 3, 6, 6),), path=path)

    assert not path.exists()  # nothing written
    assert not model.training
    for name, value in model.state_dict().items():  # the check's own run is undone
        assert torch.equal(value, before[name]), name
    unchecked = export_onnx(model, (torch.randn(4, 3, 6, 6),), check=False)
    assert _bn_count(unchecked) == 1  # what the exporter writes: an inference BN


def test_the_export_check_passes_what_the_exporter_writes_faithfully(net):
    x = torch.randn(3, 3, 8, 8)
    model = export_onnx(net, (x,))  # checked: no ExportMismatch on the faithful export

    (out,) = run(model, {model.graph.input[0].name: x.numpy()})
    np.testing.assert_allclose(out, net(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "graph_error,module_error,passes",
    [(5.0, 1.0, True), (20.0, 1.0, False), (1.0, 0.0, False), (1e9, math.inf, True)],
)
def test_a_difference_within_the_modules_own_rounding_passes(graph_error, module_error, passes):
    """A network whose activations explode (random weights) rounds its own float32 run far
    from float64 too: the graph is judged against ROUNDING_FACTOR (10) times that error."""
    exact = torch.linspace(-1e6, 1e6, 12, dtype=torch.float64)
    module_out = exact.float() + (module_error if math.isfinite(module_error) else math.inf)
    graph_out = (exact + graph_error).numpy().astype(np.float32)

    assert _within_rounding(graph_out, module_out, exact) is passes
