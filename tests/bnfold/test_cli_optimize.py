"""bnfold optimize: bad input is one line and exit 2; a run writes the graph and the report."""

import json

import numpy as np
import onnx
import pytest
import torch

from bnfold.cli import main as _main


def main(argv: list[str]) -> int:
    """Exit code of `bnfold ARGV`, whether argparse exits or main returns."""
    try:
        return _main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def fast(monkeypatch):
    from bnfold.optimizer import pipeline

    monkeypatch.setattr(pipeline, "TIMING_ROUNDS", 2)
    monkeypatch.setattr(pipeline, "SEARCH_ROUNDS", 2)
    monkeypatch.setattr(pipeline, "EVAL_BATCHES", 1)
    monkeypatch.setattr(pipeline, "LARGE_BATCH", 2)


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    from bnfold.onnx.export import export_onnx
    from models import digits

    path = tmp_path_factory.mktemp("cli") / "digits.onnx"
    split = digits.load_split()
    export_onnx(digits.build(), (split.train_x[:4],), path=path)
    return path, split


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bnfold: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "-o OUT.onnx"),
        (["-o", "X.onnx", "--calibration", "missing.npz"], "no such file"),
        (["-o", "X.onnx", "--labels", "missing.npy"], "no such file"),
        (["-o", "X.onnx", "--min-top1-agreement", "2"], "fraction"),
        (["-o", "X.onnx", "--max-accuracy-drop", "0.5"], "needs --labels"),
        (["-o", "X.onnx", "--target", "tpu"], "invalid choice"),
    ],
)
def test_optimize_bad_input_is_one_line(digits_onnx, capsys, tmp_path, extra, message):
    path, _ = digits_onnx
    extra = [str(tmp_path / e) if e.endswith((".npz", ".npy")) else e for e in extra]
    assert main(["optimize", str(path), *extra]) == 2
    assert message in _error_line(capsys)


def test_optimize_missing_file_and_wrong_npz(digits_onnx, capsys, tmp_path):
    assert main(["optimize", str(tmp_path / "none.onnx"), "-o", "x.onnx"]) == 2
    assert "no such file" in _error_line(capsys)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    path, _ = digits_onnx
    assert main(["optimize", str(path), "-o", "x.onnx", "--calibration", str(bad)]) == 2
    assert "not an .npz" in _error_line(capsys)
    two = tmp_path / "two.npz"
    np.savez(two, a=np.zeros((2, 1, 8, 8)), b=np.zeros((2, 1, 8, 8)))
    assert main(["optimize", str(path), "-o", "x.onnx", "--calibration", str(two)]) == 2
    assert "the model's inputs are" in _error_line(capsys)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((16, 1, 8, 8), np.float32))
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(5, np.int64))
    args = ["optimize", str(path), "-o", "x.onnx", "--calibration", str(data)]
    assert main([*args, "--labels", str(labels)]) == 2
    assert "labels for 16" in _error_line(capsys)


def test_optimize_writes_graph_table_and_report(digits_onnx, capsys, tmp_path, fast):
    path, split = digits_onnx
    data, labels = tmp_path / "calib.npz", tmp_path / "labels.npy"
    np.savez(data, x=split.train_x[:32].numpy())
    np.save(labels, split.train_y[:32].numpy())
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main(
        [
            "optimize",
            str(path),
            "-o",
            str(out),
            "--calibration",
            str(data),
            "--labels",
            str(labels),
            "--max-accuracy-drop",
            "3",
            "--report",
            str(report),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "int8_data_free" in captured.out and "chosen:" in captured.out
    onnx.checker.check_model(onnx.load(str(out)))
    written = json.loads(report.read_text())["optimize"]
    assert written["budget"]["max_accuracy_drop"] == 3
    assert {c["name"] for c in written["candidates"]} >= {"fp32", "int8_minmax"}
    assert torch.is_tensor(split.train_x)
