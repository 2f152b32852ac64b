"""The `bnfold` command: run for real in a subprocess where the command itself is under test
(a fold end to end, --help, a closed pipe, serve), in this process (`bnfold_here`, the same
`main`) where its answers to bad input are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

_SCRIPT = Path(sys.executable).with_name("bnfold")
_CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "bnfold.cli"]


def bnfold(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*_CMD, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def bnfold_here(capsys, monkeypatch):
    """`bnfold ARGS` in this process, in `cwd` (no interpreter start-up: seconds a call):
    its exit code and output, as `bnfold` gives them."""
    from bnfold.cli import main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def _conv_bn(path: Path, spatial=(6, 6), ir_version: int = 8, extra=()) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "scale": rng.uniform(0.5, 2, 4).astype(np.float32),
        "bias": rng.uniform(-1, 1, 4).astype(np.float32),
        "mean": rng.uniform(-1, 1, 4).astype(np.float32),
        "var": rng.uniform(0.5, 2, 4).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]),
            *extra,
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *spatial])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, *spatial])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    domains = sorted({n.domain for n in extra if n.domain})
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 15), *(helper.make_opsetid(d, 1) for d in domains)],
    )
    model.ir_version = ir_version
    onnx.save(model, path)
    return path


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_cli_folds_an_onnx_file_verifies_and_reports(tmp_path):
    _conv_bn(tmp_path / "in.onnx")

    proc = bnfold(
        "fold", "in.onnx", "-o", "out.onnx", "--verify", "--report", "r.json", cwd=tmp_path
    )

    assert proc.returncode == 0, proc.stderr
    assert "1 folded backward" in proc.stdout
    assert "nodes: 2 before, 1 after" in proc.stdout
    assert "verification OK" in proc.stdout
    assert "verifying" in proc.stderr  # progress goes to stderr
    out = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fold"]["report"]["counts"]["folded_backward"] == 1
    assert report["fold"]["nodes_after"] == 1 and report["verify_onnx"]["ok"] is True


def test_cli_folds_a_model_of_onnx_s_newest_ir_version_and_says_so(tmp_path, bnfold_here):
    """onnx's helper writes its newest IR version by default, newer than onnxruntime reads:
    lowered where the model needs nothing newer, with a note in the output and the report."""
    from bnfold.onnx.ir_version import ort_max_ir_version

    newest = ort_max_ir_version() + 1
    if newest > onnx.IR_VERSION:
        pytest.skip(f"onnx {onnx.__version__} writes no IR version onnxruntime cannot read")
    _conv_bn(tmp_path / "in.onnx", ir_version=newest)
    proc = bnfold_here(
        "fold", "in.onnx", "-o", "out.onnx", "--verify", "--report", "r.json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    note = f"note: IR version {newest} lowered to {ort_max_ir_version()}"
    assert note in proc.stdout and "verification OK" in proc.stdout
    assert onnx.load(tmp_path / "out.onnx").ir_version == ort_max_ir_version()
    assert json.loads((tmp_path / "r.json").read_text())["notes"][0].startswith(note[6:])


def test_cli_folds_a_model_onnxruntime_cannot_read_only_without_verify(tmp_path, bnfold_here):
    from bnfold.onnx.ir_version import ort_max_ir_version

    if not hasattr(TensorProto, "FLOAT6E2M3") or ort_max_ir_version() >= 14:
        pytest.skip("no element type newer than what onnxruntime reads")
    fp6 = [
        helper.make_node("Cast", ["y"], ["q"], to=TensorProto.FLOAT6E2M3, name="fp6"),
        helper.make_node("Cast", ["q"], ["z"], to=TensorProto.FLOAT, name="back"),
    ]
    _conv_bn(tmp_path / "in.onnx", ir_version=14, extra=fp6)
    line = _one_error_line(
        bnfold_here("fold", "in.onnx", "-o", "out.onnx", "--verify", cwd=tmp_path)
    )
    assert "needs ONNX IR version 14 for float6e2m3" in line and "cannot be verified" in line
    assert not (tmp_path / "out.onnx").exists()
    proc = bnfold_here("fold", "in.onnx", "-o", "out.onnx", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "the folded graph keeps the IR version, and onnxruntime cannot run it" in proc.stdout
    assert onnx.load(tmp_path / "out.onnx").ir_version == 14


def test_cli_names_an_operator_onnxruntime_cannot_run(tmp_path, bnfold_here):
    frob = helper.make_node("Frobnicate", ["y"], ["z"], domain="com.example")
    _conv_bn(tmp_path / "in.onnx", extra=[frob])
    line = _one_error_line(bnfold_here("fold", "in.onnx", "--verify", cwd=tmp_path))
    assert line.startswith("bnfold: error: onnxruntime cannot load the original graph: ")
    assert "com.example:Frobnicate" in line  # onnxruntime's reason, without its C++ location
    assert "ONNXRuntimeError" not in line and "onnxruntime_src" not in line


def test_cli_output_into_a_closed_pipe_exits_quietly(tmp_path):
    """`bnfold fold ... | head -1`: the reader leaving is not an error of bnfold's."""
    import os

    _conv_bn(tmp_path / "in.onnx")
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [*_CMD, "fold", "in.onnx"],
            cwd=tmp_path,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert "error" not in proc.stderr.lower() and "Traceback" not in proc.stderr, proc.stderr


def test_cli_symbolic_spatial_dims_need_input_shape(tmp_path, bnfold_here):
    _conv_bn(tmp_path / "in.onnx", spatial=("H", "W"))

    line = _one_error_line(bnfold_here("fold", "in.onnx", "--verify", cwd=tmp_path))
    assert "--input-shape x=" in line

    proc = bnfold_here("fold", "in.onnx", "--verify", "--input-shape", "x=1,3,7,5", cwd=tmp_path)
    assert proc.returncode == 0 and "verification OK" in proc.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["fold", "missing.onnx"], "no such file"),
        (["fold", "garbage.onnx"], "not an ONNX model"),
        (["fold", "zoo:no_such_model"], "unknown architecture zoo:no_such_model"),
        (["fold", "model.pt"], "looks like a PyTorch checkpoint; bnfold does not load"),
        (["fold", "w.safetensors"], "safetensors weights need their architecture"),
        (["fold", "in.onnx", "--weights", "w.safetensors"], "--weights goes with an arch"),
        (["fold", "zoo:conv1d_seq", "--weights", "model.pt"], "a PyTorch checkpoint"),
        (["fold", "zoo:conv1d_seq", "--weights", "w.safetensors"], "do not fit architecture"),
        (["fold", "timm:resnet18", "--arch-args", '{"pretrained": true}'], "is not accepted"),
        (["fold", "in.onnx", "--input-shape", "x=1,three"], "bad --input-shape"),
        (["fold", "external.onnx"], "external data"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, bnfold_here, args, expected):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "garbage.onnx").write_text("this is not protobuf\n" * 10)
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")  # a zip holding a pickle
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    model = onnx.load(_conv_bn(tmp_path / "in.onnx"))
    onnx.save_model(model, tmp_path / "external.onnx", save_as_external_data=True, size_threshold=0)

    assert expected in _one_error_line(bnfold_here(*args, cwd=tmp_path))


def test_cli_zoo_model_folds_exports_and_verifies(tmp_path):
    proc = bnfold("fold", "zoo:mlp_bn_before_act", "-o", "m.onnx", "--verify", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert "3 folded backward" in proc.stdout
    assert "ONNX: " in proc.stdout and "0 BatchNormalization" in proc.stdout
    assert proc.stdout.count("verification OK") == 2  # torch, then the exported graphs
    out = onnx.load(tmp_path / "m.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)


def test_cli_help_says_what_bnfold_does():
    proc = subprocess.run([*_CMD, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "Fold trained BatchNorm into the layers around it" in proc.stdout
    assert "``" not in proc.stdout


def test_cli_folds_torchvision_weights_in_torch_and_verifies_the_export(tmp_path):
    # resnet18: this test takes 44 s alone here, 94 s with shufflenet_v2_x0_5 (204 nodes to
    # export twice); shufflenet's fold is checked in tests/bnfold/test_architectures.py and
    # served in tests/service/test_architecture_uploads.py
    import torch
    from safetensors.torch import save_file

    from bnfold.architectures import parse_architecture

    model = parse_architecture("torchvision:resnet18", {"num_classes": 10}).build()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.5, 0.5)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    proc = bnfold(
        "fold",
        "torchvision:resnet18",
        "--weights",
        "w.safetensors",
        "--arch-args",
        '{"num_classes": 10}',
        "--input-shape",
        "x=1,3,64,64",
        "-o",
        "out.onnx",
        "--verify",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "0 BatchNormalization" in proc.stdout
    assert proc.stdout.count("verification OK") == 2  # torch, then the exported graphs
    out = onnx.load(tmp_path / "out.onnx")
    assert not any(n.op_type == "BatchNormalization" for n in out.graph.node)


def test_cli_reads_external_data_only_with_base_dir(tmp_path, bnfold_here):
    model = onnx.load(_conv_bn(tmp_path / "in.onnx"))
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, size_threshold=0)

    proc = bnfold_here(
        "fold", "ext.onnx", "--base-dir", ".", "-o", "out.onnx", "--verify", cwd=tmp_path
    )

    assert proc.returncode == 0, proc.stderr
    assert "verification OK" in proc.stdout
    assert [n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node] == ["Conv"]


def test_cli_serve_starts_the_service(tmp_path):
    import os
    import signal
    import socket
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
    env |= {"BNFOLD_DEPLOY_DEFAULTS": "0", "BNFOLD_API_TOKEN": "t" * 24}
    cmd = [sys.executable, "-c", "import sys; from bnfold.cli import main; sys.exit(main())"]
    proc = subprocess.Popen(
        [*cmd, "serve", "--port", str(port), "--store", str(tmp_path / "store")],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
                if status.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status is not None and status.status_code == 200
        assert (tmp_path / "store").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
