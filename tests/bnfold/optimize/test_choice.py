"""The choice rule of `optimize` (bnfold.optimizer.choice) on made-up timings."""

import pytest

from bnfold.optimizer.choice import MAX_NOISE, choose, geometric_speedup

B1, B8 = "batch=1", "batch=8"


def test_choose_takes_a_candidate_slower_at_one_batch_only_within_the_noise():
    # EfficientNet-B0's case: INT8 2.5% slower at batch 1 (A/A 1.027), 13% faster at batch 8
    choice = choose(
        {"fp32": {B1: 1.0, B8: 1.0}, "int8": {B1: 1.025, B8: 0.87}},
        {"fp32": True, "int8": True},
        {B1: 1.027, B8: 1.009},
    )
    assert choice.chosen == "int8"
    assert choice.noise == pytest.approx(0.027)
    assert choice.objective["int8"] == pytest.approx(geometric_speedup({B1: 1.025, B8: 0.87}))
    assert "A/A noise 0.027" in choice.why


def test_choose_rejects_a_candidate_slower_beyond_the_noise_at_any_batch():
    choice = choose(
        {"int8": {B1: 1.039, B8: 0.70}},
        {"int8": True},
        {B1: 1.027, B8: 0.995},
    )
    assert choice.chosen == "fp32"
    assert "batch=1" in choice.rejected["int8"] and "beyond" in choice.rejected["int8"]


def test_choose_keeps_fp32_when_the_gain_is_within_the_noise():
    choice = choose({"int8": {B1: 0.99, B8: 0.98}}, {"int8": True}, {B1: 0.97, B8: 1.01})
    assert choice.chosen == "fp32"
    assert "within the noise" in choice.rejected["int8"]


def test_choose_without_noise_is_strict():
    # A/A exactly 1: any ratio above 1 is slower, any gain above 1 counts
    slower = choose({"int8": {B1: 1.001, B8: 0.5}}, {"int8": True}, {B1: 1.0, B8: 1.0})
    faster = choose({"int8": {B1: 0.999, B8: 0.999}}, {"int8": True}, {B1: 1.0, B8: 1.0})
    assert slower.chosen == "fp32" and faster.chosen == "int8"


def test_choose_caps_the_slack_but_not_the_gain_threshold():
    # a run with A/A 1.20 admits nothing more than MAX_NOISE slower, and needs a 20% gain
    aa = {B1: 1.20, B8: 1.0}
    too_slow = choose({"int8": {B1: 1.0 + MAX_NOISE + 0.01, B8: 0.5}}, {"int8": True}, aa)
    small_gain = choose({"int8": {B1: 1.0, B8: 0.8}}, {"int8": True}, aa)
    big_gain = choose({"int8": {B1: 1.0, B8: 0.6}}, {"int8": True}, aa)
    assert too_slow.chosen == "fp32" and small_gain.chosen == "fp32"
    assert big_gain.chosen == "int8"


def test_choose_picks_the_largest_geometric_mean_among_the_eligible():
    choice = choose(
        {
            "a": {B1: 0.60, B8: 0.90},  # geometric speedup 1.36
            "b": {B1: 0.80, B8: 0.60},  # 1.44
            "c": {B1: 0.30, B8: 0.30},  # fastest, but outside the budget
        },
        {"a": True, "b": True, "c": False},
        {B1: 1.01, B8: 0.99},
    )
    assert choice.chosen == "b"
    assert choice.rejected == {"c": "accuracy budget not met"}
    assert set(choice.objective) == {"a", "b"}


def test_choose_with_no_candidate_but_fp32():
    choice = choose({"fp32": {B1: 1.0}}, {"fp32": True}, {B1: 1.0})
    assert choice.chosen == "fp32" and choice.rejected == {} and choice.objective == {}
