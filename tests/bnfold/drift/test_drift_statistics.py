"""statistics: pooled moments, the standardized W2 distance, the population estimate."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.drift.statistics import (
    ChannelMoments,
    population_statistics,
    robust_mean,
    site_score,
    w2_standardized,
)


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5),
    channels=st.integers(1, 4),
    spatial=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_pooled_moments_equal_moments_of_all_values(sizes, channels, spatial, seed):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(3, 2, (n, channels, spatial)) for n in sizes]
    pooled = ChannelMoments.pool(
        ChannelMoments.of(p.mean(axis=(0, 2)), p.var(axis=(0, 2)), p.shape[0] * spatial)
        for p in parts
    )
    everything = np.concatenate(parts)
    direct = ChannelMoments.of_values(everything)
    assert pooled.count == direct.count == everything.shape[0] * spatial
    np.testing.assert_allclose(pooled.mean, everything.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(pooled.var, everything.var(axis=(0, 2)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(direct.var, pooled.var, rtol=1e-10, atol=1e-12)


def test_w2_is_zero_for_the_training_distribution_and_counts_standard_deviations():
    mean_r, var_r = np.array([1.0, -2.0]), np.array([4.0, 0.25])
    np.testing.assert_allclose(w2_standardized(mean_r, var_r, mean_r, var_r, 0.0), 0.0)
    # the mean moved by one training std: distance 1
    np.testing.assert_allclose(
        w2_standardized(mean_r + np.sqrt(var_r), var_r, mean_r, var_r, 0.0), 1.0
    )
    # the std doubled: distance (2s - s) / s = 1
    np.testing.assert_allclose(w2_standardized(mean_r, 4 * var_r, mean_r, var_r, 0.0), 1.0)
    # both: sqrt(1 + 1)
    np.testing.assert_allclose(
        w2_standardized(mean_r + np.sqrt(var_r), 4 * var_r, mean_r, var_r, 0.0), np.sqrt(2)
    )


def test_site_score_averages_channels():
    window = ChannelMoments.of(np.array([1.0, 0.0]), np.array([1.0, 1.0]), 10)
    assert site_score(window, np.zeros(2), np.ones(2), 0.0) == pytest.approx(0.5)


def test_robust_mean_is_the_median_of_sites():
    assert robust_mean([0.1, 0.2, 5.0]) == pytest.approx(0.2)
    assert robust_mean([]) == 0.0


def test_population_statistics_is_the_bn_paper_estimate():
    # the example of tests/bnfold/test_recalibrate.py: batches [0, 2] and [0, 4], m = 2
    mean, var = population_statistics(
        [np.array([1.0]), np.array([2.0])], [np.array([1.0]), np.array([4.0])], [2, 2]
    )
    np.testing.assert_allclose(mean, [1.5])
    np.testing.assert_allclose(var, [(1.0 + 4.0) / 2 * 2 / 1])


def test_population_statistics_refuses_a_batch_without_variance():
    with pytest.raises(ValueError, match="no variance"):
        population_statistics([np.zeros(2)], [np.zeros(2)], [1])
    with pytest.raises(ValueError, match="at least one batch"):
        population_statistics([], [], [])
