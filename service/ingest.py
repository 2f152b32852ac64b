"""Upload -> fold -> verify, in an isolated worker process with resource limits.

The server never parses an uploaded model itself. It writes the upload and a ``job.json`` into a
scratch directory inside the store, runs ``service.worker`` on it, and reads back
``result.json``. A worker that crashes (a segfault in onnxruntime on a crafted graph), runs out
of memory or time is reported to the client as a refusal; the server keeps running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import service
from service.errors import ServiceError, ServiceUnavailable, Unprocessable
from service.settings import Settings

logger = logging.getLogger(__name__)

_PROJECT_ROOT = Path(service.__file__).resolve().parent.parent


@dataclass
class IngestResult:
    job_dir: Path
    result: dict[str, Any]

    @property
    def folded_path(self) -> Path:
        return self.job_dir / "folded.onnx"

    @property
    def original_path(self) -> Path:
        return self.job_dir / "original.onnx"


class Refusal(ServiceError):
    """The worker refused the upload; the status is the one it chose."""

    def __init__(self, status: int, message: str, extra: dict[str, Any]) -> None:
        super().__init__(message, extra=extra)
        self.status_code = status


class Ingestor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._slots = asyncio.Semaphore(max(1, settings.worker_concurrency))
        self._waiting = 0

    def _limits(self) -> dict[str, int]:
        s = self.settings
        return {
            "memory_bytes": s.worker_memory_bytes,
            "cpu_s": s.worker_cpu_s,
            # outputs are the folded graph and a copy of the original: bounded by the upload
            "file_bytes": max(4 * s.max_upload_bytes, 256 << 20),
        }

    async def run(self, job_dir: Path, job: dict[str, Any]) -> IngestResult:
        """Process one job in its own worker, waiting for a free slot; raises the refusal."""
        if self._slots.locked() and self._waiting >= self.settings.worker_queue:
            raise ServiceUnavailable(
                f"{self._waiting} uploads are already waiting for a worker; retry later"
            )
        (job_dir / "job.json").write_text(json.dumps(job))
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            returncode = await self._run_worker(job_dir)
        finally:
            self._slots.release()
        return self._read(job_dir, returncode)

    async def _run_worker(self, job_dir: Path) -> int:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")])
        )
        env["CUDA_VISIBLE_DEVICES"] = ""  # verification is certified on the CPU
        env.setdefault("OMP_NUM_THREADS", "1")
        log_path = job_dir / "worker.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service.worker",
                json.dumps(self._limits()),
                str(job_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=job_dir,
                start_new_session=True,
            )
            try:
                await asyncio.wait_for(proc.wait(), self.settings.worker_timeout_s)
            except TimeoutError:
                _kill_group(proc.pid)
                await proc.wait()
                raise Unprocessable(
                    f"processing the upload took longer than {self.settings.worker_timeout_s:g} s"
                    " and was stopped; nothing was deployed"
                ) from None
            except asyncio.CancelledError:  # the server is shutting down
                _kill_group(proc.pid)
                raise
        if proc.returncode != 0:
            logger.warning(
                "ingest worker exited with %s; log tail:\n%s", proc.returncode, _tail(log_path)
            )
        return proc.returncode

    def _read(self, job_dir: Path, returncode: int) -> IngestResult:
        try:
            result = json.loads((job_dir / "result.json").read_text())
        except FileNotFoundError:
            raise Unprocessable(_crash_message(job_dir, returncode)) from None
        status = result.pop("status")
        if status != 200:
            message = result.pop("error")
            raise Refusal(status, message, result)
        return IngestResult(job_dir, result)


def _crash_message(job_dir: Path, returncode: int) -> str:
    log = _tail(job_dir / "worker.log")
    if returncode == -signal.SIGXCPU:
        return "processing the model exceeded the worker's CPU time limit; nothing was deployed"
    if "MemoryError" in log or "bad_alloc" in log:
        return "processing the model exceeded the worker's memory limit; nothing was deployed"
    how = f"exit status {returncode}"
    if returncode < 0:
        try:
            how = f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"signal {-returncode}"
    return (
        f"the worker processing this model crashed ({how}): onnxruntime or torch could not "
        "handle the graph, which is probably malformed; nothing was deployed"
    )


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode(errors="replace")
    except FileNotFoundError:
        return ""
