"""Batch buckets (service/runtime/buckets.py): the choice rule, padding and slicing, warmed
bucket sessions on the CPU provider (plain, IO binding, CUDA graph's fallback), the batcher
padding into them, and a real server answering bit-identically to running each request alone."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.protocol.v2 import Signature, TensorSpec
from service.runtime import bucket_sessions
from service.runtime.batcher import Batcher, BatchPolicy, policy_for
from service.runtime.buckets import (
    bucket_for,
    candidates,
    choose_buckets,
    pad,
    parse_spec,
    sizes_for,
    unpad,
)
from service.runtime.sessions import SessionFactory
from service.settings import Settings
from tests.service.support import conv_bn_model, seed_store, upload
from tests.service.test_inference_batching import infer_body, parse

MODEL = conv_bn_model().SerializeToString()


def xs(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 8, 8)).astype(np.float32)


def alone(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


# -- the rule --------------------------------------------------------------------------------
def test_parse_spec_accepts_auto_off_and_sizes():
    assert parse_spec(" AUTO ") == "auto" and parse_spec("off") == "off"
    assert parse_spec("8,1, 4,2,4") == (1, 2, 4, 8)
    for bad in ("", "fast", "0,2", "1,x"):
        with pytest.raises(ValueError, match="batch_buckets"):
            parse_spec(bad)


def test_candidates_are_powers_of_two_up_to_the_largest_batch():
    assert candidates(64) == [1, 2, 4, 8, 16, 32, 64]
    assert candidates(48) == [1, 2, 4, 8, 16, 32, 48]
    assert candidates(1) == [1]


def test_sizes_for_buckets_replanning_models_on_auto_and_any_on_a_list():
    assert sizes_for("auto", 8, replans=True) == [1, 2, 4, 8]
    assert sizes_for("auto", 8, replans=False) == []  # the CPU keeps no plans
    assert sizes_for("off", 8, replans=True) == []
    assert sizes_for((1, 4, 16), 8, replans=False) == [1, 4]  # capped by max_batch_size
    assert sizes_for((16,), 8, replans=False) == [16]  # the batch is then capped at 16


def test_choose_buckets_drops_sizes_whose_padding_costs_nothing():
    """A GPU runs 1-8 images in nearly the time of one: those sizes share the bucket of 8."""
    run_ms = {1: 1.0, 2: 1.01, 4: 1.02, 8: 1.04, 16: 1.5, 32: 2.8, 64: 5.5}
    run_s = {b: t / 1e3 for b, t in run_ms.items()}
    assert choose_buckets(run_s, replan_s=41e-3) == [8, 16, 32, 64]


def test_choose_buckets_keeps_none_when_a_replan_costs_less_than_padding():
    """The CPU provider: a new batch size costs nothing, so exact sizes beat any padding."""
    run_s = {1: 1e-4, 2: 2e-4, 4: 4e-4, 8: 8e-4}
    assert choose_buckets(run_s, replan_s=0.0) == []
    assert choose_buckets(run_s, replan_s=3e-4) == []  # padding 5..8 rows wastes up to 0.4 ms
    assert choose_buckets(run_s, replan_s=5e-4) == [1, 2, 4, 8]  # every step costs > 5%


@given(
    st.lists(st.floats(1e-4, 1e-1), min_size=1, max_size=8),
    st.floats(0.0, 0.2),
)
def test_choose_buckets_keeps_the_largest_and_bounds_the_waste(times, replan_s):
    run_s = dict(zip(candidates(1 << (len(times) - 1)), sorted(times), strict=True))
    kept = choose_buckets(run_s, replan_s)
    if kept:
        assert kept[-1] == max(run_s) and set(kept) <= set(run_s)
        below = [min(run_s), *kept[:-1]]
        assert all(run_s[b] - run_s[p] < replan_s for b, p in zip(kept, below, strict=True))


def test_pad_repeats_the_last_row_and_unpad_drops_the_padding():
    a, b = xs(1, 0), xs(2, 1)
    padded = pad([a, b], 4)
    assert padded.shape == (4, 3, 8, 8)
    assert np.array_equal(padded[:3], np.concatenate([a, b]))
    assert np.array_equal(padded[3], b[-1])
    assert pad([padded], 4) is padded  # a full bucket alone is not copied
    staging = np.zeros((4, 3, 8, 8), np.float32)
    assert pad([a], 4, staging) is staging and np.array_equal(staging[1:], np.repeat(a, 3, 0))
    out = unpad({"y": np.arange(8).reshape(4, 2)}, 3)
    assert out["y"].shape == (3, 2)
    assert bucket_for(3, (1, 2, 4)) == 4 and bucket_for(5, (1, 2, 4)) is None


def test_policy_with_buckets_batches_a_replanning_model_up_to_its_largest_bucket():
    spec = TensorSpec("x", "FP32", [-1, 3])
    signature = Signature([spec], [spec])
    policy = policy_for(Settings(), signature, {}, replans_on_new_batch=True, buckets=(4, 1, 2))
    assert policy.enabled and policy.reason is None
    assert policy.buckets == (1, 2, 4) and policy.max_batch_size == 4
    assert policy.to_dict()["batch_buckets"] == [1, 2, 4]


# -- warmed bucket sessions on the CPU provider ----------------------------------------------
@pytest.mark.parametrize("io_binding", ["off", "on", "cuda_graph"])
def test_bucket_sessions_answer_each_row_as_running_it_alone(io_binding):
    factory = SessionFactory(intra_op_threads=1)
    loaded = bucket_sessions.add_buckets(
        factory, factory.create(MODEL), MODEL, [1, 2, 4, 8], choose=False, io_binding=io_binding
    )
    report = loaded.bucket_report
    assert report["buckets"] == [1, 2, 4, 8] and set(report["run_ms"]) == {"1", "2", "4", "8"}
    assert report["run"]["io_binding"] is (io_binding != "off")
    assert report["run"]["cuda_graph"] is False  # the CPU provider has none
    if io_binding == "cuda_graph":
        assert "need the CUDA provider" in report["notes"][0]
    x = xs(3, 2)
    staging = loaded.staging(4)
    assert (staging is not None) is (io_binding != "off")
    first = unpad(loaded.run({"x": pad([x], 4, (staging or {}).get("x"))}, ["y"]), 3)["y"]
    # the bound buffers are reused: a later run must not change what an earlier one returned
    loaded.run({"x": pad([xs(3, 9)], 4, (staging or {}).get("x"))}, ["y"])
    for i in range(3):
        assert np.array_equal(first[i : i + 1], alone(x[i : i + 1]))


def test_a_bucket_bound_at_the_example_shape_runs_other_shapes_unbound():
    from tests.service.test_inference_batching import variable_width_identity

    model = variable_width_identity().SerializeToString()
    factory = SessionFactory(intra_op_threads=1)
    loaded = bucket_sessions.add_buckets(
        factory,
        factory.create(model), model, [2], choose=False, io_binding="cuda_graph",
        input_shapes={"x": [2, 3]},
    )  # fmt: skip
    notes = loaded.bucket_report["notes"]
    assert any("example input shapes" in n for n in notes)
    assert loaded.bucket_report["run"]["io_binding"] is True
    for width in (3, 5):
        x = np.arange(2 * width, dtype=np.float32).reshape(2, width)
        staged = pad([x], 2, loaded.staging(2)["x"])
        assert (staged is loaded.staging(2)["x"]) is (width == 3)
        assert np.array_equal(loaded.run({"x": staged}, ["y"])["y"], x)


def test_auto_buckets_are_chosen_from_the_warmup_timings():
    factory = SessionFactory(intra_op_threads=1)
    loaded = bucket_sessions.add_buckets(
        factory, factory.create(MODEL), MODEL, candidates(16), choose=True
    )
    report = loaded.bucket_report
    assert report["replan_ms"] >= 0 and "rule" in report
    run_s = {int(b): t / 1e3 for b, t in report["run_ms"].items()}
    assert report["buckets"] == choose_buckets(run_s, report["replan_ms"] / 1e3)
    assert sorted(loaded.buckets) == report["buckets"]


def test_a_failed_warmup_leaves_the_model_without_buckets():
    factory = SessionFactory(intra_op_threads=1)
    # a wrong example shape: the warm-up run fails, the model is served as before
    loaded = bucket_sessions.add_buckets(
        factory,
        factory.create(MODEL),
        MODEL,
        [1, 2],
        choose=False,
        input_shapes={"x": [1, 5, 8, 8]},
    )
    assert loaded.buckets == {} and loaded.bucket_report["error"]


def test_batcher_pads_batches_into_the_bucket_and_replies_without_the_padding():
    factory = SessionFactory(intra_op_threads=1)
    loaded = bucket_sessions.add_buckets(
        factory, factory.create(MODEL), MODEL, [1, 2, 4], choose=False
    )
    loaded.buckets = {b: loaded.buckets[b] for b in (1, 4)}  # 2 and 3 rows pad to 4
    seen: list[int] = []
    run = loaded.run
    loaded.run = lambda inputs, names: seen.append(len(inputs["x"])) or run(inputs, names)
    policy = BatchPolicy(4, 50.0, 64, True, buckets=(1, 4))
    requests = [xs(1, 10), xs(2, 11)]

    async def go():
        with ThreadPoolExecutor(1) as pool:
            batcher = Batcher("conv", loaded, policy, pool)
            return await asyncio.gather(*(batcher.infer({"x": x}, ["y"]) for x in requests))

    results = asyncio.run(go())
    assert seen == [4]  # one run of 3 rows, padded to the bucket of 4
    for x, (out, timing) in zip(requests, results, strict=True):
        assert timing.batch_rows == 3
        assert np.array_equal(out["y"], alone(x))


# -- through a real server -------------------------------------------------------------------
def test_server_with_buckets_answers_bit_identically(start_server, tmp_path):
    seed_store(tmp_path / "store", "conv", conv_bn_model())
    server = start_server(
        BNFOLD_BATCH_BUCKETS="1,2,4", BNFOLD_IO_BINDING="on", BNFOLD_MAX_QUEUE_DELAY_MS="20"
    )
    requests = [xs(1 + i % 3, 20 + i) for i in range(18)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            bodies = [infer_body(x, binary=i % 2 == 0) for i, x in enumerate(requests)]
            return await asyncio.gather(
                *(client.post("/v2/models/conv/infer", content=b, headers=h) for b, h in bodies)
            )

    for x, response in zip(requests, asyncio.run(send_all()), strict=True):
        assert response.status_code == 200, response.text
        assert np.array_equal(parse(response), alone(x))
    with server.client() as api:
        batching = api.get("/v1/models/conv").json()["batching"]
        assert batching["batch_buckets"] == [1, 2, 4] and batching["max_batch_size"] == 4
        assert batching["bucket_warmup"]["run"]["io_binding"] is True
        big = xs(5, 0)  # beyond the largest bucket
        body, headers = infer_body(big, binary=True)
        assert api.post("/v2/models/conv/infer", content=body, headers=headers).status_code == 400
        # an upload can turn buckets off for its model, and a malformed list is refused
        made = upload(api, "plain", MODEL, batch_buckets="off")
        assert made.status_code == 201, made.text
        assert api.get("/v1/models/plain").json()["batching"]["batch_buckets"] == []
        refused = upload(api, "bad", MODEL, batch_buckets="1,zero")
        assert refused.status_code == 400 and "batch_buckets" in refused.text
