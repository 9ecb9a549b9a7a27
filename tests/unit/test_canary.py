"""Tests for attacks.canary: the one-run ε lower bound, guesses and the audit.

The anchor is the setting quoted for Steinke, Nasr and Jagielski (arXiv 2305.08846):
1000 canaries, 100 guesses, all correct, δ = 1e-5, 95 % confidence -> ε ≥ 3.47. This
implementation gives 3.4654 (3.4930 with δ = 0, equal to the closed form
logit(0.05^(1/100))); the quoted value has two decimals, so it is checked to ±0.005.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logit
from scipy.stats import binom

from attacks.canary import (
    CanaryAudit,
    audit,
    epsilon_lower_bound,
    guess,
    p_value,
    tpr_at_fpr,
)


def _perfect_closed_form(num_guesses: int, confidence: float) -> float:
    """δ = 0, all r guesses correct: reject ε while q^r < 1 - confidence, q = e^ε/(1+e^ε)."""
    if num_guesses == 0:
        return 0.0
    return max(0.0, float(logit((1 - confidence) ** (1 / num_guesses))))


def test_anchor_1000_canaries_100_correct_guesses() -> None:
    bound = epsilon_lower_bound(1000, 100, 100, delta=1e-5, confidence=0.95)
    assert bound == pytest.approx(3.47, abs=0.005)
    assert bound == pytest.approx(3.4654, abs=1e-4)
    assert p_value(1000, 100, 100, bound, 1e-5) < 0.05  # the reported ε is itself rejected


@pytest.mark.parametrize("num_guesses", [1, 10, 100, 1000])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_delta_zero_matches_closed_form(num_guesses: int, confidence: float) -> None:
    bound = epsilon_lower_bound(5000, num_guesses, num_guesses, delta=0.0, confidence=confidence)
    assert bound == pytest.approx(_perfect_closed_form(num_guesses, confidence), abs=1e-6)
    assert _perfect_closed_form(100, 0.95) == pytest.approx(3.4930, abs=1e-4)


def test_delta_costs_at_most_two_m_delta_of_the_p_value() -> None:
    for eps in (0.0, 0.5, 2.0, 3.5):
        exact = binom.sf(79, 100, 1 / (1 + math.exp(-eps)))  # P[Binomial >= 80]
        assert p_value(1000, 100, 80, eps, 0.0) == pytest.approx(exact)
        with_delta = p_value(1000, 100, 80, eps, 1e-5)
        assert exact <= with_delta <= exact + 2 * 1000 * 1e-5


def test_no_evidence_gives_zero() -> None:
    assert epsilon_lower_bound(1000, 100, 0) == 0.0
    assert epsilon_lower_bound(1000, 0, 0) == 0.0
    assert epsilon_lower_bound(1000, 100, 50) == 0.0  # chance level
    assert epsilon_lower_bound(1000, 100, 60) > 0.0  # 2 standard deviations above chance


@pytest.mark.parametrize(("num_canaries", "num_guesses"), [(1000, 100), (1000, 1000), (50, 20)])
def test_more_correct_guesses_never_lower_the_bound(num_canaries: int, num_guesses: int) -> None:
    bounds = [epsilon_lower_bound(num_canaries, num_guesses, v)
              for v in range(num_guesses + 1)]
    assert all(a <= b for a, b in pairwise(bounds))
    assert bounds[-1] > bounds[num_guesses // 2] == 0.0


@pytest.mark.parametrize("guessed_fraction", [0.1, 1.0])
def test_more_canaries_at_same_accuracy_raise_the_bound(guessed_fraction: float) -> None:
    bounds = []
    for m in (100, 200, 500, 1000, 2000, 5000, 10000):
        r = int(m * guessed_fraction)
        bounds.append(epsilon_lower_bound(m, r, int(0.9 * r)))
    assert all(a < b for a, b in pairwise(bounds))


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 3000), data=st.data(),
       delta=st.sampled_from([0.0, 1e-6, 1e-5, 1e-3]),
       confidence=st.sampled_from([0.9, 0.95, 0.99]))
def test_bound_never_exceeds_perfect_guessing(m: int, data: st.DataObject, delta: float,
                                              confidence: float) -> None:
    r = data.draw(st.integers(0, min(m, 500)))
    v = data.draw(st.integers(0, r))
    bound = epsilon_lower_bound(m, r, v, delta, confidence)
    assert 0.0 <= bound <= epsilon_lower_bound(m, r, r, delta, confidence) + 1e-9
    assert bound <= _perfect_closed_form(r, confidence) + 1e-9
    if bound > 0:
        assert p_value(m, r, v, bound, delta) < 1 - confidence


def test_coin_flip_guesses_give_small_bounds() -> None:
    for seed in range(40):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = rng.normal(size=1000)  # carries no membership signal
        for k in (50, 500):
            result = audit(scores, included, k, k)
            assert result.epsilon_lower_bound < 0.5, (seed, k, result)


def test_invalid_arguments_raise() -> None:
    for args in [(10, 11, 0), (10, 5, 6), (10, 5, -1)]:
        with pytest.raises(ValueError):
            epsilon_lower_bound(*args)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 5, delta=-0.1)
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 5, 5, confidence=1.0)


def test_guess_hand_cases() -> None:
    scores = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    assert guess(scores, 2, 1).tolist() == [0, 1, -1, 0, 1]
    assert guess(scores, 0, 0).tolist() == [0] * 5
    assert guess(scores, 5, 0).tolist() == [1] * 5
    assert guess(scores, 2, 3).tolist() == [-1, 1, -1, -1, 1]


def test_guess_breaks_ties_by_position() -> None:
    # ranked by (score, index): among equal scores the later index ranks higher
    assert guess(np.ones(4), 1, 1).tolist() == [-1, 0, 0, 1]
    assert guess(np.array([2.0, 1.0, 2.0, 1.0]), 1, 1).tolist() == [0, -1, 1, 0]
    assert guess(np.array([2.0, 1.0, 2.0, 1.0]), 2, 0).tolist() == [1, 0, 1, 0]
    scores = np.tile([0.0, 1.0], 50)  # long enough for unstable sorts to reorder ties
    expected = np.zeros(100, dtype=int)
    expected[[0, 2, 4]], expected[[95, 97, 99]] = -1, 1
    assert guess(scores, 3, 3).tolist() == expected.tolist()


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), np.ones((2, 2))])
def test_guess_rejects_bad_scores(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        guess(bad, 1, 0)


def test_guess_rejects_bad_counts() -> None:
    for k_pos, k_neg in [(3, 0), (2, 1), (-1, 0)]:
        with pytest.raises(ValueError):
            guess(np.zeros(2), k_pos, k_neg)


def test_tpr_at_low_fpr_hand_case() -> None:
    # members 10, 9, 8, 1; non-members: one at 9.5, five at 5, 994 at 0.
    # t = 8: TP 3, FP 1 (FPR 0.001) -> TPR 0.75 is the best at 0.1 % FPR.
    # t = 1: TP 4, FP 6 (FPR 0.006) -> TPR 1.0 at 1 % FPR.
    scores = np.array([10.0, 9.0, 8.0, 1.0, 9.5] + [5.0] * 5 + [0.0] * 994)
    included = np.arange(len(scores)) < 4
    assert tpr_at_fpr(scores, included, 0.001) == 0.75
    assert tpr_at_fpr(scores, included, 0.01) == 1.0
    assert tpr_at_fpr(scores, included, 0.0) == 0.25  # only 10.0 outranks every non-member


def test_tpr_counts_tied_scores_together() -> None:
    # a member and a non-member tied at the top cannot be separated by any threshold
    scores, included = np.array([1.0, 1.0, 0.0]), np.array([True, False, True])
    assert tpr_at_fpr(scores, included, 0.0) == 0.0
    assert math.isnan(tpr_at_fpr(scores, np.ones(3, dtype=bool), 0.01))


def test_audit_of_a_perfect_attack() -> None:
    included = np.arange(1000) % 2 == 0
    scores = included.astype(float) + np.linspace(0, 0.5, 1000)
    result = audit(scores, included, 50, 50)
    assert result == CanaryAudit(1000, 100, 100, pytest.approx(3.4654, abs=1e-4), 1.0, 1.0)
    with pytest.raises(ValueError):
        audit(scores, included[:10], 5, 5)
