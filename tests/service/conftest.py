"""Fixtures for the service tests: real uvicorn servers on 127.0.0.1 (see support.py).

``server`` is shared by the tests that do not restart or kill it: a fresh store, so the zoo
defaults are deployed at start; tests that restart or kill a server start their own with
``start_server``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.support import (
    TEST_ENV,
    TOKEN,
    Server,
    all_datatypes_model,
    conv_bn_model,
    seed_store,
)


@pytest.fixture
def start_server(tmp_path):
    started: list[Server] = []

    def start(
        store: Path | None = None, wait: bool = True, defaults: bool = False, **env: str
    ) -> Server:
        settings = {**TEST_ENV, "BNFOLD_API_TOKEN": TOKEN}
        settings["BNFOLD_DEPLOY_DEFAULTS"] = "1" if defaults else "0"
        settings.update(env)
        server = Server(store or tmp_path / "store", settings)
        started.append(server)
        return server.start(wait=wait)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One server for the whole session, started on a fresh store (defaults deployed), which
    also holds ``identity_all``, a model with one input of every v2 datatype, and
    ``identity_typed``, the same without FP16."""
    root = tmp_path_factory.mktemp("shared")
    seed_store(root / "store", "identity_all", all_datatypes_model())
    # gRPC's typed contents have no field for FP16: the same without it
    typed = [t for t in all_datatypes_model().graph.input if t.name != "in_FP16"]
    seed_store(root / "store", "identity_typed", all_datatypes_model([t.name[3:] for t in typed]))
    srv = Server(root / "store", {**TEST_ENV, "BNFOLD_API_TOKEN": TOKEN})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def api(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="session")
def conv_bn_bytes() -> bytes:
    return conv_bn_model().SerializeToString()
