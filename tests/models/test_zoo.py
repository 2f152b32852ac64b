"""The zoo: every model builds from its shipped weights, runs, and carries trained BN statistics;
the training run behind the weights is repeatable on one machine and reaches their fit."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import models
from models import shipped
from models.training import TrainingConfig

NAMES = models.names()

OUTPUT_SHAPES = {  # per sample, without the batch dim
    "mlp_bn_after_act": (10,),
    "mlp_bn_before_act": (10,),
    "cnn_conv_bn_relu": (10,),
    "resnet_small": (10,),
    "mobilenet_small": (10,),
    "preact_net": (10,),
    "convtranspose_decoder": (3, 16, 16),
    "conv1d_seq": (4,),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # models this small gain nothing from a second thread, and on a busy machine it mostly waits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def leaf_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def batch_norms(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def weights_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def assert_bit_identical(a: nn.Module, b: nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_names_are_the_zoo_in_stable_order():
    assert NAMES == list(OUTPUT_SHAPES)
    assert models.names() == NAMES
    assert set(models.DEFAULT_MODELS) <= set(NAMES)
    assert models.DEFAULT_MODELS == ("mlp_bn_after_act", "resnet_small")


@pytest.mark.parametrize("name", NAMES)
def test_input_shapes_have_batch_one_and_match_example_inputs(name):
    shapes = models.input_shapes(name)
    assert all(shape[0] == 1 for shape in shapes)
    inputs = models.example_inputs(name, batch=5)
    assert [tuple(x.shape) for x in inputs] == [(5, *shape[1:]) for shape in shapes]
    assert all(x.dtype == torch.float32 for x in inputs)


@pytest.mark.parametrize("name", NAMES)
def test_example_inputs_are_deterministic_and_leave_rng_alone(name):
    rng_before = torch.get_rng_state()
    first = models.example_inputs(name, batch=3)
    second = models.example_inputs(name, batch=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", NAMES)
def test_build_runs_on_example_inputs(name, batch):
    model = models.build(name)
    assert not any(m.training for m in model.modules())
    assert all(
        p.dtype == torch.float32 for p in model.state_dict().values() if p.is_floating_point()
    )
    with torch.no_grad():
        output = model(*models.example_inputs(name, batch=batch))
    assert output.shape == (batch, *OUTPUT_SHAPES[name])
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", NAMES)
def test_build_bn_statistics_come_from_training(name):
    model = models.build(name)
    norms = batch_norms(model)
    assert norms
    for bn in norms:
        assert bn.track_running_stats
        assert bn.num_batches_tracked.item() == TrainingConfig().steps
        assert not torch.all(bn.running_mean == 0)
        assert not torch.all(bn.running_var == 1)
        assert bn.momentum == 0.1  # restored after training with momentum=None
    # the first BN sees the skewed inputs (or their first affine map): clearly not 0 / 1
    first = norms[0]
    assert first.running_mean.abs().max() > 0.1
    assert (first.running_var - 1).abs().max() > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_build_twice_is_bit_identical_and_independent(name):
    first = models.build(name)
    second = models.build(name)
    assert first is not second
    assert_bit_identical(first, second)
    inputs = models.example_inputs(name, batch=3)
    with torch.no_grad():
        assert torch.equal(first(*inputs), second(*inputs))
        for p in first.parameters():
            p.zero_()
    assert_bit_identical(second, models.build(name))  # the cache is not the copy handed out


@pytest.mark.parametrize("bn_after_act", [True, False])
def test_mlp_layout_places_bn_around_activation(bn_after_act):
    name = "mlp_bn_after_act" if bn_after_act else "mlp_bn_before_act"
    block = (
        [nn.Linear, nn.LeakyReLU, nn.BatchNorm1d]
        if bn_after_act
        else [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU]
    )
    leaves = leaf_modules(models.build(name))
    assert [type(m) for m in leaves] == block * 3 + [nn.Linear]
    linears = [m for m in leaves if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (300, 200),
        (200, 100),
        (100, 50),
        (50, 10),
    ]
    assert [m.num_features for m in leaves if isinstance(m, nn.BatchNorm1d)] == [200, 100, 50]


def test_placements_the_zoo_promises_are_there():
    resnet = models.build("resnet_small")
    downsamples = [m.downsample for m in resnet.modules() if getattr(m, "downsample", None)]
    assert any(
        isinstance(d[0], nn.Conv2d)
        and d[0].kernel_size == (1, 1)
        and isinstance(d[1], nn.BatchNorm2d)
        for d in downsamples
    )

    mobilenet_leaves = leaf_modules(models.build("mobilenet_small"))
    assert any(
        isinstance(conv, nn.Conv2d)
        and conv.groups == conv.in_channels == conv.out_channels > 1
        and isinstance(bn, nn.BatchNorm2d)
        and isinstance(act, nn.ReLU6)
        for conv, bn, act in zip(
            mobilenet_leaves, mobilenet_leaves[1:], mobilenet_leaves[2:], strict=False
        )
    )

    preact_leaves = leaf_modules(models.build("preact_net"))
    assert isinstance(preact_leaves[1], nn.BatchNorm2d)  # stem conv, then BN -> ReLU -> conv
    assert [type(m) for m in preact_leaves[-4:]] == [
        nn.BatchNorm2d,
        nn.ReLU,
        nn.AdaptiveAvgPool2d,
        nn.Linear,
    ]

    decoder_leaves = leaf_modules(models.build("convtranspose_decoder"))
    transposed = [m for m in decoder_leaves if isinstance(m, nn.ConvTranspose2d)]
    assert any(m.groups > 1 for m in transposed)
    assert isinstance(decoder_leaves[0], nn.Linear)

    seq_leaves = leaf_modules(models.build("conv1d_seq"))
    assert [type(m) for m in seq_leaves[:3]] == [nn.Conv1d, nn.BatchNorm1d, nn.ReLU]


@pytest.mark.parametrize("name", NAMES)
def test_build_is_fx_traceable(name):
    model = models.build(name)
    traced = torch.fx.symbolic_trace(model)
    inputs = models.example_inputs(name, batch=2)
    with torch.no_grad():
        assert torch.equal(traced(*inputs), model(*inputs))


@pytest.mark.parametrize("lookup", [models.build, models.example_inputs, models.input_shapes])
def test_unknown_name_raises_key_error_naming_valid_names(lookup):
    with pytest.raises(KeyError) as excinfo:
        lookup("no_such_model")
    assert isinstance(excinfo.value, models.UnknownModelError)
    message = str(excinfo.value)
    assert "no_such_model" in message
    assert all(name in message for name in NAMES)


_DIGEST_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import models
for name in sys.argv[2:]:
    digest = hashlib.sha256()
    for key, value in models.train(name)[0].state_dict().items():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    print(name, digest.hexdigest())
"""


# one model per kind of affine kernel (Linear, Conv2d, ConvTranspose2d, Conv1d) keeps it quick
FRESH_PROCESS_NAMES = ["mlp_bn_after_act", "resnet_small", "convtranspose_decoder", "conv1d_seq"]


def test_training_is_bit_identical_in_a_fresh_process_with_other_threads():
    # a different thread count changes how CPU kernels split reductions; a run must not care
    # (on one machine: across CPUs it differs, which is why builds load shipped weights)
    threads = 1 if torch.get_num_threads() > 1 else 2
    repo_root = Path(models.__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", _DIGEST_SCRIPT, str(threads), *FRESH_PROCESS_NAMES],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    fresh = dict(line.split() for line in result.stdout.splitlines())
    assert fresh == {name: weights_digest(models.train(name)[0]) for name in FRESH_PROCESS_NAMES}


@pytest.fixture(scope="module")
def first_runs() -> dict[str, nn.Module]:
    return {name: models.train(name)[0] for name in ["mlp_bn_after_act", "conv1d_seq"]}


# two cheap models suffice: this test is about the caller's state, the one above about weights
@pytest.mark.parametrize("name", ["mlp_bn_after_act", "conv1d_seq"])
def test_training_repeats_identically_and_leaves_caller_state_alone(name, first_runs):
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(12345)  # the caller's RNG must not matter
        rng_before = torch.get_rng_state()
        torch.set_num_threads(2)  # nor its threads, which training sets to 1 for a while
        try:
            with torch.no_grad():  # nor its autograd mode
                retrained, _ = models.train(name)
            assert torch.get_num_threads() == 2
        finally:
            torch.set_num_threads(1)
        assert torch.equal(torch.get_rng_state(), rng_before)
    assert_bit_identical(first_runs[name], retrained)
    inputs = models.example_inputs(name, batch=3)
    with torch.no_grad():
        assert torch.equal(first_runs[name](*inputs), retrained(*inputs))


@pytest.mark.parametrize("name", NAMES)
def test_build_is_exactly_the_shipped_weights(name):
    state = models.build(name).state_dict()
    on_disk = load_file(str(shipped.path(name)))
    assert state.keys() == on_disk.keys()
    for key, value in on_disk.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", NAMES)
def test_training_reaches_the_fit_of_the_shipped_weights(name):
    # another CPU's run has other weights (sums round differently): it must fit as well, not
    # equal; 20% + 0.02 covers torch's scalar kernels against its AVX-512 ones (up to 3% here)
    model, log = models.train(name)
    assert log.last_loss < log.first_loss
    shipped_fit = models.fit_score(name, models.build(name))
    assert models.fit_score(name, model) == pytest.approx(log.fit_loss)
    assert log.fit_loss <= 1.2 * shipped_fit + 0.02
    record = shipped.read_record(name)
    assert record["steps"] == log.steps == TrainingConfig().steps
    assert {"first_loss", "last_loss", "fit_loss", "cpu", "torch"} <= record.keys()


def test_build_without_shipped_weights_names_the_command_that_makes_them(monkeypatch, tmp_path):
    monkeypatch.setattr(shipped, "DIR", tmp_path)
    models.clear_cache()
    try:
        with pytest.raises(models.MissingWeightsError, match="python -m models.train conv1d_seq"):
            models.build("conv1d_seq")
    finally:
        models.clear_cache()


def test_train_command_checks_without_writing():
    repo_root = Path(models.__file__).resolve().parents[1]
    before = shipped.path("conv1d_seq").read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "models.train", "--check", "conv1d_seq"],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=300,
        check=True,
    )
    assert result.stdout.startswith("conv1d_seq: loss ")
    assert "shipped weights" in result.stdout
    assert shipped.path("conv1d_seq").read_bytes() == before


def test_train_command_refuses_unknown_names():
    result = subprocess.run(
        [sys.executable, "-m", "models.train", "no_such_model"],
        capture_output=True,
        text=True,
        cwd=Path(models.__file__).resolve().parents[1],
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown zoo models ['no_such_model']" in result.stderr


def test_build_in_inference_mode_gives_a_trainable_model():
    models.clear_cache()  # so that the build loads inside the caller's inference mode
    with torch.inference_mode():
        model = models.build("mlp_bn_after_act")
        (x,) = models.example_inputs("mlp_bn_after_act", batch=4)
    assert not any(t.is_inference() for t in [x, *model.state_dict().values()])
    model.train()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
