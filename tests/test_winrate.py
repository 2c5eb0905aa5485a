"""Win rates, their bootstrap intervals, the length-controlled win rate and judge agreement, against values
worked out by hand on small tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prospect.data.formats import Example
from prospect.evaluation.compare import accuracy, finite
from prospect.evaluation.winrate import (
    agreement,
    interval,
    lc_win_rate,
    preferences,
    ranks,
    resamples,
    spearman,
    win_rate,
)


def test_preferences_from_scores_count_ties_half():
    assert preferences([0.2, 0.5, 0.1, -1.0], [0.1, 0.5, 0.3, -2.0]) == [1.0, 0.5, 0.0, 1.0]


def test_win_rate_counts_ties_half():
    result = win_rate([1, 1, 1, 0.5, 0], count=500)
    assert result.rate == pytest.approx(3.5 / 5)
    assert (result.wins, result.ties, result.losses) == (3, 1, 0 + 1)
    all_ties = win_rate([0.5] * 6, count=500)
    assert (all_ties.rate, all_ties.low, all_ties.high, all_ties.ties) == (0.5, 0.5, 0.5, 6)


def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    """Prompts won 1, 1, 1, 0: a resample's win rate is Binomial(4, 3/4) / 4, so P(0) = 1/256 and
    P(<= 1/4) = 13/256 ~ 0.051: the 2.5th percentile is 1/4 and the 97.5th is 1 (P(1) = 81/256)."""
    result = win_rate([1, 1, 1, 0], count=4000, seed=3)
    assert (result.rate, result.low, result.high) == (0.75, 0.25, 1.0)
    # Two prompts, one won: resamples give 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4.
    assert (win_rate([1, 0], count=4000).low, win_rate([1, 0], count=4000).high) == (0.0, 1.0)
    assert (win_rate([1] * 5).low, win_rate([1] * 5).high) == (1.0, 1.0)


def test_bootstrap_interval_approaches_the_normal_one_and_is_seeded():
    prefs = [1.0] * 240 + [0.0] * 160
    result = win_rate(prefs, count=4000, seed=1)
    half_width = 1.96 * math.sqrt(0.6 * 0.4 / 400)  # 0.048
    assert result.low == pytest.approx(0.6 - half_width, abs=0.01)
    assert result.high == pytest.approx(0.6 + half_width, abs=0.01)
    assert win_rate(prefs, count=500, seed=1) == win_rate(prefs, count=500, seed=1)
    assert np.array_equal(resamples(10, 3, 7), resamples(10, 3, 7))
    assert interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))


def test_lc_win_rate_equals_the_raw_rate_when_lengths_are_equal():
    prefs = [1, 1, 0, 0.5, 1, 0, 1, 1]
    lengths = [40] * len(prefs)
    lc = lc_win_rate(prefs, lengths, lengths, count=300)
    raw = win_rate(prefs, count=300)
    assert lc["rate"] == pytest.approx(raw.rate, abs=1e-9)
    assert (lc["low"], lc["high"]) == pytest.approx((raw.low, raw.high), abs=1e-9)
    assert lc["length_coef"] == 0.0


def test_lc_win_rate_discounts_a_planted_length_bias():
    """A judge that only likes length, P(win) = sigmoid(2.5 tanh(diff / sd)), and a model longer than the
    baseline on 80% of 1000 prompts: the raw win rate is 0.70, the LC rate 1/2 within its interval, with a
    positive length coefficient. Mirrored (the judge dislikes length), the LC rate again sits at 1/2 and the
    coefficient turns negative. Where length decides every verdict (separable), the LC rate still moves from
    the raw rate towards 1/2."""
    rng = np.random.default_rng(0)
    diff = np.where(rng.random(1000) < 0.8, rng.integers(5, 60, 1000), -rng.integers(5, 60, 1000))
    likes_length = 1 / (1 + np.exp(-2.5 * np.tanh(diff / diff.std())))
    prefs = list((rng.random(1000) < likes_length).astype(float))
    lengths, base = list(100 + diff), [100] * 1000
    raw, lc = win_rate(prefs).rate, lc_win_rate(prefs, lengths, base, count=200)
    assert raw == pytest.approx(0.7, abs=0.02) and lc["length_coef"] > 1
    assert lc["low"] < 0.5 < lc["high"] and lc["rate"] < raw - 0.1
    mirrored = lc_win_rate([1 - p for p in prefs], lengths, base, count=200)
    assert mirrored["low"] < 0.5 < mirrored["high"] and mirrored["length_coef"] < -1
    separable = [1.0 if d > 0 else 0.0 for d in diff[:50]]
    lc_separable = lc_win_rate(separable, lengths[:50], base[:50], count=50)["rate"]
    assert 0.5 < lc_separable < win_rate(separable).rate


def test_lc_win_rate_keeps_a_preference_unrelated_to_length():
    rng = np.random.default_rng(1)
    prefs = list((rng.random(400) < 0.7).astype(float))
    lengths = list(rng.integers(20, 80, 400))
    lc = lc_win_rate(prefs, lengths, list(rng.integers(20, 80, 400)), count=200)
    assert lc["rate"] == pytest.approx(float(np.mean(prefs)), abs=0.03)


def test_ranks_share_ties_and_spearman_by_hand():
    assert list(ranks([10, 30, 20, 30])) == [0.0, 2.5, 1.0, 2.5]
    assert spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
    assert spearman([3, 1, 2], [1, 30, 20]) == pytest.approx(-1.0)
    # ranks [2, 0, 1, 3] and [2.5, 0.5, 2.5, 0.5]: centred, their products sum to 0.
    assert spearman([1, -1, 0, 2], [0.5, -0.5, 0.5, -0.5]) == pytest.approx(0.0)


def test_agreement_of_two_judges_by_hand():
    """Margins (model - baseline): verdicts agree on prompts 1 and 2, not 3 (tie vs win) nor 4; prompt 5 has
    no verdict from the second judge and is dropped."""
    result = agreement([1.0, -1.0, 0.0, 2.0, 5.0], [0.5, -0.5, 0.5, -0.5, None])
    assert result["verdict_agreement"] == 0.5 and result["prompts"] == 4
    assert result["spearman"] == pytest.approx(0.0)
    same = agreement([0.3, -0.2, 0.1], [3.0, -2.0, 1.0])
    assert same["verdict_agreement"] == 1.0 and same["pearson"] == pytest.approx(1.0)
    assert math.isnan(agreement([0.0, 0.0], [1.0, -1.0])["spearman"])  # a constant judge has no ranking


def test_task_accuracy_by_exact_match_and_json_without_nan():
    prompts = [Example("2 + 3 =", "", None, "", fields={"answer": "5"}) for _ in range(3)]
    assert accuracy(["Answer: 5", "it is 6", "so 2 + 3 = 5"], prompts) == [1.0, 0.0, 1.0]
    assert accuracy(["x"], [Example("hi", "", None, "")]) is None
    assert finite({"a": [math.nan, 1.0], "b": math.inf}) == {"a": [None, 1.0], "b": None}
