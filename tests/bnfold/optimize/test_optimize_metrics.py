import json

import numpy as np
import pytest
from optimize_graphs import conv_act_conv

from bnfold.optimizer.accuracy import compare, flipped_gaps, logit_stats
from bnfold.optimizer.budget import Budget
from bnfold.optimizer.hardware import cpu_features
from bnfold.optimizer.timing import aa_ratio, run_orders, session_options, time_interleaved


def test_compare_identical_outputs():
    y = np.random.default_rng(0).standard_normal((16, 5))
    acc = compare([y], [y.copy()], labels=y.argmax(1))
    assert acc["rel_l2"] == 0 and acc["top1_agreement"] == 1
    assert acc["cosine"] == pytest.approx(1) and acc["accuracy_drop_points"] == 0


def test_compare_counts_changed_classes_and_label_accuracy():
    ref = np.eye(4)[[0, 1, 2, 3]] * 2
    got = np.eye(4)[[0, 1, 2, 0]] * 2
    acc = compare([ref], [got], labels=np.array([0, 1, 2, 3]))
    assert acc["top1_agreement"] == 0.75 and acc["accuracy_drop_points"] == pytest.approx(25)


def test_compare_non_scores_has_no_top1():
    y = np.ones((3, 2, 4, 4))
    assert compare([y], [y * 1.1])["top1_agreement"] is None


def test_logit_stats_tell_a_constant_top1_from_a_varied_one():
    rng = np.random.default_rng(0)
    varied = rng.standard_normal((64, 10))
    constant = varied * 0.01 + np.eye(10)[3]  # class 3 wins on every input
    stats = logit_stats(varied)
    assert stats["top1_classes"] > 5 and stats["top1_majority"] < 0.5
    assert stats["across_input_std_rms"] == pytest.approx(1, rel=0.2)
    stats = logit_stats(constant)
    assert stats["top1_classes"] == 1 and stats["top1_majority"] == 1.0
    assert stats["top2_gap_median"] > 0.9 and stats["across_input_std_rms"] < 0.02
    acc = compare([constant], [constant * 1.5])
    assert acc["reference_top1_classes"] == 1 and acc["reference_top1_majority"] == 1.0


def test_flipped_gaps_are_the_reference_top2_gaps_where_top1_changed():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.75], [1.0, 1.5, 0.0]])
    got = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    assert flipped_gaps(ref, got) == [0.25, 0.5]
    assert flipped_gaps(ref, ref) == []


def test_budget_holds_a_candidate_to_rel_l2_where_a_constant_meets_top1():
    # the original gives one class on 63 of 64 inputs: a constant answer agrees on 98%
    near_constant = {"top1_agreement": 1.0, "rel_l2": 0.2, "reference_top1_majority": 63 / 64}
    met, reasons = Budget(min_top1_agreement=0.98).check(near_constant)
    assert not met and reasons == [
        "relative L2 error 0.2000 > 0.05 (top-1 says little here: the original gives one "
        "class on 98% of these inputs)"
    ]
    assert Budget(min_top1_agreement=0.98).check({**near_constant, "rel_l2": 0.04})[0]
    assert not Budget(min_top1_agreement=0.98, max_rel_l2=0.01).check(near_constant)[0]
    # a stricter top-1 limit than the constant's share is a test again, on its own
    assert Budget(min_top1_agreement=0.99).check(near_constant)[0]
    assert not Budget().top1_decides({"top1_agreement": None, "rel_l2": 0.0})


def test_budget_default_and_limits():
    assert Budget().min_top1_agreement == 0.99
    ok, _ = Budget().check({"rel_l2": 0.2, "top1_agreement": 0.995})
    assert ok
    met, reasons = Budget(max_rel_l2=0.1).check({"rel_l2": 0.2, "top1_agreement": 1.0})
    assert not met and "relative L2" in reasons[0]
    met, reasons = Budget(max_accuracy_drop=0.5).check({"rel_l2": 0.0, "top1_agreement": 1.0})
    assert not met and "labels" in reasons[0]
    # no top-1 (not class scores): held to the default relative error, never unchecked
    assert not Budget().check({"rel_l2": 0.2, "top1_agreement": None})[0]
    with pytest.raises(ValueError):
        Budget(min_top1_agreement=99)


def test_cpu_features_is_json():
    features = cpu_features()
    assert features["int8"] in {"amx", "vnni", "dotprod", "none"}
    json.dumps(features)


def test_session_options_turn_spinning_off():
    options = session_options(2)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2
    assert (
        session_options(spinning=True).get_session_config_entry("session.intra_op.allow_spinning")
        == "1"
    )


def test_time_interleaved_pairs_every_round():
    model = conv_act_conv()
    feeds = {"x": np.zeros((2, 3, 8, 8), np.float32)}
    result = time_interleaved({"a": model, "b": model}, feeds, reference="a", rounds=5)
    assert result["a"]["ratio"] == 1.0 and result["b"]["rounds"] == 5
    assert result["b"]["median_ms"] > 0
    assert aa_ratio(model, feeds, rounds=4) > 0
    assert aa_ratio(model, feeds, rounds=4, creation_orders=False, spinning=True) > 0


@pytest.mark.parametrize("count", [3, 4, 5])
def test_run_orders_every_place_equally_and_no_repeat_across_rounds(count):
    orders = run_orders(count, 4 * count)
    assert all(sorted(o) == list(range(count)) for o in orders)
    for session in range(count):
        places = [o.index(session) for o in orders]
        assert all(places.count(p) == 4 for p in range(count))
    assert all(a[-1] != b[0] for a, b in zip(orders[:-1], orders[1:], strict=True))
    # both neighbours: session 0 runs right after 1 in some rounds and after count-1 in others
    before = {o[o.index(0) - 1] for o in orders if o.index(0) > 0}
    assert {1, count - 1} <= before


def test_run_orders_two_sessions_alternate():
    assert run_orders(2, 4) == [[0, 1], [1, 0], [0, 1], [1, 0]]
