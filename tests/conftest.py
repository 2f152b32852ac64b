"""The whole suite's set-up: each pytest-xdist worker's share of the cores, and the order in
which the test files go to the workers.

- Threads: the README's command runs two workers on a 2-core machine. torch's default of a
  thread per core makes two processes side by side wait on each other's threads (the learned
  denoiser's training: 34.5 s on two threads each against 15 s on one, docs/BENCHMARKS.md
  "The suite on a slower machine, and what was cut"), so each worker, and every process it
  starts, gets the cores divided by the workers (OMP_NUM_THREADS, read by torch on import).
- Order: files with more tests first (what xdist's own `--loadscope-reorder` does, so that
  the long files start early), except tests/container/, last: `.ci/run` builds the images
  beside the tests, and those tests wait for the build (tests/container/conftest.py).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest


def _threads_per_worker() -> int | None:
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not workers:
        return None
    return max(1, (os.cpu_count() or 1) // int(workers))


def pytest_configure(config: pytest.Config) -> None:
    threads = _threads_per_worker()
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # the order is made below


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests_in = Counter(item.nodeid.split("::")[0] for item in items)
    first_seen = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.nodeid.split("::")[0], i)

    def order(item: pytest.Item) -> tuple:
        path = item.nodeid.split("::")[0]
        return (path.startswith("tests/container/"), -tests_in[path], first_seen[path])

    items.sort(key=order)
