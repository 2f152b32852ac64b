"""Fixtures of the container tests: podman, the two images that `.ci/image` builds, and
containers run the way ../shared/reference/containers.md says they run on these machines
(runc, host network, the server on 127.0.0.1 at a free port).

In CI (CI=true) a missing podman or image fails the tests; elsewhere they are skipped, with
the command that builds the images as the reason. Where `.ci/run` builds the images beside the
tests, BNFOLD_IMAGE_BUILD names its status file ("building LOG", then "exit STATUS LOG"): the
fixtures wait for the build to end before they look for podman and the images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.service.support import ROOT, free_port

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
FULL = f"bnfold:{VERSION}"
SLIM = f"bnfold:{VERSION}-slim"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# the longest a build beside the tests has taken on these machines is 14 minutes
BUILD_WAIT_S = 40 * 60


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the container tests must run)")
    pytest.skip(reason)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.returncode}\n{result.stderr}")
    return result


def wait_for_image_build(status_file: str | None, timeout: float = BUILD_WAIT_S) -> None:
    """Return once the image build that writes `status_file` has ended well; fail the tests
    with the end of its log if it failed, or if it has not ended after `timeout` seconds."""
    if not status_file:
        return
    start = time.monotonic()
    while True:
        try:
            words = Path(status_file).read_text().split()
        except FileNotFoundError:
            return
        if len(words) == 3 and words[0] == "exit":
            if words[1] != "0":
                log = Path(words[2])
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                pytest.fail(f"the image build (.ci/image) failed with exit {words[1]}:\n{tail}")
            return
        if time.monotonic() - start > timeout:
            pytest.fail(f"the image build (.ci/image) has not ended after {timeout:.0f} s")
        time.sleep(2)


@pytest.fixture(scope="session")
def engine() -> None:
    """podman, set up for this machine by the containers.conf that .ci/image writes, once a
    build beside the tests has ended."""
    wait_for_image_build(os.environ.get("BNFOLD_IMAGE_BUILD"))
    if shutil.which("podman") is None:
        _missing("podman is not installed: `bash .ci/image` installs it and builds the images")
    if "CONTAINERS_CONF" not in os.environ:
        conf = subprocess.run(
            ["bash", str(ROOT / ".ci/image"), "conf"], capture_output=True, text=True, check=True
        )
        os.environ["CONTAINERS_CONF"] = conf.stdout.strip()


def _image(tag: str) -> dict:
    found = podman("image", "inspect", tag, check=False)
    if found.returncode != 0:
        _missing(f"image {tag} is missing: `bash .ci/image` builds it")
    return json.loads(found.stdout)[0]


@pytest.fixture(scope="session")
def full_image(engine) -> dict:
    return _image(FULL)


@pytest.fixture(scope="session")
def slim_image(engine) -> dict:
    return _image(SLIM)


@dataclass
class Container:
    """One `podman run -d` of an image, on the host network, read-only root, /tmp a tmpfs and
    /store a named volume."""

    image: str
    volume: str
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    name: str = field(default_factory=lambda: f"bnfold-test-{uuid.uuid4().hex[:8]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Container:
        env = {
            "BNFOLD_HOST": "127.0.0.1",
            "BNFOLD_PORT": str(self.port),
            "BNFOLD_GRPC_PORT": str(self.grpc_port),
            **self.env,
        }
        podman(
            "run",
            "-d",
            "--name",
            self.name,
            "--pull=never",
            "--network=host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-v",
            f"{self.volume}:/store",
            *[f"-e{k}={v}" for k, v in env.items()],
            *self.args,
            self.image,
        )
        return self

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait_healthy(self, timeout: float = 180) -> float:
        """Run the image's HEALTHCHECK until it passes (no systemd here to run its timer)."""
        start = time.monotonic()
        while podman("healthcheck", "run", self.name, check=False).returncode != 0:
            assert self.state()["Running"], f"the container exited:\n{self.logs()}"
            assert time.monotonic() - start < timeout, f"not healthy:\n{self.logs()}"
            time.sleep(0.3)
        return time.monotonic() - start

    def stop(self, timeout: int = 10) -> int:
        """`podman stop` (SIGTERM, SIGKILL after `timeout`): the exit code."""
        podman("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        return self.state()["ExitCode"]

    def remove(self) -> None:
        podman("rm", "-f", self.name, check=False)

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)


@pytest.fixture
def volume(engine) -> Iterator[str]:
    name = f"bnfold-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


@pytest.fixture
def run_container(engine) -> Iterator:
    """Start containers; every one is removed at the end of the test."""
    started: list[Container] = []

    def run(image: str, volume: str, **kwargs) -> Container:
        container = Container(image, volume, **kwargs)
        started.append(container)
        return container.start()

    yield run
    for container in started:
        container.remove()
