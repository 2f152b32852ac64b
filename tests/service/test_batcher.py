"""The dynamic batcher on its own: gathering, splitting, limits, failures (no server)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.errors import BadRequest, ServiceUnavailable
from service.protocol.v2 import Signature, TensorSpec
from service.runtime.batcher import Batcher, BatchPolicy, policy_for
from service.runtime.sessions import SessionFactory
from service.settings import Settings
from tests.service.support import conv_bn_model


@pytest.fixture(scope="module")
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


@pytest.fixture(scope="module")
def conv_bn():
    return SessionFactory().create(conv_bn_model().SerializeToString())


class CountingRuntime:
    """A runtime that records the batch of every run and can refuse a marked row."""

    def __init__(self, real, fail_on: float | None = None, drop_row: bool = False) -> None:
        self.real, self.fail_on, self.drop_row = real, fail_on, drop_row
        self.signature = real.signature
        self.runs: list[int] = []

    def run(self, inputs, names):
        x = inputs["x"]
        self.runs.append(x.shape[0])
        if self.fail_on is not None and (x == self.fail_on).any():
            raise BadRequest("marked input")
        out = self.real.run(inputs, names)
        return {k: v[1:] for k, v in out.items()} if self.drop_row and len(x) > 1 else out


def policy(enabled=True, max_batch=8, delay_ms=50.0, max_queue=64) -> BatchPolicy:
    return BatchPolicy(max_batch, delay_ms, max_queue, enabled)


def inputs(rows: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((rows, 3, 8, 8)).astype(np.float32)
    return {"x": x}


async def gather(batcher: Batcher, requests):
    return await asyncio.gather(
        *(batcher.infer(r, ["y"]) for r in requests), return_exceptions=True
    )


def test_batcher_concurrent_requests_share_runs_bit_identical(conv_bn, executor):
    runtime = CountingRuntime(conv_bn)
    batcher = Batcher("m", runtime, policy(max_batch=8), executor)
    requests = [inputs(1 + i % 3, i) for i in range(10)]  # 19 rows
    results = asyncio.run(gather(batcher, requests))
    for req, (out, timing) in zip(requests, results, strict=True):
        alone = conv_bn.run(req, ["y"])["y"]
        assert np.array_equal(out["y"], alone)  # bit-identical, not merely close
        assert timing.batch_rows <= 8 and timing.queue_s >= 0 and timing.compute_s > 0
    assert sum(runtime.runs) == 19 and max(runtime.runs) <= 8 and len(runtime.runs) < 10


def test_batcher_lone_request_on_an_idle_model_is_not_delayed(conv_bn, executor):
    batcher = Batcher("m", CountingRuntime(conv_bn), policy(delay_ms=2000), executor)

    async def one():
        t0 = asyncio.get_running_loop().time()
        await batcher.infer(inputs(1, 0), ["y"])
        return asyncio.get_running_loop().time() - t0

    assert asyncio.run(one()) < 1.0


def test_batcher_off_runs_each_request_alone(conv_bn, executor):
    runtime = CountingRuntime(conv_bn)
    batcher = Batcher("m", runtime, policy(enabled=False), executor)
    asyncio.run(gather(batcher, [inputs(2, i) for i in range(5)]))
    assert runtime.runs == [2] * 5


def test_batcher_full_queue_refuses_with_retry_after(conv_bn, executor):
    batcher = Batcher("m", CountingRuntime(conv_bn), policy(max_queue=3), executor)
    results = asyncio.run(gather(batcher, [inputs(1, i) for i in range(6)]))
    refused = [r for r in results if isinstance(r, ServiceUnavailable)]
    assert len(refused) == 3 and all(r.headers["Retry-After"] == "1" for r in refused)
    assert all(isinstance(r, tuple) for r in results[:3])


def test_batcher_bad_request_fails_alone(conv_bn, executor):
    runtime = CountingRuntime(conv_bn, fail_on=7.0)
    batcher = Batcher("m", runtime, policy(), executor)
    requests = [inputs(1, i) for i in range(4)]
    requests[2]["x"][0, 0, 0, 0] = 7.0
    results = asyncio.run(gather(batcher, requests))
    assert isinstance(results[2], BadRequest)
    for i in (0, 1, 3):
        assert np.array_equal(results[i][0]["y"], conv_bn.run(requests[i], ["y"])["y"])


def test_batcher_outputs_without_batch_rows_fall_back_to_single_runs(conv_bn, executor):
    runtime = CountingRuntime(conv_bn, drop_row=True)  # a batch loses a row: not batchable
    batcher = Batcher("m", runtime, policy(), executor)
    requests = [inputs(1, i) for i in range(3)]
    results = asyncio.run(gather(batcher, requests))
    for req, (out, _) in zip(requests, results, strict=True):
        assert np.array_equal(out["y"], conv_bn.run(req, ["y"])["y"])


def test_batcher_groups_requests_by_shape(executor):
    class Echo:
        signature = None
        runs: list[tuple] = []

        def run(self, inputs, names):
            self.runs.append(inputs["x"].shape)
            return {"y": inputs["x"] * 2}

    echo = Echo()
    batcher = Batcher("m", echo, policy(), executor)
    requests = [{"x": np.full((1, 2 + i % 2), i, np.float32)} for i in range(6)]
    results = asyncio.run(gather(batcher, requests))
    for req, (out, _) in zip(requests, results, strict=True):
        assert np.array_equal(out["y"], req["x"] * 2)
    assert sorted(echo.runs) == [(3, 2), (3, 3)]


def spec(shape) -> TensorSpec:
    return TensorSpec("t", "FP32", shape)


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "max_batch", "enabled"),
    [
        ([-1, 3], [-1, 3], 8, True),
        ([1, 3], [1, 3], 8, False),  # fixed first dim: nothing to batch along
        ([-1, 3], [3], 8, False),  # an output without the batch dim cannot be split
        ([-1, 3], [-1, 3], 1, False),  # max_batch_size 1: off by the model's own choice
    ],
)
def test_policy_batches_only_models_with_a_batch_dimension(in_shape, out_shape, max_batch, enabled):
    signature = Signature([spec(in_shape)], [spec(out_shape)])
    got = policy_for(Settings(), signature, {"max_batch_size": max_batch})
    assert got.enabled is enabled and got.max_batch_size == max_batch


def test_policy_model_overrides_beat_settings_defaults():
    signature = Signature([spec([-1, 3])], [spec([-1, 3])])
    settings = Settings(max_batch_size=16, max_queue_delay_ms=2.0, max_queue=9)
    assert policy_for(settings, signature, {}) == BatchPolicy(16, 2.0, 9, True)
    assert policy_for(settings, signature, {"max_queue_delay_ms": 0}).max_queue_delay_ms == 0
    assert not policy_for(Settings(dynamic_batching=False), signature).enabled


def test_policy_keeps_batching_off_where_new_batch_sizes_cost_a_replan():
    """Convolutions on the GPU: off with the reason, unless the model's upload asked for it;
    an upload can also turn batching off for its model."""
    signature = Signature([spec([-1, 3])], [spec([-1, 3])])
    gpu_conv = policy_for(Settings(), signature, {}, replans_on_new_batch=True)
    assert not gpu_conv.enabled
    assert "re-plans" in gpu_conv.to_dict()["reason"]
    forced = policy_for(Settings(), signature, {"dynamic_batching": True}, True)
    assert forced.enabled and "reason" not in forced.to_dict()
    refused = policy_for(Settings(), signature, {"dynamic_batching": False})
    assert not refused.enabled and "dynamic_batching=false" in refused.reason
    # the server-wide switch wins over a model's request
    off = policy_for(Settings(dynamic_batching=False), signature, {"dynamic_batching": True})
    assert not off.enabled


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1)
        self.submitted = 0

    def submit(self, *args, **kwargs):
        self.submitted += 1
        return super().submit(*args, **kwargs)


def test_batcher_runs_tiny_runs_on_the_loop_and_the_rest_in_a_thread(conv_bn):
    """A 1x3x8x8 conv takes well under the (test's, machine-independent) 20 ms threshold: after
    its first run (no estimate yet: a thread) it runs on the event loop. 4096 rows are expected
    to take longer: a thread. Both give the same numbers as a direct run."""
    with CountingExecutor() as pool:
        batcher = Batcher("m", conv_bn, policy(enabled=False), pool, inline_below_s=0.02)

        async def run_all():
            small = [await batcher.infer(inputs(1, i), ["y"]) for i in range(20)]
            return small, await batcher.infer(inputs(4096, 0), ["y"])

        small, (big, big_timing) = asyncio.run(run_all())
        after_small = pool.submitted
    assert after_small == 2  # the first small run and the big one
    for i, (out, _) in enumerate(small):
        want = conv_bn.run(inputs(1, i), ["y"])["y"]
        np.testing.assert_array_equal(out["y"], want)
    np.testing.assert_array_equal(big["y"], conv_bn.run(inputs(4096, 0), ["y"])["y"])
    assert big_timing.compute_s > 0


def test_batcher_does_not_wait_for_company_when_the_run_is_tiny(conv_bn, executor):
    """Once a model's runs are known to be shorter than a thread hop, a batch does not spend
    the queue delay waiting (it could save less than the wait); what is queued still shares
    one run. A larger conv on the same model would wait (the first test above)."""
    runtime = CountingRuntime(conv_bn)
    batcher = Batcher("m", runtime, policy(delay_ms=2000), executor, inline_below_s=0.02)

    async def pairs():
        for i in range(10):  # learn the run time, alone
            await batcher.infer(inputs(1, i), ["y"])
        t0 = asyncio.get_running_loop().time()
        await gather(batcher, [inputs(1, 100), inputs(1, 101)])  # company: two at once
        await gather(batcher, [inputs(1, 102), inputs(1, 103)])
        return asyncio.get_running_loop().time() - t0

    assert asyncio.run(pairs()) < 1.0  # two waits of the 2 s delay would be 4 s
    assert runtime.runs[-2:] == [2, 2]  # each pair shared a run


def test_batcher_deploy_time_timing_is_the_first_estimate(conv_bn):
    """With the run timed at deploy time in hand, a tiny run goes on the loop from the first
    request; one expected to take longer than the threshold (many more elements) does not."""
    with CountingExecutor() as pool:
        batcher = Batcher(
            "m", conv_bn, policy(enabled=False), pool, inline_below_s=0.02,
            expected_run=(2 * 3 * 8 * 8, 1e-4),
        )  # fmt: skip

        async def run_all():
            await batcher.infer(inputs(1, 0), ["y"])
            first = pool.submitted
            await batcher.infer(inputs(4096, 0), ["y"])  # 2048x the elements: ~0.2 s expected
            return first, pool.submitted

        assert asyncio.run(run_all()) == (0, 1)
