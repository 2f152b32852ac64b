"""``python -m service.worker LIMITS_JSON JOB_DIR``: run one job and write its result."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.worker.fold_job import run_fold_job
from service.worker.optimize_job import run_optimize_job
from service.worker.recalibrate_job import run_recalibrate_job
from service.worker.sandbox import Refused, first_lines, set_limits

# one entry a job; "fold" takes every upload kind (onnx, zoo, safetensors)
JOBS: dict[str, Callable[[Path, dict[str, Any]], dict[str, Any]]] = {
    "fold": run_fold_job,
    "optimize": run_optimize_job,  # the fold job, then the fastest candidate within a budget
    "recalibrate": run_recalibrate_job,  # new BN statistics for a deployed model
}


def run_job(job_dir: Path) -> None:
    try:
        job = json.loads((job_dir / "job.json").read_text())
        handler = JOBS.get(job.get("job", "fold"))
        if handler is None:
            raise Refused(400, f"unknown job {job.get('job')!r}; known: {sorted(JOBS)}")
        result = handler(job_dir, job)
    except Refused as exc:
        result = {"status": exc.status, "error": str(exc), **exc.extra}
    except MemoryError:
        result = {"status": 413, "error": "processing the model ran out of the worker's memory"}
    except Exception as exc:
        traceback.print_exc()  # to the worker's log, which the server keeps to itself
        result = {"status": 422, "error": f"the model could not be processed: {first_lines(exc)}"}
    write_result(job_dir, result)


def write_result(job_dir: Path, result: dict[str, Any]) -> None:
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job_dir / "result.json")


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the server dies, so a killed server leaves no orphan worker."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except OSError:
        pass


def main(argv: list[str]) -> int:
    set_limits(json.loads(argv[0]))
    _die_with_parent()
    run_job(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
