"""What changing batch sizes cost onnxruntime's CUDA provider (why dynamic batching on the GPU
needs care): for each provider setting, the first run at each new batch size, then runs whose
batch size changes every time, from one thread and from a pool of 8 (as the service's executor
does), against runs at one fixed size. Run on a GPU machine:

    python bench/gpu_batch_shapes.py /tmp/bnfold-serving/resnet18.folded.onnx --sizes 1-8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

CONFIGS = {
    "exhaustive": {"cudnn_conv_algo_search": "EXHAUSTIVE"},
    "heuristic": {"cudnn_conv_algo_search": "HEURISTIC"},
    "default": {"cudnn_conv_algo_search": "DEFAULT"},
    "heuristic_no_max_workspace": {
        "cudnn_conv_algo_search": "HEURISTIC",
        "cudnn_conv_use_max_workspace": "0",
    },
}


def ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {
        "p50": round(statistics.median(values) * 1e3, 3),
        "p90": round(values[int(len(values) * 0.9)] * 1e3, 3),
        "max": round(values[-1] * 1e3, 3),
    }


def measure(path: str, options: dict, sizes: list[int], runs: int, mem_pattern: bool) -> dict:
    so = ort.SessionOptions()
    so.enable_mem_pattern = mem_pattern
    session = ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", options)])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    name = session.get_inputs()[0].name
    shape = [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape]
    rng = np.random.default_rng(0)
    xs = {b: rng.standard_normal([b, *shape[1:]]).astype(np.float32) for b in sizes}

    def run(b: int) -> float:
        t0 = time.perf_counter()
        session.run(None, {name: xs[b]})
        return time.perf_counter() - t0

    first = {b: round(run(b) * 1e3, 1) for b in sizes}
    second = {b: round(run(b) * 1e3, 3) for b in sizes}
    order = [sizes[i % len(sizes)] for i in rng.permutation(runs)]
    one_thread = [run(b) for b in order]
    with ThreadPoolExecutor(8) as pool:  # one at a time, on whichever thread: the batcher
        pooled = [pool.submit(run, b).result() for b in order]
    fixed = [run(sizes[-1]) for _ in range(runs // 2)]
    return {
        "first_run_ms": first,
        "second_run_ms": second,
        "changing_sizes_one_thread_ms": ms(one_thread),
        "changing_sizes_pool_of_8_ms": ms(pooled),
        f"fixed_size_{sizes[-1]}_ms": ms(fixed),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--sizes", default="1-8", help="batch sizes, first-last")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args()
    lo, hi = (int(v) for v in args.sizes.split("-"))
    sizes = list(range(lo, hi + 1))
    for config in args.configs.split(","):
        for mem_pattern in (True, False):
            result = measure(args.model, CONFIGS[config], sizes, args.runs, mem_pattern)
            print(json.dumps({"config": config, "mem_pattern": mem_pattern, **result}), flush=True)


if __name__ == "__main__":
    main()
