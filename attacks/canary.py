"""Empirical lower bound on ε from a one-run canary membership audit.

Paper: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv 2305.08846.

Why: an accountant's ε is an upper bound that holds only if the implementation is right.
Inserting m canaries, each included in training independently with probability 1/2, and
then guessing from the trained model which ones were included, gives a *lower* bound from a
single training run: if the guesses are right more often than (ε, δ)-DP allows, the
mechanism cannot be (ε, δ)-DP. A lower bound far below the accountant's ε is expected (the
audit is not tight in one run); one above it means a bug.

What:

- :func:`guess` turns membership scores into guesses: +1 (member) for the ``k_pos`` highest,
  -1 (non-member) for the ``k_neg`` lowest, 0 (abstain) for the rest.
- :func:`p_value` bounds the probability, under (ε, δ)-DP, of at least ``v`` correct out of
  ``r`` guesses. For δ = 0 it is the tail P[Binomial(r, e^ε/(1+e^ε)) ≥ v] (the paper's main
  theorem: correct guesses are stochastically dominated by that binomial). For δ > 0 the
  paper's δ-extension adds ``2 m δ · max_{1≤i≤v} P[v-i ≤ Binomial < v] / i``; this is the
  p-value its Appendix algorithm computes, so δ costs at most ``2 m δ`` of the p-value.
- :func:`epsilon_lower_bound` bisects over ε for the largest ε whose p-value is still below
  ``1 - confidence``: with probability ``confidence`` the mechanism is not (ε', δ)-DP for any
  ε' up to the returned value. The returned value is always a rejected ε (or 0.0), so
  bisection error only ever makes the bound smaller, never invalid.
- :func:`audit` runs both and adds the attack's TPR at 0.1 % and 1 % FPR (ROC of the raw
  scores against true membership), the usual low-FPR view of membership inference.

Anchor: 1000 canaries, 100 guesses all correct, δ = 1e-5, 95 % confidence give ε ≥ 3.4654,
which rounds to the 3.47 quoted for this setting (3.4930 with δ = 0, where the closed form is
ε = logit(0.05^(1/100)); δ lowers it by raising the p-value by 2 m δ · 0.2 ≈ 0.004).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import expit
from scipy.stats import binom

_BISECTION_TOL = 1e-9
_EPSILON_CAP = 128.0  # e^ε/(1+e^ε) is 1.0 in floating point long before this
_FPR_SLACK = 1e-12  # so that e.g. 1 false positive in 1000 counts as FPR <= 0.001


@dataclass(frozen=True)
class CanaryAudit:
    """Result of one canary audit.

    ``epsilon_lower_bound`` holds with the audit's confidence at its δ. The TPRs are the
    largest true-positive rates of "member if score ≥ t" over thresholds t whose
    false-positive rate is at most 0.1 % and 1 % (NaN if a class is empty).
    """

    num_canaries: int
    num_guesses: int
    num_correct: int
    epsilon_lower_bound: float
    tpr_at_0_1pct_fpr: float
    tpr_at_1pct_fpr: float


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    """Reject counts outside 0 <= correct <= guesses <= canaries."""
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            "need 0 <= num_correct <= num_guesses <= num_canaries, got "
            f"{num_correct}, {num_guesses}, {num_canaries}"
        )


def _delta_term(num_guesses: int, num_correct: int, q: float) -> float:
    """``max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i``, the factor of 2 m δ."""
    if num_correct == 0:
        return 0.0
    below = binom.pmf(np.arange(num_correct - 1, -1, -1), num_guesses, q)
    return float(np.max(np.cumsum(below) / np.arange(1, num_correct + 1)))


def p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
            delta: float) -> float:
    """Upper bound on P[at least ``num_correct`` correct guesses] under (ε, δ)-DP."""
    _check_counts(num_canaries, num_guesses, num_correct)
    q = float(expit(epsilon))  # accuracy of ε-DP randomized response
    tail = float(binom.sf(num_correct - 1, num_guesses, q))
    if delta == 0:
        return min(1.0, tail)
    extra = 2 * num_canaries * delta * _delta_term(num_guesses, num_correct, q)
    return min(1.0, tail + extra)


def _largest_rejected(rejected: Callable[[float], bool]) -> float:
    """Bisection for the boundary of ``rejected`` on [0, 128], returning a rejected ε (or 0)."""
    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # p_value reaches 1 once q rounds to 1 (ε near 37)
        if hi >= _EPSILON_CAP:
            return hi
        lo, hi = hi, 2 * hi
    while hi - lo > _BISECTION_TOL:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def epsilon_lower_bound(num_canaries: int, num_guesses: int, num_correct: int,
                        delta: float = 1e-5, confidence: float = 0.95) -> float:
    """Largest ε rejected at level ``1 - confidence`` by :func:`p_value` (bisection).

    0.0 when even ε = 0 is not rejected (e.g. no correct guesses, or accuracy consistent
    with chance). The search stops at ε = 128 (never reached: by then the p-value is 1).
    """
    _check_counts(num_canaries, num_guesses, num_correct)
    if not 0.0 <= delta <= 1.0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need delta in [0, 1], confidence in (0, 1): {delta}, {confidence}")

    def rejected(eps: float) -> bool:
        return p_value(num_canaries, num_guesses, num_correct, eps, delta) < 1.0 - confidence

    return _largest_rejected(rejected)


def _as_scores(scores: np.ndarray) -> np.ndarray:
    """``scores`` as a finite 1-D float array (NaN would make the ranking arbitrary)."""
    array = np.asarray(scores, dtype=float)
    if array.ndim != 1 or not np.all(np.isfinite(array)):
        raise ValueError("scores must be a 1-D array of finite numbers")
    return array


def _check_guess_counts(num_canaries: int, k_pos: int, k_neg: int) -> None:
    """Reject negative guess counts or more guesses than canaries."""
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > num_canaries:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= {num_canaries}")


def guess(scores: np.ndarray, k_pos: int, k_neg: int) -> np.ndarray:
    """+1 for the ``k_pos`` highest scores, -1 for the ``k_neg`` lowest, 0 elsewhere.

    Ties are broken by position, deterministically: canaries are ranked by (score, index),
    so among equal scores the later index ranks higher (is guessed member first) and the
    earlier index ranks lower (is guessed non-member first).
    """
    array = _as_scores(scores)
    _check_guess_counts(len(array), k_pos, k_neg)
    order = np.argsort(array, kind="stable")
    guesses = np.zeros(len(array), dtype=np.int64)
    guesses[order[:k_neg]] = -1
    guesses[order[len(array) - k_pos :]] = 1
    return guesses


def _roc_vertices(scores: np.ndarray, members: np.ndarray, positives: int,
                  negatives: int) -> tuple[np.ndarray, np.ndarray]:
    """(TPR, FPR) of "member if score ≥ t" at every distinct score t, highest t first."""
    order = np.argsort(-scores, kind="stable")
    ranked, labels = scores[order], members[order]
    last_of_tie = np.append(ranked[1:] != ranked[:-1], True)
    return (np.cumsum(labels)[last_of_tie] / positives,
            np.cumsum(~labels)[last_of_tie] / negatives)


def tpr_at_fpr(scores: np.ndarray, included: np.ndarray, fpr: float) -> float:
    """Largest TPR of "member if score ≥ t" over thresholds with FPR at most ``fpr``.

    Only achievable operating points count: canaries with equal scores cross the threshold
    together (no interpolation between ROC vertices), so the value is never optimistic.
    NaN when there are no members or no non-members.
    """
    array, members = _as_scores(scores), np.asarray(included, dtype=bool)
    positives, negatives = int(members.sum()), int((~members).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    tpr, false_rate = _roc_vertices(array, members, positives, negatives)
    allowed = tpr[false_rate <= fpr + _FPR_SLACK]
    return float(allowed.max()) if allowed.size else 0.0


def audit(scores: np.ndarray, included: np.ndarray, k_pos: int, k_neg: int,
          delta: float = 1e-5, confidence: float = 0.95) -> CanaryAudit:
    """Guess membership from ``scores``, count correct guesses and bound ε from below.

    Valid only as the paper requires: ``included`` drawn independently with probability 1/2
    per canary before training, and ``scores`` computed from the trained model alone.
    """
    members = np.asarray(included, dtype=bool)
    if members.shape != np.shape(scores):
        raise ValueError("scores and included must have the same shape")
    guesses = guess(scores, k_pos, k_neg)
    correct = int(np.sum(guesses == np.where(members, 1, -1)))
    return CanaryAudit(
        num_canaries=len(members),
        num_guesses=k_pos + k_neg,
        num_correct=correct,
        epsilon_lower_bound=epsilon_lower_bound(
            len(members), k_pos + k_neg, correct, delta, confidence
        ),
        tpr_at_0_1pct_fpr=tpr_at_fpr(scores, members, 0.001),
        tpr_at_1pct_fpr=tpr_at_fpr(scores, members, 0.01),
    )
