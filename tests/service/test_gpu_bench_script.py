"""bench/gpu_serving.py, the one script a lent GPU machine runs for issue 16, works before it
gets there: ``--cpu-smoke`` runs every step on a tiny CNN with the CPU provider (real servers on
127.0.0.1, real onnxruntime sessions), a failing step is recorded while the later ones still run,
and the targets are judged from what was measured. Device minutes are too few to find a broken
script on the device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_serving.py"
sys.path.insert(0, str(ROOT / "bench"))

import gpu_serving  # noqa: E402


def run_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "issue16.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    return done, json.loads(out.read_text()) if out.exists() else None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    done, report = run_script(tmp_path_factory.mktemp("smoke"), "--duration", "0.3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return report


def test_gpu_serving_smoke_runs_every_step_without_error(smoke):
    assert set(gpu_serving.STEPS) <= set(smoke)
    errors = {k: smoke[k]["error"] for k in gpu_serving.STEPS if "error" in smoke[k]}
    assert errors == {}
    assert set(smoke["step_s"]) == set(gpu_serving.STEPS)
    assert smoke["targets"] == {
        "judged": False,
        "why": "--cpu-smoke: the targets are for a CUDA device",
    }


def test_gpu_serving_smoke_answers_every_request_in_every_variant(smoke):
    serving = smoke["serving"]
    assert list(serving) == list(gpu_serving.VARIANTS)
    for variant, result in serving.items():
        for run in ("c64", "c1"):
            assert result[run]["requests"] > 0, (variant, run)
            assert result[run]["failures"] == 0, (variant, run)
        buckets = result["batching"]["batch_buckets"]
        assert buckets == ([] if variant.startswith("unbatched") else [1, 2, 4, 8]), variant


def test_gpu_serving_smoke_times_fp16_beside_an_aa_control(smoke):
    fp16 = smoke["fp16"]
    for kind in ("compute", "end_to_end"):
        assert fp16[f"fp32_{kind}_ms"] > 0 and fp16[f"fp32_aa_{kind}_ms"] > 0
        assert fp16[f"aa_{kind}"] == pytest.approx(
            fp16[f"fp32_aa_{kind}_ms"] / fp16[f"fp32_{kind}_ms"], abs=1e-3
        )
    accuracy = fp16["accuracy"]
    assert accuracy["samples"] == 8 and accuracy["rel_l2"] < 1e-2
    # the smoke CNN's fp32 top-1 is one class for all inputs: said, not hidden
    assert accuracy["vacuous"] == (accuracy["reference"]["top1_majority"] >= 0.995)
    assert accuracy["reference_top1_classes"] == accuracy["reference"]["top1_classes"]
    flips = round((1 - accuracy["top1_agreement"]) * accuracy["samples"])
    assert len(accuracy["flipped_margins"]) == flips
    measured = smoke["fp16_accuracy"]["measured_bn"]
    assert measured["samples"] == 8 and 0 <= measured["top1_agreement"] <= 1
    assert "skipped" in smoke["fp16_accuracy"]["trained"]


def test_gpu_serving_smoke_says_why_tensorrt_was_not_used(smoke):
    assert smoke["tensorrt"]["used"] is False
    assert "TensorRT" in smoke["tensorrt"]["why"]


def test_gpu_serving_smoke_runs_a_bucket_three_ways(smoke):
    modes = smoke["io_binding"]
    assert list(modes) == ["off", "on", "cuda_graph"]
    for mode, result in modes.items():
        assert result["run_ms"] > 0
        assert result["bucket"]["buckets"] == [4], mode
    # no CUDA here: the CUDA graph falls back to IO binding and says why
    assert "CUDA" in json.dumps(modes["cuda_graph"]["bucket"])


def test_gpu_serving_records_a_failed_step_and_runs_the_next(tmp_path):
    done, report = run_script(
        tmp_path,
        "--steps",
        "fp16_accuracy,io_binding",
        "--trained-model",
        str(tmp_path / "missing.onnx"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "missing.onnx" in report["fp16_accuracy"]["error"]
    assert set(report["io_binding"]) == {"off", "on", "cuda_graph"}
    assert "serving" not in report and set(report["step_s"]) == {"fp16_accuracy", "io_binding"}


def test_gpu_serving_refuses_an_unknown_step(tmp_path):
    done, report = run_script(tmp_path, "--steps", "serving,warp")
    assert done.returncode == 2 and report is None
    assert "unknown steps ['warp']" in done.stderr


def _served(rps: float, p99: float) -> dict:
    return {"c64": {"throughput_rps": rps}, "c1": {"p99_ms": p99}}


def _agreement(top1: float, classes: int) -> dict:
    return {"top1_agreement": top1, "reference_top1_classes": classes, "vacuous": classes == 1}


def gpu_report(**fp16_accuracy) -> dict:
    return {
        "cpu_smoke": False,
        "serving": {
            "unbatched": _served(100.0, 5.0),
            "buckets": _served(320.0, 4.0),
            "buckets_io_binding": _served(350.0, 6.0),
            "buckets_cuda_graph": {"error": "RuntimeError: capture failed"},
            "unbatched_aa": _served(98.0, 5.1),
        },
        "fp16": {"speedup_compute": 2.1, "aa_compute": 0.99, "accuracy": _agreement(1.0, 1)},
        "fp16_accuracy": fp16_accuracy,
    }


def test_targets_take_the_fastest_batched_variant_and_its_own_p99():
    got = gpu_serving.targets(gpu_report(measured_bn=_agreement(0.996, 40)))
    assert got["c64_best"] == "buckets_io_binding"
    assert got["c64_throughput_vs_unbatched"] == 3.5 and got["c64_met"] is True
    assert got["c64_aa"] == 0.98
    assert got["c1_p99_ms"] == {"unbatched": 5.0, "buckets_io_binding": 6.0}
    assert got["c1_p99_met"] is False


def test_targets_judge_fp16_top1_on_the_trained_network_where_there_is_one():
    got = gpu_serving.targets(
        gpu_report(measured_bn=_agreement(0.97, 40), trained=_agreement(0.998, 23))
    )
    assert got["fp16_top1_basis"] == ["trained"] and got["fp16_top1_met"] is True
    assert got["fp16_speed_met"] is True


def test_targets_never_judge_fp16_top1_on_a_constant_reference():
    vacuous_only = gpu_serving.targets(gpu_report())
    assert vacuous_only["fp16_top1_basis"] == [] and vacuous_only["fp16_top1_met"] is False
    got = gpu_serving.targets(gpu_report(measured_bn=_agreement(0.97, 40)))
    assert got["fp16_top1_basis"] == ["measured_bn"] and got["fp16_top1_met"] is False


def test_targets_name_the_failed_variants_when_no_comparison_is_possible():
    report = gpu_report()
    report["serving"] = {"unbatched": {"error": "TimeoutError: server not ready in 240 s"}}
    got = gpu_serving.targets(report)
    assert got["serving_missing"] == {"unbatched": "TimeoutError: server not ready in 240 s"}
    assert "c64_met" not in got
