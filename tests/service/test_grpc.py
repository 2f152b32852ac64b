"""tritonclient.grpc, unchanged, against a real server's v2 gRPC service: health, metadata and
config as over HTTP, every datatype as raw and as typed contents, the same answers as HTTP,
errors with proper status codes, concurrency, streaming, and one batch holding a gRPC and an
HTTP request together."""

from __future__ import annotations

import asyncio
import gzip
import queue
import re
import time

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.service.support import ONNX_TYPES, seed_store
from tests.service.test_inference_batching import matmul_chain
from tests.service.test_inference_triton import sample

# a matmul chain this wide and deep runs ~1 s for 64 rows on the 2-core machine: requests sent
# once it runs (``_wait_until``) queue behind it
WIDTH, BLOCKER_DEPTH = 1024, 1024
# the typed-contents field of each datatype (FP16 has none)
TYPED = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_hostport)
    yield c
    c.close()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.grpc_hostport) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def fp32_input(name: str, x: np.ndarray) -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value.code(), err.value.details()


def test_health_metadata_and_config_say_what_http_says(client, server):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "bnfold" and "binary_tensor_data" in meta.extensions
    assert client.is_model_ready("resnet_small")
    assert not client.is_model_ready("no_such_model")
    with server.client() as api:
        http_meta = api.get("/v2/models/resnet_small").json()
        http_config = api.get("/v2/models/resnet_small/config").json()
    meta = client.get_model_metadata("resnet_small", as_json=True)
    assert meta["name"] == "resnet_small" and meta["versions"] == http_meta["versions"]
    assert meta["platform"] == http_meta["platform"]
    for key in ("inputs", "outputs"):
        got = [{**t, "shape": [int(d) for d in t["shape"]]} for t in meta[key]]
        assert got == http_meta[key]
    version = http_meta["versions"][0]
    assert client.is_model_ready("resnet_small", model_version=version)
    assert not client.is_model_ready("resnet_small", model_version="0000")
    config = client.get_model_config("resnet_small", as_json=True)["config"]
    assert config["max_batch_size"] == http_config["max_batch_size"]
    assert config["backend"] == "onnxruntime"
    assert [i["name"] for i in config["input"]] == [i["name"] for i in http_config["input"]]
    assert [int(d) for d in config["input"][0]["dims"]] == http_config["input"][0]["dims"]
    assert config["input"][0]["data_type"] == http_config["input"][0]["data_type"]
    delay = int(config["dynamic_batching"]["max_queue_delay_microseconds"])
    assert delay == http_config["dynamic_batching"]["max_queue_delay_microseconds"]


def test_every_datatype_round_trips_as_raw_contents(client):
    rng = np.random.default_rng(0)
    inputs, outputs, sent = [], [], {}
    for datatype in ONNX_TYPES:
        x = sample(datatype, rng)
        inp = grpcclient.InferInput(f"in_{datatype}", list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        inputs.append(inp)
        outputs.append(grpcclient.InferRequestedOutput(f"out_{datatype}"))
        sent[datatype] = x
    result = client.infer("identity_all", inputs, outputs=outputs, request_id="raw-1")
    assert result.get_response().id == "raw-1"
    for datatype, x in sent.items():
        got = result.as_numpy(f"out_{datatype}")
        np.testing.assert_array_equal(got, x)
        assert got.dtype == x.dtype, datatype


def test_every_datatype_round_trips_as_typed_contents(stub):
    rng = np.random.default_rng(1)
    request = service_pb2.ModelInferRequest(model_name="identity_typed", id="typed")
    sent = {}
    for datatype in TYPED:  # FP16 has no typed field: identity_typed has no FP16 input
        x = sample(datatype, rng)
        tensor = request.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=x.shape)
        getattr(tensor.contents, TYPED[datatype]).extend(x.ravel().tolist())
        request.outputs.add(name=f"out_{datatype}")
        sent[datatype] = x
    reply = stub.ModelInfer(request, timeout=30)
    assert reply.id == "typed" and len(reply.raw_output_contents) == len(sent)
    result = grpcclient.InferResult(reply)
    for datatype, x in sent.items():
        np.testing.assert_array_equal(result.as_numpy(f"out_{datatype}"), x)


def test_answers_are_bit_identical_to_http(client, server):
    x = np.random.default_rng(4).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with httpclient.InferenceServerClient(server.hostport) as http:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        want = http.infer("resnet_small", [inp]).as_numpy("linear")
    result = client.infer("resnet_small", [fp32_input("x", x)])
    assert result.as_numpy("linear").shape == (3, 10)
    np.testing.assert_array_equal(result.as_numpy("linear"), want)
    version = client.get_model_metadata("resnet_small").versions[0]
    pinned = client.infer("resnet_small", [fp32_input("x", x)], model_version=version)
    assert pinned.get_response().model_version == version
    np.testing.assert_array_equal(pinned.as_numpy("linear"), want)
    for algorithm in ("gzip", "deflate"):
        packed = client.infer("resnet_small", [fp32_input("x", x)], compression_algorithm=algorithm)
        np.testing.assert_array_equal(packed.as_numpy("linear"), want)


def _request(**tensors: np.ndarray) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="mlp_bn_after_act")
    for name, x in tensors.items():
        request.inputs.add(name=name, datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
    return request


def test_mistakes_get_invalid_argument_or_not_found_and_never_unknown(client, stub):
    good = np.zeros((2, 300), np.float32)
    with pytest.raises(InferenceServerException, match="does not fit the model") as err:
        client.infer("mlp_bn_after_act", [fp32_input("x", np.zeros((2, 5), np.float32))])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="not deployed") as err:
        client.infer("no_such_model", [fp32_input("x", good)])
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="no version") as err:
        client.infer("mlp_bn_after_act", [fp32_input("x", good)], model_version="0000")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="not deployed"):
        client.get_model_metadata("no_such_model")
    with pytest.raises(InferenceServerException, match="not deployed"):
        client.get_model_config("no_such_model")

    cases = {
        "unknown input": _request(nope=good),
        "given twice": _request(x=good),
        "expects datatype FP32": _request(x=good),
        "needs 2400 bytes": _request(x=good),
        "raw_input_contents has 2 entries": _request(x=good),
        "neither contents nor raw": service_pb2.ModelInferRequest(model_name="mlp_bn_after_act"),
        "non-empty list": service_pb2.ModelInferRequest(model_name="mlp_bn_after_act"),
        "unknown output": _request(x=good),
        "above the limit": _request(x=good),
        "exceeds max_batch_size": _request(x=good),
        "use one or the other": _request(x=good),
        "negative dimension": _request(x=good),
    }
    cases["given twice"].inputs.add(name="x", datatype="FP32", shape=[2, 300])
    cases["given twice"].raw_input_contents.append(good.tobytes())
    cases["expects datatype FP32"].inputs[0].datatype = "FP64"
    cases["needs 2400 bytes"].raw_input_contents[0] = b"\x00" * 12
    cases["raw_input_contents has 2 entries"].raw_input_contents.append(b"")
    cases["neither contents nor raw"].inputs.add(name="x", datatype="FP32", shape=[2, 300])
    cases["unknown output"].outputs.add(name="nope")
    del cases["above the limit"].inputs[0].shape[:]
    cases["above the limit"].inputs[0].shape.extend([1 << 20, 300])
    del cases["exceeds max_batch_size"].inputs[0].shape[:]
    cases["exceeds max_batch_size"].inputs[0].shape.extend([65, 300])
    cases["use one or the other"].inputs[0].contents.fp32_contents.extend([0.0] * 600)
    cases["negative dimension"].inputs[0].shape[0] = -2
    for message, request in cases.items():
        code, details = code_of(stub.ModelInfer, request, timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (message, code, details)
        assert message in details, (message, details)

    rng = np.random.default_rng(2)
    typed = service_pb2.ModelInferRequest(model_name="identity_typed")
    for datatype in TYPED:
        tensor = typed.inputs.add(name=f"in_{datatype}", datatype=datatype, shape=[2, 3])
        getattr(tensor.contents, TYPED[datatype]).extend(sample(datatype, rng).ravel().tolist())
    stub.ModelInfer(typed, timeout=30)  # well-formed
    bools = typed.inputs[list(TYPED).index("BOOL")].contents
    bools.int_contents.append(1)  # an int beside the bools
    code, details = code_of(stub.ModelInfer, typed, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "belongs in bool_contents" in details
    del bools.int_contents[:]
    int8 = typed.inputs[list(TYPED).index("INT8")].contents
    int8.int_contents[0] = 300
    code, details = code_of(stub.ModelInfer, typed, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "out of range for INT8" in details
    int8.int_contents[0] = 1
    del int8.int_contents[-1]
    code, details = code_of(stub.ModelInfer, typed, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "has 5 values" in details
    half = service_pb2.ModelInferRequest(model_name="identity_all")
    half.inputs.add(name="in_FP16", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend(
        [1.0] * 3
    )
    code, details = code_of(stub.ModelInfer, half, timeout=30)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FP16 has no typed contents" in details


def test_a_message_over_the_request_limit_is_refused_before_parsing(stub, server):
    limit = int(server.env["BNFOLD_MAX_REQUEST_BYTES"])
    big = np.zeros((1, limit // 4 + 16), np.float32)
    code, details = code_of(stub.ModelInfer, _request(x=big), timeout=30)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    # zeros compress to a few kB: the limit holds for the decompressed message
    packed = _request(x=big)
    assert len(gzip.compress(packed.SerializeToString())) < limit // 100
    code, details = code_of(stub.ModelInfer, packed, timeout=30, compression=grpc.Compression.Gzip)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert stub.ServerLive(service_pb2.ServerLiveRequest()).live  # and the server goes on


def test_concurrent_requests_each_get_their_own_answer(server):
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((1 + i % 3, 3, 16, 16)).astype(np.float32) for i in range(32)]
    with grpcclient.InferenceServerClient(server.grpc_hostport) as one:
        want = [one.infer("resnet_small", [fp32_input("x", x)]).as_numpy("linear") for x in xs]

    async def all_at_once() -> list[np.ndarray]:
        async with grpcaio.InferenceServerClient(server.grpc_hostport) as client:
            results = await asyncio.gather(
                *(client.infer("resnet_small", [fp32_input("x", x)]) for x in xs)
            )
        return [r.as_numpy("linear") for r in results]

    for got, expected in zip(asyncio.run(all_at_once()), want, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_stream_answers_each_request_and_its_errors_by_id(client):
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        xs = {}
        for i in range(6):
            x = np.full((1, 300), i, np.float32)
            shape_ok = i != 3
            sent = x if shape_ok else np.zeros((1, 7), np.float32)
            client.async_stream_infer(
                "mlp_bn_after_act", [fp32_input("x", sent)], request_id=str(i)
            )
            xs[str(i)] = x
        got = [replies.get(timeout=30) for _ in range(6)]
    finally:
        client.stop_stream()
    errors = [e for _, e in got if e is not None]
    assert len(errors) == 1 and "does not fit the model" in str(errors[0])
    results = {r.get_response().id: r.as_numpy("linear_3") for r, e in got if e is None}
    assert sorted(results) == ["0", "1", "2", "4", "5"]
    for rid, out in results.items():
        want = client.infer("mlp_bn_after_act", [fp32_input("x", xs[rid])]).as_numpy("linear_3")
        np.testing.assert_array_equal(out, want)


def _metric(text: str, name: str, model: str) -> float:
    pattern = rf'^{name}\{{model="{model}"\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def _wait_until(server, model: str, requests: int, queued: int, timeout: float = 30) -> None:
    """Until the server has received ``requests`` infer requests for ``model`` and ``queued``
    of them wait for a run (the others running or answered), by its /metrics."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.url, timeout=10) as client:
        while True:
            text = client.get("/metrics").text
            got = (
                _metric(text, "bnfold_infer_requests_total", model),
                _metric(text, "bnfold_queue_depth", model),
            )
            if got == (requests, queued):
                return
            assert time.monotonic() < deadline, f"requests, queued = {got}"
            time.sleep(0.01)


def test_one_batch_holds_grpc_and_http_requests_and_counts_them_alike(start_server, tmp_path):
    model = matmul_chain(WIDTH, BLOCKER_DEPTH)
    seed_store(tmp_path / "store", "chain", model)
    server = start_server()
    rng = np.random.default_rng(6)
    blocker = rng.standard_normal((64, WIDTH)).astype(np.float32)
    xg, xh = (rng.standard_normal((1, WIDTH)).astype(np.float32) for _ in range(2))

    def http_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        body, json_size = httpclient.InferenceServerClient.generate_request_body([inp])
        return body, {"Inference-Header-Content-Length": str(json_size)}

    def parse(response: httpx.Response) -> np.ndarray:
        assert response.status_code == 200, response.text
        length = int(response.headers["Inference-Header-Content-Length"])
        body = httpclient.InferenceServerClient.parse_response_body
        return body(response.content, header_length=length).as_numpy("y")

    async def run() -> tuple[np.ndarray, np.ndarray]:
        async with (
            grpcaio.InferenceServerClient(server.grpc_hostport) as g,
            httpx.AsyncClient(base_url=server.url, timeout=60) as h,
        ):
            assert await g.is_server_live()  # the channel is connected before the blocker
            # while the blocker runs, one gRPC and one HTTP request queue: the next run takes both
            body, headers = http_body(blocker)
            running = asyncio.create_task(
                h.post("/v2/models/chain/infer", content=body, headers=headers)
            )
            await asyncio.to_thread(_wait_until, server, "chain", 1, 0)  # it runs
            body, headers = http_body(xh)
            got_g, got_h = await asyncio.gather(
                g.infer("chain", [fp32_input("x", xg)]),
                h.post("/v2/models/chain/infer", content=body, headers=headers),
            )
            parse(await running)
        return got_g.as_numpy("y"), parse(got_h)

    with server.client() as api:
        before = api.get("/metrics").text
        got_g, got_h = asyncio.run(run())
        after = api.get("/metrics").text
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(got_g, session.run(["y"], {"x": xg})[0])
    np.testing.assert_array_equal(got_h, session.run(["y"], {"x": xh})[0])

    def delta(name: str) -> float:
        return _metric(after, name, "chain") - _metric(before, name, "chain")

    assert delta("bnfold_infer_requests_total") == 3  # gRPC and HTTP in the same counter
    # two runs: the blocker's 64 rows, then the gRPC and the HTTP request together
    assert (delta("bnfold_batch_rows_count"), delta("bnfold_batch_rows_sum")) == (2, 66)


def test_a_full_queue_answers_unavailable_with_retry_after(start_server, tmp_path):
    seed_store(tmp_path / "store", "chain", matmul_chain(WIDTH, BLOCKER_DEPTH))
    server = start_server(BNFOLD_MAX_QUEUE="2")
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((1 + i % 2, WIDTH)).astype(np.float32) for i in range(6)]

    async def send_all() -> list:
        async with grpcaio.InferenceServerClient(server.grpc_hostport) as client:
            assert await client.is_server_live()
            blocker = np.zeros((64, WIDTH), np.float32)
            running = asyncio.create_task(client.infer("chain", [fp32_input("x", blocker)]))
            await asyncio.to_thread(_wait_until, server, "chain", 1, 0)  # it runs
            # while it runs two requests may wait (BNFOLD_MAX_QUEUE); the other four may not
            calls = [client.infer("chain", [fp32_input("x", x)]) for x in xs]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            await running
            return outcomes

    outcomes = asyncio.run(send_all())
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert len(failures) == 4, outcomes
    for failure in failures:
        assert isinstance(failure, InferenceServerException), failure
        assert failure.status() == "StatusCode.UNAVAILABLE" and "queued" in str(failure)
    session = ort.InferenceSession(
        matmul_chain(WIDTH, BLOCKER_DEPTH).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for x, outcome in zip(xs, outcomes, strict=True):
        if not isinstance(outcome, Exception):
            np.testing.assert_array_equal(outcome.as_numpy("y"), session.run(["y"], {"x": x})[0])


def test_unavailable_carries_retry_after_in_the_trailing_metadata(start_server, tmp_path):
    seed_store(tmp_path / "store", "chain", matmul_chain(WIDTH, BLOCKER_DEPTH))
    server = start_server(BNFOLD_MAX_QUEUE="1")
    with grpc.insecure_channel(server.grpc_hostport) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)  # connected before the blocker
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def request(rows: int) -> service_pb2.ModelInferRequest:
            r = service_pb2.ModelInferRequest(model_name="chain")
            r.inputs.add(name="x", datatype="FP32", shape=[rows, WIDTH])
            r.raw_input_contents.append(np.zeros((rows, WIDTH), np.float32).tobytes())
            return r

        blocker = stub.ModelInfer.future(request(64))
        _wait_until(server, "chain", 1, 0)  # it runs
        waiting = stub.ModelInfer.future(request(1))
        _wait_until(server, "chain", 2, 1)  # it waits: the queue (1) is full
        refused = stub.ModelInfer.future(request(1))
        error = refused.exception(timeout=30)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
        assert ("retry-after", "1") in tuple(error.trailing_metadata())
        blocker.result(timeout=30), waiting.result(timeout=30)


def test_grpc_port_zero_turns_it_off_and_a_taken_port_is_a_clear_start_error(
    start_server, tmp_path
):
    server = start_server(BNFOLD_GRPC_PORT="0")
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=1)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        blocked = start_server(tmp_path / "other", wait=False, BNFOLD_GRPC_PORT=str(port))
        assert blocked.proc.wait(60) != 0
    log = blocked.log.read_text()
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in log and "BNFOLD_GRPC_PORT" in log
    assert "Traceback" not in log
