"""bnfold optimize: bad input is one line and exit 2; a run writes the graph and the report."""

import json

import numpy as np
import onnx
import pytest
import torch

from bnfold.cli import main as _main
from tests.array_bytes import npz_bytes, zip_bytes


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
    assert "bad.npz: the data is not a valid .npz file: File is not a zip file" in (
        _error_line(capsys)
    )
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


def _bad_files(tmp_path):
    """(flag, file, message) for files that are not calibration inputs or labels."""
    x = np.zeros((16, 1, 8, 8), np.float32)
    files = {
        "readme.npz": lambda p: p.write_bytes(zip_bytes(**{"readme.txt": b"hello"})),
        "obj.npz": lambda p: np.savez(p, x=np.array([{"a": 1}], dtype=object)),
        "zip.npy": lambda p: p.write_bytes(npz_bytes(x=x)),
        "str.npz": lambda p: np.savez(p, x=np.array(["a", "b"])),
        "scalar.npz": lambda p: np.savez(p, x=np.float32(1)),
        "neg.npy": lambda p: np.save(p, -np.ones(16, np.int64)),
        "float.npy": lambda p: np.save(p, np.zeros(16)),
        "two.npz": lambda p: np.savez(p, a=np.arange(16), b=np.arange(16)),
        "junk.safetensors": lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
    }
    for name, write in files.items():
        write(tmp_path / name)
    np.savez(tmp_path / "good.npz", x=x)
    return [
        ("--calibration", "readme.npz", "the .npz entries ['readme.txt'] are not .npy arrays"),
        ("--calibration", "obj.npz", "Object arrays cannot be loaded when allow_pickle=False"),
        ("--calibration", "zip.npy", "is named .npy but is a zip archive"),
        ("--calibration", "str.npz", "holds a <U1 array; inputs are numbers"),
        ("--calibration", "scalar.npz", "arrays must share a non-zero first dimension"),
        ("--calibration", "junk.safetensors", "not a valid .safetensors file"),
        ("--labels", "neg.npy", "neg.npy: must be class indices >= 0, got values from -1"),
        ("--labels", "float.npy", "must be a 1-D array of class indices, got float64"),
        ("--labels", "two.npz", "holds ['a', 'b']; expected one array of labels"),
    ]


def test_optimize_refuses_bad_calibration_and_label_files_in_one_line(
    digits_onnx, capsys, tmp_path
):
    path, _ = digits_onnx
    for flag, name, message in _bad_files(tmp_path):
        args = ["optimize", str(path), "-o", str(tmp_path / "out.onnx")]
        if flag == "--labels":
            args += ["--calibration", str(tmp_path / "good.npz")]
        assert main([*args, flag, str(tmp_path / name)]) == 2, name
        line = _error_line(capsys)
        assert f"{flag} {tmp_path / name}" in line and message in line, (name, line)
        assert not (tmp_path / "out.onnx").exists()


def test_optimize_reads_an_npy_and_labels_inside_the_calibration_file(
    digits_onnx, capsys, tmp_path
):
    """Read, the arrays reach the checks after reading: the count of the .npy's samples, the
    ``labels`` array of an .npz (as the service reads it), and not both label sources."""
    path, _ = digits_onnx
    args = ["optimize", str(path), "-o", str(tmp_path / "out.onnx")]
    np.save(tmp_path / "x.npy", np.zeros((16, 1, 8, 8), np.float32))
    np.save(tmp_path / "labels.npy", np.zeros(5, np.int64))
    assert (
        main(
            [
                *args,
                "--calibration",
                str(tmp_path / "x.npy"),
                "--labels",
                str(tmp_path / "labels.npy"),
            ]
        )
        == 2
    )
    assert "5 labels for 16 calibration samples" in _error_line(capsys)
    np.savez(
        tmp_path / "xy.npz", x=np.zeros((16, 1, 8, 8), np.float32), labels=np.zeros(3, np.int64)
    )
    assert main([*args, "--calibration", str(tmp_path / "xy.npz")]) == 2
    assert "'labels' in --calibration: 3 labels for 16 calibration samples" in _error_line(capsys)
    assert (
        main(
            [
                *args,
                "--calibration",
                str(tmp_path / "xy.npz"),
                "--labels",
                str(tmp_path / "labels.npy"),
            ]
        )
        == 2
    )
    assert "holds 'labels' too: give them once" in _error_line(capsys)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 3, 5, 5), np.float32), "has shape 4x3x5x5; the graph takes ?x1x?x?"),
        (np.full((4, 1, 8, 8), np.nan, np.float32), "holds 256 NaN or infinite value(s)"),
        (np.zeros((4, 1, 8, 8), np.uint8), "is uint8; the graph takes float32"),
    ],
)
def test_optimize_refuses_calibration_the_graph_cannot_take(
    digits_onnx, capsys, tmp_path, array, message
):
    """Checked before any work, naming the input: not onnxruntime's message or an assertion."""
    path, _ = digits_onnx
    data = tmp_path / "calib.npz"
    np.savez(data, x=array)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(path), "-o", str(out), "--calibration", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress lines, then the one error
    assert [e.startswith("bnfold: error: ") for e in err].count(True) == 1, err
    assert "Traceback" not in "\n".join(err)
    line = err[-1]
    assert message in line and "'x'" in line, line
    assert not out.exists()


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_optimize_refuses_an_output_it_cannot_write_before_running(
    digits_onnx, capsys, tmp_path, flag
):
    path, _ = digits_onnx
    paths = {"-o": str(tmp_path / "out.onnx"), "--report": str(tmp_path / "r.json")}
    paths[flag] = str(tmp_path / "missing" / "file")
    args = ["optimize", str(path), "-o", paths["-o"], "--report", paths["--report"]]
    assert main(args) == 2
    assert f"{flag} {paths[flag]}: directory {tmp_path / 'missing'} does not exist" in (
        _error_line(capsys)
    )
    paths[flag] = str(tmp_path)
    assert main(["optimize", str(path), "-o", paths["-o"], "--report", paths["--report"]]) == 2
    assert "is a directory" in _error_line(capsys)


def test_fold_refuses_an_output_it_cannot_write(digits_onnx, capsys, tmp_path):
    path, _ = digits_onnx
    assert main(["fold", str(path), "-o", str(tmp_path / "no" / "f.onnx")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_optimize_library_names_the_bad_calibration_set(digits_onnx):
    import bnfold

    path, split = digits_onnx
    good = split.train_x[:8].numpy()
    bad = good.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"calibration set 1: input 'x' holds 1 NaN or infinite"):
        bnfold.optimize(onnx.load(str(path)), calibration=[good, bad])


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


def test_optimize_names_inputs_a_module_cannot_take():
    import bnfold
    from models import digits

    with pytest.raises(ValueError, match=r"does not run on the example inputs \(4x3x5x5\)"):
        bnfold.optimize(digits.build(), calibration=[np.zeros((4, 3, 5, 5), np.float32)])


def test_optimize_names_example_inputs_that_are_not_numbers():
    import bnfold
    from models import digits

    with pytest.raises(ValueError, match=r"example input 0 is a <U1 array, not numbers"):
        bnfold.optimize(digits.build(), np.array(["a", "b"]))


@pytest.mark.parametrize(
    "labels, says",
    [
        (
            np.full(8, 10),
            r"labels must be class indices 0\.\.9 \(the model scores 10\), got "
            r"values from 10 to 10",
        ),
        (np.full(8, -1), r"class indices 0\.\.9 \(the model scores 10\), got values from -1"),
        (np.zeros(8), r"labels must be a 1-D array of class indices, got float64 \(8,\)"),
    ],
)
def test_optimize_library_refuses_labels_that_are_not_class_indices(digits_onnx, labels, says):
    """Before any candidate is built: -1 or 10 would count as a wrong answer of every graph."""
    import bnfold

    path, split = digits_onnx
    with pytest.raises(ValueError, match=says):
        bnfold.optimize(
            onnx.load(str(path)), calibration=[split.train_x[:8].numpy()], labels=labels
        )


def test_optimize_prints_why_top1_says_little(capsys, tmp_path, fast):
    from bnfold.onnx.export import export_onnx
    from models import digits

    model = digits.build()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias[7] = 1e3  # class 7 on every input
    path, out = tmp_path / "sevens.onnx", tmp_path / "out.onnx"
    export_onnx(model, (digits.load_split().train_x[:4],), path=path)
    shape = ["--input-shape", "x=4,1,8,8"]
    code = main(["optimize", str(path), "-o", str(out), "--target", "cuda", *shape])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    notes = [line for line in captured.out.splitlines() if line.startswith("note: ")]
    assert any("one class on 100%" in n and "relative L2 <= 0.05" in n for n in notes), notes
