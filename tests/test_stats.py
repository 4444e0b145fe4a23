"""Bootstrap intervals against hand-computed cases and a simulation of their coverage."""

import numpy as np
import pytest

from sdpo.evaluation.stats import bootstrap_ci, bootstrap_cis, paired_difference


def test_interval_by_hand():
    # Two records, values 0 and 1: a resample's mean is 0, 0.5 or 1 with chances 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([0.0, 1.0], resamples=4000) == [0.0, 1.0]
    # Every record the same: no spread at all.
    assert bootstrap_ci([0.25] * 50) == [0.25, 0.25]
    # 1 hit in 20: the interval holds the point estimate and stays inside [0, 1].
    low, high = bootstrap_ci([1.0] + [0.0] * 19)
    assert low == 0.0 and 0.05 < high <= 0.2


def test_interval_width_matches_the_binomial_standard_error():
    values = np.random.default_rng(1).random(2000) < 0.3
    low, high = bootstrap_ci(values.astype(float))
    se = np.sqrt(0.3 * 0.7 / 2000)
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_coverage_of_the_95_interval_is_about_95_percent():
    """Over 400 simulated test sets (n=200, hit rate 0.3), the interval holds the true rate about 95% of the time."""
    rng = np.random.default_rng(7)
    covered = 0
    for draw in range(400):
        sample = (rng.random(200) < 0.3).astype(float)
        low, high = bootstrap_ci(sample, resamples=1000, seed=draw)
        covered += low <= 0.3 <= high
    assert 0.93 <= covered / 400 <= 0.97


def test_several_columns_share_resamples():
    columns = {"a": [0.0, 1.0, 1.0, 0.0], "b": [0.0, 1.0, 1.0, 0.0]}
    intervals = bootstrap_cis(columns)
    assert intervals["a"] == intervals["b"] == bootstrap_ci(columns["a"])
    with pytest.raises(ValueError, match="different lengths"):
        bootstrap_cis({"a": [1.0], "b": [1.0, 0.0]})


def test_paired_difference_by_hand():
    # Model a hits records 0-3, model b hits records 0-1: a - b is 1 on records 2-3, 0 elsewhere.
    a = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    b = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    result = paired_difference(a, b, resamples=4000)
    assert result["difference"] == pytest.approx(0.2)
    assert result["interval"][0] >= 0.0 and result["interval"][1] <= 0.6
    # The difference is never negative on any record, so no resample is below 0; it is 0 only
    # when neither record 2 nor 3 is drawn: (8/10)^10 = 0.107 of resamples.
    assert result["p_le_0"] == pytest.approx(0.8**10, abs=0.02)
    same = paired_difference(a, a)
    assert same == {"difference": 0.0, "interval": [0.0, 0.0], "p_le_0": 1.0}


def test_pairing_is_narrower_than_two_separate_intervals():
    rng = np.random.default_rng(3)
    a = (rng.random(500) < 0.4).astype(float)
    b = a.copy()
    flip = rng.choice(500, 25, replace=False)  # b differs from a on 25 records only
    b[flip] = 1 - b[flip]
    paired = paired_difference(a, b)["interval"]
    separate = (bootstrap_ci(a)[1] - bootstrap_ci(a)[0]) + (bootstrap_ci(b)[1] - bootstrap_ci(b)[0])
    assert paired[1] - paired[0] < separate / 3
    with pytest.raises(ValueError, match="same records"):
        paired_difference([1.0, 0.0], [1.0])


def test_groups_of_one_record_are_the_record_bootstrap():
    values = (np.random.default_rng(5).random(300) < 0.2).astype(float)
    other = (np.random.default_rng(6).random(300) < 0.3).astype(float)
    assert bootstrap_ci(values, groups=list(range(300))) == pytest.approx(bootstrap_ci(values))
    grouped = paired_difference(values, other, groups=[f"user-{i}" for i in range(300)])
    assert grouped["interval"] == pytest.approx(paired_difference(values, other)["interval"])


def test_group_interval_by_hand():
    # Two users with 3 and 1 records: user a always hits, user b never. A resample draws two users:
    # (a, a) -> 1, (b, b) -> 0, (a, b) or (b, a) -> 3/4 (three hits in four records).
    values, users = [1.0, 1.0, 1.0, 0.0], ["a", "a", "a", "b"]
    assert bootstrap_ci(values, resamples=4000, groups=users) == [0.0, 1.0]
    assert bootstrap_ci(values, resamples=400, level=0.2, groups=users) == [0.75, 0.75]  # the middle fifth of resamples
    # Every user's records agree, so a paired difference inside each user is a sure 0.
    assert paired_difference(values, values, groups=users) == {"difference": 0.0, "interval": [0.0, 0.0], "p_le_0": 1.0}
    with pytest.raises(ValueError, match="3 group labels for 4 records"):
        bootstrap_ci(values, groups=users[:3])


def test_clustered_records_need_the_group_bootstrap():
    """40 users x 20 records, each user with their own hit rate around 0.3: over 300 simulated test sets
    the record bootstrap covers the true rate far less than 95% of the time, the user bootstrap about 95%."""
    rng = np.random.default_rng(11)
    users = np.repeat(np.arange(40), 20)
    covered = {"records": 0, "users": 0}
    for draw in range(300):
        rates = rng.beta(1.5, 3.5, size=40)  # mean 0.3
        sample = (rng.random(800) < rates[users]).astype(float)
        for name, groups in (("records", None), ("users", users)):
            low, high = bootstrap_ci(sample, resamples=1000, seed=draw, groups=groups)
            covered[name] += low <= 0.3 <= high
    assert covered["records"] / 300 < 0.75
    assert 0.90 <= covered["users"] / 300 <= 0.98
