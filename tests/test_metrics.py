"""Evaluation statistics (vllm_align.data.metrics) against hand-computed values."""

import math

import pytest

from vllm_align.data.metrics import mean_sem, preference_rate, win_rate


def test_mean_sem():
    # values 1, 2, 3, 6: mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3, SEM sqrt(14/3 / 4)
    n, mean, sem = mean_sem([1.0, 2.0, 3.0, 6.0])
    assert (n, mean) == (4, 3.0)
    assert sem == pytest.approx(math.sqrt(14 / 12))
    assert mean_sem([5.0])[:2] == (1, 5.0) and math.isnan(mean_sem([5.0])[2])
    n, mean, sem = mean_sem([])
    assert n == 0 and math.isnan(mean) and math.isnan(sem)


def test_win_rate_counts_ties_as_no_win():
    a = [3.0, 1.0, 2.0, 2.0, 5.0, 0.0, 4.0, 1.5]
    b = [1.0, 2.0, 2.0, 1.0, 4.0, 0.0, 3.0, 2.5]
    # A > B at 0, 3, 4, 6; equal at 2, 5; A < B at 1, 7.
    w = win_rate(a, b)
    assert (w.n, w.wins, w.ties, w.losses) == (8, 4, 2, 2)
    assert w.rate == 0.5
    assert w.rate_ties_half == (4 + 1) / 8
    assert w.to_json() == {"n": 8, "wins": 4, "ties": 2, "losses": 2, "rate": 0.5,
                           "rate_ties_half": 0.625}
    # Swapping sides swaps wins and losses.
    r = win_rate(b, a)
    assert (r.wins, r.ties, r.losses) == (2, 2, 4)


def test_preference_rate_needs_both_dimensions():
    #            win    lose   tie(r up, c up)  tie(r eq)  win   tie(c eq)  lose
    reward_a = [2.0,   0.0,   3.0,             1.0,       5.0,  4.0,       1.0]
    reward_b = [1.0,   1.0,   1.0,             1.0,       4.0,  3.0,       2.0]
    cost_a = [0.0,     2.0,   2.0,             0.0,       1.0,  1.0,       5.0]
    cost_b = [1.0,     1.0,   1.0,             1.0,       2.0,  1.0,       4.0]
    p = preference_rate(reward_a, reward_b, cost_a, cost_b)
    assert (p.n, p.wins, p.ties, p.losses) == (7, 2, 3, 2)
    assert p.rate == 0.0
    p = preference_rate(reward_a[:5], reward_b[:5], cost_a[:5], cost_b[:5])
    assert (p.wins, p.ties, p.losses) == (2, 2, 1)
    assert p.rate == pytest.approx((2 - 1) / 5)
    assert p.to_json()["rate"] == pytest.approx(0.2)


def test_mismatched_or_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="differ in length"):
        preference_rate([1.0], [1.0], [1.0], [])
    with pytest.raises(ValueError, match="no pairs"):
        win_rate([], [])
