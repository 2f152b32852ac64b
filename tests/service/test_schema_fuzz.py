"""Schemathesis over the service's own OpenAPI schema: no 5xx, every error JSON with a message."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.service.support import TEST_ENV, TOKEN, Server, conv_bn_model, upload

schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = Server(
        tmp_path_factory.mktemp("fuzz") / "store",
        {**TEST_ENV, "BNFOLD_API_TOKEN": TOKEN, "BNFOLD_DEPLOY_DEFAULTS": "0"},
    ).start()
    with server.client() as api:
        assert upload(api, "fuzzed", conv_bn_model().SerializeToString()).status_code == 201
    yield server
    server.stop()


def check(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["error"], str) and body["error"]
        assert "Traceback" not in response.text


def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


# schemathesis' pytest plugin does not load under this pytest, so each operation's hypothesis
# strategy is driven by hand
@pytest.mark.parametrize("authorized", [True, False])
def test_no_generated_request_makes_the_server_fail(fuzz_server, authorized):
    headers = {"Authorization": f"Bearer {TOKEN}"} if authorized else {}
    ops = operations(fuzz_server)
    assert len(ops) >= 12
    for operation in ops:
        # an upload costs a worker process (about 3 s of CPU): fewer of those
        upload_op = operation.method.upper() == "POST" and operation.path == "/v1/models"
        examples = 4 if upload_op else 12

        @given(case=operation.as_strategy())
        @settings(
            max_examples=examples if authorized else 3,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def fuzz(case):
            check(case.call(base_url=fuzz_server.url, headers=headers, timeout=120))

        fuzz()
