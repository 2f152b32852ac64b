"""Drift on real data: the digits CNN (models/digits.py) and shifted copies of its test split.

Detection: windows of 32 held-out digits, clean and shifted (contrast, brightness, inversion,
blur, noise, each at three strengths), scored by ``bnfold.drift_score`` (the numbers the
service's monitor reports for the same window); ROC AUC clean vs shifted, per shift and strength.

Repair: the service's path (``recalibrate_onnx`` on the exported original, ``fold_onnx``,
onnxruntime): recalibrate on 32-256 unlabeled *shifted training* digits, measure accuracy on
the shifted *test* digits; and on clean training digits, to see what recalibrating costs.
Each twice: re-estimation alone, and with ``align_input`` (the service's default: a fitted
per-channel map of the input, or a Wiener or learned filter for white noise, in front; kept
when it moves the statistics least).

Serving cost (``--serving``): a real server, monitoring off vs the default sampling rate,
interleaved runs of bench/load.py-style closed-loop clients; see ``serving_ab``.

    python bench/drift.py --out bench/results/drift.json
    python bench/drift.py --serving --out bench/results/drift_serving.json
    python bench/drift.py --limits --out bench/results/drift_limits.json   # the missed cells
    python bench/drift.py --repair --out bench/results/drift_repair.json   # repair table only
    python bench/drift.py --denoiser-latency --out bench/results/denoiser_latency.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

WINDOW = 32
N_WINDOWS = 300
REPAIR_SIZES = (32, 64, 128, 256)
REPAIR_SEEDS = 3


def _blur(x, sigma: float):
    import torch

    radius = 2
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    pad = torch.nn.functional.pad(x, (radius,) * 4, mode="replicate")
    out = torch.nn.functional.conv2d(pad, k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1))


def _noise(x, std: float):
    import torch

    g = torch.Generator().manual_seed(1234)
    return x + std * torch.randn(x.shape, generator=g)


def _contrast(x, f: float):
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return m + f * (x - m)


# name -> (function, strengths mild / moderate / severe)
SHIFTS = {
    "contrast": (_contrast, (0.75, 0.5, 0.25)),
    "brightness": (lambda x, b: (x + b).clamp(0, 1), (0.1, 0.2, 0.4)),
    "inversion": (lambda x, a: (1 - a) * x + a * (1 - x), (0.1, 0.25, 1.0)),
    "blur": (_blur, (0.5, 0.8, 1.2)),
    "noise": (_noise, (0.05, 0.1, 0.2)),
}
LEVELS = ("mild", "moderate", "severe")


def _windows(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n, WINDOW, replace=False) for _ in range(count)]


def _scores(model, x, windows) -> tuple[np.ndarray, np.ndarray]:
    """Per window: the model score (median over sites), and per-site scores."""
    import bnfold

    model_scores, site_scores = [], []
    for index in windows:
        result = bnfold.drift_score(model, [x[index]])
        model_scores.append(result.score)
        site_scores.append([s.score for s in result.sites])
    return np.array(model_scores), np.array(site_scores)


def detection() -> dict:
    from sklearn.metrics import roc_auc_score

    from bnfold.drift import DEFAULT_THRESHOLD
    from models import digits

    model, split = digits.build(), digits.load_split()
    x = split.test_x
    windows = _windows(len(x), N_WINDOWS, seed=0)
    clean, clean_sites = _scores(model, x, windows)
    out = {
        "window": WINDOW,
        "windows": N_WINDOWS,
        "threshold": DEFAULT_THRESHOLD,
        "clean": _summary(clean),
        "clean_false_positive_rate": float(np.mean(clean > DEFAULT_THRESHOLD)),
        "shifts": [],
    }
    labels = np.r_[np.zeros(len(clean)), np.ones(len(clean))]
    for shift, (fn, strengths) in SHIFTS.items():
        for level, strength in zip(LEVELS, strengths, strict=True):
            xs = fn(x, strength)
            scores, sites = _scores(model, xs, windows)
            row = {
                "shift": shift,
                "level": level,
                "strength": strength,
                "auc": float(roc_auc_score(labels, np.r_[clean, scores])),
                "auc_mean_over_sites": float(
                    roc_auc_score(labels, np.r_[clean_sites.mean(1), sites.mean(1)])
                ),
                "auc_per_site": [
                    float(roc_auc_score(labels, np.r_[clean_sites[:, i], sites[:, i]]))
                    for i in range(sites.shape[1])
                ],
                "detected_at_threshold": float(np.mean(scores > DEFAULT_THRESHOLD)),
                "score": _summary(scores),
            }
            out["shifts"].append(row)
            print(json.dumps(row), flush=True)
    return out


def _summary(v: np.ndarray) -> dict:
    return {
        "median": float(np.median(v)),
        "p99": float(np.quantile(v, 0.99)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def repair() -> dict:
    import onnxruntime as ort
    import torch

    import bnfold
    from bnfold.drift import recalibrate_onnx
    from models import digits

    model, split = digits.build(), digits.load_split()
    original = bnfold.export_onnx(model, (split.test_x[:2],), dynamic_batch=True)

    def accuracy(graph, x, y) -> float:
        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        logits = session.run(None, {"x": x.numpy()})[0]
        return float((logits.argmax(1) == y.numpy()).mean())

    applied: list[bool] = []
    denoised: list[bool] = []

    def recalibrated(x_cal: torch.Tensor, align: bool = False) -> object:
        batches = [{"x": x_cal[i : i + 32].numpy()} for i in range(0, len(x_cal), 32)]
        result = recalibrate_onnx(original, batches, align_input=align)
        if align:
            applied.append(bool(result.input_alignment["applied"]))
            denoised.append(bool(result.input_denoising["applied"]))
        return bnfold.fold_onnx(result.model).model

    def calibration(x_train, n: int, seed: int) -> torch.Tensor:
        order = np.random.default_rng(100 + seed).permutation(len(x_train))[:n]
        return x_train[order]

    clean_accuracy = accuracy(original, split.test_x, split.test_y)
    out = {"clean_accuracy": clean_accuracy, "seeds": REPAIR_SEEDS, "clean_recalibration": {}}
    for n in REPAIR_SIZES:
        accs = [
            accuracy(recalibrated(calibration(split.train_x, n, s)), split.test_x, split.test_y)
            for s in range(REPAIR_SEEDS)
        ]
        out["clean_recalibration"][n] = {"mean": float(np.mean(accs)), "min": float(min(accs))}
        applied.clear()
        denoised.clear()
        accs = [
            accuracy(
                recalibrated(calibration(split.train_x, n, s), align=True),
                split.test_x,
                split.test_y,
            )
            for s in range(REPAIR_SEEDS)
        ]
        out["clean_recalibration"][f"{n} aligned"] = {
            "mean": float(np.mean(accs)),
            "min": float(min(accs)),
            "applied": sum(applied),
            "denoised": sum(denoised),
        }
    print(json.dumps(out), flush=True)
    out["shifts"] = []
    for shift, (fn, strengths) in SHIFTS.items():
        for level, strength in zip(LEVELS, strengths, strict=True):
            xs_test, xs_train = fn(split.test_x, strength), fn(split.train_x, strength)
            shifted = accuracy(original, xs_test, split.test_y)
            row = {
                "shift": shift,
                "level": level,
                "strength": strength,
                "accuracy": shifted,
                "cost": clean_accuracy - shifted,
                "recalibrated": {},
            }
            for n in REPAIR_SIZES:
                accs = [
                    accuracy(recalibrated(calibration(xs_train, n, s)), xs_test, split.test_y)
                    for s in range(REPAIR_SEEDS)
                ]
                mean = float(np.mean(accs))
                recovered = (mean - shifted) / row["cost"] if row["cost"] > 0 else None
                row["recalibrated"][n] = {"accuracy": mean, "recovered": recovered}
                applied.clear()
                denoised.clear()
                accs = [
                    accuracy(
                        recalibrated(calibration(xs_train, n, s), align=True),
                        xs_test,
                        split.test_y,
                    )
                    for s in range(REPAIR_SEEDS)
                ]
                mean = float(np.mean(accs))
                recovered = (mean - shifted) / row["cost"] if row["cost"] > 0 else None
                row.setdefault("aligned", {})[n] = {
                    "accuracy": mean,
                    "recovered": recovered,
                    "applied": sum(applied),
                    "denoised": sum(denoised),
                }
            out["shifts"].append(row)
            print(json.dumps(row), flush=True)
    return out


# the cells the repair misses (severe noise, full inversion), and two it repairs, for contrast
LIMIT_CELLS = (("noise", 0.2), ("inversion", 1.0), ("blur", 1.2), ("contrast", 0.25))
LIMIT_SIZES = (32, 256)


def _entropy_adapted(model, x_cal, epochs: int, lr: float = 1e-3):
    """TENT (Wang et al. 2021, "Tent: fully test-time adaptation by entropy minimization"):
    BN's affine parameters trained to minimize the prediction entropy of the unlabeled shifted
    batches, normalizing by batch statistics; then the statistics re-estimated as the service
    does. Every other weight stays."""
    import copy

    import torch

    import bnfold

    adapted = copy.deepcopy(model).train()
    bns = [m for m in adapted.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for p in adapted.parameters():
        p.requires_grad_(False)
    params = [p for m in bns for p in (m.weight, m.bias)]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr)
    batches = [x_cal[i : i + 32] for i in range(0, len(x_cal), 32)]
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in batches:
                p = adapted(batch).softmax(1)
                entropy = -(p * p.clamp_min(1e-12).log()).sum(1).mean()
                optimizer.zero_grad()
                entropy.backward()
                optimizer.step()
    return bnfold.recalibrate(adapted.eval(), batches)


def _trained_on_shift(fn, strength: float, seed: int, epochs: int = 40):
    """The digits CNN trained from scratch on shifted training digits (noise drawn afresh per
    batch): what the architecture can reach on the shift when it may learn from labels, an
    upper bound for any label-free repair."""
    import torch

    from models import digits

    split = digits.load_split()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = digits._architecture(digits.NAME)()
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        with torch.enable_grad():
            for _ in range(epochs):
                order = torch.randperm(len(split.train_y), generator=generator)
                for start in range(0, len(order), 64):
                    index = order[start : start + 64]
                    x = split.train_x[index]
                    if fn is _noise:
                        x = x + strength * torch.randn(x.shape, generator=generator)
                    else:
                        x = fn(x, strength)
                    loss = torch.nn.functional.cross_entropy(model(x), split.train_y[index])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    return model.eval()


def limits() -> dict:
    """What label-free repair can reach on the cells recalibration misses: AdaBN as the service
    does it, AdaBN on the first k BNs only, source statistics mixed in as a prior (Schneider et
    al. 2020, prior strength N samples), TENT; and the same CNN trained on the shift."""
    import copy

    import torch

    import bnfold
    from models import digits

    model, split = digits.build(), digits.load_split()
    y = split.test_y

    def accuracy(m, x) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    def bns(m):
        return [b for b in m.modules() if isinstance(b, torch.nn.modules.batchnorm._BatchNorm)]

    def with_statistics(source, weights: list[float]):
        """`model` with each BN's statistics moved a fraction `weights[i]` towards `source`'s."""
        out = copy.deepcopy(model)
        for b, s, w in zip(bns(out), bns(source), weights, strict=True):
            b.running_mean.mul_(1 - w).add_(w * s.running_mean)
            b.running_var.mul_(1 - w).add_(w * s.running_var)
        return out

    clean = accuracy(model, split.test_x)
    rows = []
    for shift, strength in LIMIT_CELLS:
        fn = SHIFTS[shift][0]
        xs_test, xs_train = fn(split.test_x, strength), fn(split.train_x, strength)
        shifted = accuracy(model, xs_test)
        row = {"shift": shift, "strength": strength, "clean": clean, "shifted": shifted}
        for n in LIMIT_SIZES:
            results: dict[str, list[float]] = {}
            for seed in range(REPAIR_SEEDS):
                order = np.random.default_rng(100 + seed).permutation(len(xs_train))[:n]
                x_cal = xs_train[order]
                full = bnfold.recalibrate(model, [x_cal[i : i + 32] for i in range(0, n, 32)])
                k = len(bns(model))
                candidates = {"adabn": full}
                for first in range(1, k):
                    candidates[f"adabn_first_{first}"] = with_statistics(
                        full, [1.0] * first + [0.0] * (k - first)
                    )
                for prior in (8, 32):
                    candidates[f"adabn_prior_{prior}"] = with_statistics(
                        full, [n / (n + prior)] * k
                    )
                candidates["tent_50_epochs"] = _entropy_adapted(model, x_cal, epochs=50)
                for name, m in candidates.items():
                    results.setdefault(name, []).append(accuracy(m, xs_test))
            row[f"n={n}"] = {name: float(np.mean(v)) for name, v in results.items()}
        row["trained_on_shift"] = [
            accuracy(_trained_on_shift(fn, strength, seed), xs_test) for seed in range(2)
        ]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"cells": rows}


def serving_ab(
    rounds: int,
    seconds: float,
    concurrency: int = 8,
    aa: bool = False,
    extra_env: dict[str, str] | None = None,
) -> dict:
    """Monitoring off (BNFOLD_DRIFT_SAMPLE=0) against the default rate, on the digits CNN: two
    servers up at once, loaded in turn (ABBA order, so a slow drift of the machine cancels),
    closed-loop clients with one-row binary requests. ``aa``: both arms off (the A/A
    control: what the method calls a difference when there is none)."""
    import asyncio
    import tempfile

    import torch
    from load import run_load, v2_request

    import bnfold
    from models import digits
    from service.settings import Settings
    from tests.service.support import Server, upload

    split = digits.load_split()
    graph = bnfold.export_onnx(digits.build(), (split.test_x[:2],), dynamic_batch=True)
    default_rate = Settings().drift_sample
    work = Path(tempfile.mkdtemp(prefix="bnfold-drift-ab-"))
    env = {"BNFOLD_API_TOKEN": "bench-token-0123456789", "BNFOLD_DEPLOY_DEFAULTS": "0"}
    env.update(extra_env or {})
    arms = {
        "off": Server(work / "off", {**env, "BNFOLD_DRIFT_SAMPLE": "0"}),
        "default": Server(
            work / "default", {**env, "BNFOLD_DRIFT_SAMPLE": "0" if aa else str(default_rate)}
        ),
    }
    x = split.test_x[:1].numpy()
    results: dict[str, list] = {k: [] for k in arms}
    try:
        for server in arms.values():
            server.start()
            with server.client("bench-token-0123456789") as api:
                r = upload(api, "digits", graph.SerializeToString(), input_shape="[2,1,8,8]")
                r.raise_for_status()
        request = v2_request("digits", "x", x, "binary")
        for server in arms.values():  # warm-up
            asyncio.run(run_load(server.url, *request, concurrency, 2.0, 10**9))
        order = [
            k
            for i in range(rounds)
            for k in (("off", "default") if i % 2 == 0 else ("default", "off"))
        ]
        for arm in order:
            result = asyncio.run(run_load(arms[arm].url, *request, concurrency, seconds, 10**9))
            results[arm].append(result.to_dict())
            print(arm, json.dumps(result.to_dict()), flush=True)
        with arms["default"].client("bench-token-0123456789") as api:
            drift = api.get("/v1/models/digits/drift").json()
            metrics = api.get("/metrics").text
    finally:
        for server in arms.values():
            server.stop()
    sampled = [ln for ln in metrics.splitlines() if ln.startswith("bnfold_drift_samples")]

    def median(arm: str, key: str) -> float:
        return float(np.median([r[key] for r in results[arm]]))

    summary = {
        "model": "digits_cnn",
        "concurrency": concurrency,
        "seconds_per_run": seconds,
        "rounds": rounds,
        "default_rate": 0.0 if aa else default_rate,
        "aa_control": aa,
        "server_env": extra_env or {},
        "p50_ms": {a: median(a, "p50_ms") for a in arms},
        "throughput_rps": {a: median(a, "throughput_rps") for a in arms},
        "runs": results,
        "sampled_metrics": sampled,
        "drift_after": drift,
    }
    summary["p50_change"] = summary["p50_ms"]["default"] / summary["p50_ms"]["off"] - 1
    summary["throughput_change"] = (
        summary["throughput_rps"]["default"] / summary["throughput_rps"]["off"] - 1
    )
    torch.set_num_threads(1)
    return summary


def denoiser_latency(rounds: int = 200) -> dict:
    """What the learned denoiser adds to serving: the digits CNN recalibrated on 256 severely
    noisy training digits, re-estimation alone and with ``align_input`` (the learned filter
    kept), both folded, timed interleaved (``bnfold.optimizer.timing``: serving options,
    spinning off, both creation orders) with an A/A control, batch 1 and 64, 2 threads."""
    import bnfold
    from bnfold.drift import recalibrate_onnx
    from bnfold.optimizer.timing import time_interleaved
    from models import digits

    model, split = digits.build(), digits.load_split()
    original = bnfold.export_onnx(model, (split.test_x[:2],), dynamic_batch=True)
    noisy = _noise(split.train_x, 0.2)[:256].numpy()
    batches = [{"x": noisy[i : i + 32]} for i in range(0, 256, 32)]
    plain = bnfold.fold_onnx(recalibrate_onnx(original, batches).model).model
    repaired = recalibrate_onnx(original, batches, align_input=True)
    out = {"input_denoising": repaired.input_denoising}
    denoised = bnfold.fold_onnx(repaired.model).model
    for batch in (1, 64):
        feeds = {"x": noisy[:batch]}
        timed = time_interleaved(
            {"plain": plain, "plain again": plain, "denoised": denoised},
            feeds,
            reference="plain",
            threads=2,
            rounds=rounds,
        )
        out[batch] = timed
        print(batch, json.dumps(timed), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serving", action="store_true", help="the serving-cost A/B only")
    parser.add_argument(
        "--limits", action="store_true", help="other label-free repairs of the missed cells only"
    )
    parser.add_argument(
        "--repair", action="store_true", help="the repair table only (plain and input-aligned)"
    )
    parser.add_argument(
        "--denoiser-latency", action="store_true", help="the learned filter's serving cost only"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--aa", action="store_true", help="with --serving: both arms off")
    parser.add_argument("--env", action="append", default=[], help="BNFOLD_X=V for both servers")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.serving:
        extra = dict(e.split("=", 1) for e in args.env)
        result = {"serving": serving_ab(args.rounds, args.seconds, aa=args.aa, extra_env=extra)}
    elif args.limits:
        result = {"limits": limits()}
    elif args.repair:
        result = {"repair": repair()}
    elif args.denoiser_latency:
        result = {"denoiser_latency": denoiser_latency()}
    else:
        result = {"detection": detection(), "repair": repair()}
    result["seconds"] = time.perf_counter() - t0
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
