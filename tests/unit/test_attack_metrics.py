"""Tests for attacks.metrics: hand-computed ROUGE, token and PII scores, matching, intervals.

Every expected number is worked out by hand in the comment next to it, so a test checks the
definition rather than the implementation against itself.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks.metrics import (
    Reconstruction,
    SampleScore,
    Truth,
    lcs_length,
    match,
    pii_recovered,
    rouge_l,
    rouge_n,
    score_batch,
    summarize,
    token_precision_recall,
    wilson_interval,
    words,
)

CAT = ["the", "cat", "sat", "on", "the", "mat"]
CAT_REF = ["the", "cat", "is", "on", "the", "mat"]


def test_words_are_lowercase_alphanumeric_runs() -> None:
    text = "Hello, World! e-mail: A.b@x.io snake_case 42"
    assert words(text) == ["hello", "world", "e", "mail", "a", "b", "x", "io", "snake", "case",
                           "42"]
    assert words("  ,;  ") == []


def test_rouge_of_a_known_pair() -> None:
    # unigrams: the x2, cat, on, mat shared -> 5 of 6 each side
    assert rouge_n(CAT, CAT_REF, 1) == pytest.approx(5 / 6)
    # bigrams: "the cat", "on the", "the mat" shared -> 3 of 5 each side
    assert rouge_n(CAT, CAT_REF, 2) == pytest.approx(3 / 5)
    # LCS "the cat on the mat" = 5 of 6 each side
    assert rouge_l(CAT, CAT_REF) == pytest.approx(5 / 6)


def test_rouge_n_clips_repeated_ngrams() -> None:
    # candidate {the: 2, cat: 2}, reference {the: 1, cat: 1}: overlap 2, P = 2/4, R = 2/2
    assert rouge_n(["the", "cat", "the", "cat"], ["the", "cat"], 1) == pytest.approx(2 / 3)


def test_rouge_l_asymmetric_lengths() -> None:
    # LCS of "a c e x" and "a b c d e" is "a c e": P = 3/4, R = 3/5, F1 = 0.9 / 1.35
    assert lcs_length("acex", "abcde") == 3
    assert rouge_l(list("acex"), list("abcde")) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("a", "b", "length"), [
    ("", "abc", 0), ("abc", "abc", 3), ("abcbdab", "bdcaba", 4), ("xyz", "abc", 0),
])
def test_lcs_length_known_values(a: str, b: str, length: int) -> None:
    assert lcs_length(a, b) == length
    assert lcs_length(b, a) == length


def test_rouge_empty_and_too_short_score_zero() -> None:
    assert rouge_n([], ["a"], 1) == 0.0
    assert rouge_n(["a"], ["a"], 2) == 0.0  # no bigram on either side
    assert rouge_l([], []) == 0.0
    assert rouge_n(["a", "b"], ["a", "b"], 2) == 1.0
    with pytest.raises(ValueError):
        rouge_n(["a"], ["a"], 0)


def test_token_precision_recall_over_multisets() -> None:
    # overlap: id 1 min(2, 1) = 1, id 2 min(1, 2) = 1 -> 2; P = 2/4, R = 2/3
    assert token_precision_recall([1, 1, 2, 3], [1, 2, 2]) == pytest.approx((0.5, 2 / 3))
    assert token_precision_recall([5, 6], [6, 5]) == (1.0, 1.0)


def test_token_precision_recall_of_empty_inputs() -> None:
    assert token_precision_recall([], [1, 2]) == (0.0, 0.0)
    assert token_precision_recall([1, 2], []) == (0.0, 0.0)
    assert token_precision_recall([], []) == (0.0, 0.0)


def test_pii_needs_verbatim_match_up_to_whitespace() -> None:
    text = "Call  John\n Smith at 555-0100."
    values = ["John Smith", "555-0100", "john smith", "555-0101", "John\tSmith"]
    assert pii_recovered(text, values) == [True, True, False, False, True]
    assert pii_recovered(text, []) == []
    with pytest.raises(ValueError):
        pii_recovered(text, [" \n"])


def test_hungarian_beats_greedy_on_3x3() -> None:
    truths = ["a b c d", "e f g h", "x y z w"]
    recons = ["a b c d e f g", "a b", "x y z w"]
    # ROUGE-L F1 matrix (recon x truth): r0 = [8/11, 6/11, 0], r1 = [2/3, 0, 0], r2 = [0, 0, 1].
    # Greedy takes r2-t2 (1), then r0-t0 (8/11), leaving r1-t1 (0): total 1.727.
    # Optimal: r0-t1 (6/11) + r1-t0 (2/3) + r2-t2 (1) = 2.212.
    assert match(recons, truths) == [(0, 1), (1, 0), (2, 2)]


def test_match_with_unequal_counts() -> None:
    truths = ["alpha beta", "gamma delta", "epsilon"]
    assert match(["gamma delta"], truths) == [(0, 1)]
    assert match(["zzz", "epsilon", "alpha beta", "gamma"], truths) == [
        (1, 2), (2, 0), (3, 1),  # "gamma" vs "gamma delta": P = 1, R = 1/2, F1 = 2/3
    ]
    assert match([], truths) == []
    assert match(["x"], []) == []


def test_match_breaks_ties_by_text_not_position() -> None:
    # "a" and "b" both score 2/3 against "a b"; the tie goes to the text sorting first
    assert match(["a", "b"], ["a b"]) == [(0, 0)]
    assert match(["b", "a"], ["a b"]) == [(1, 0)]
    assert match(["a b"], ["b", "a"]) == [(0, 1)]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), recons=st.lists(st.sampled_from(["a", "b", "a b", "b c", "c"]),
                                       max_size=5),
       truths=st.lists(st.sampled_from(["a b", "b c", "a c", "c"]), max_size=5))
def test_matched_texts_do_not_depend_on_order(data: st.DataObject, recons: list[str],
                                              truths: list[str]) -> None:
    def text_pairs(r: list[str], t: list[str]) -> Counter[tuple[str, str]]:
        return Counter((r[i], t[j]) for i, j in match(r, t))

    reference = text_pairs(recons, truths)
    assert sum(reference.values()) == min(len(recons), len(truths))
    shuffled_recons = data.draw(st.permutations(recons))
    shuffled_truths = data.draw(st.permutations(truths))
    assert text_pairs(shuffled_recons, shuffled_truths) == reference


def test_score_batch_hand_case() -> None:
    truths = [
        Truth("Alice Smith lives at 12 Oak Road", (1, 2, 3, 4), ("Alice Smith", "12 Oak Road")),
        Truth("card 4111 1111", (7, 8, 9), ("4111 1111",)),
        Truth("never recovered", (11,), ("secret",)),
    ]
    recons = [
        Reconstruction("card 4111 2222", (7, 8, 10)),
        Reconstruction("Alice Smith lives at 12 Oak", (1, 2, 3, 3)),
    ]
    alice, card, missing = score_batch(recons, truths)
    # 6 of 7 words in order: P = 1, R = 6/7 -> F1 = 12/13; bigrams 5 of 6 -> P = 1, R = 5/6
    assert alice == SampleScore(2, 1, 3 / 4, 3 / 4, pytest.approx(12 / 13),
                                pytest.approx(10 / 11), pytest.approx(12 / 13))
    # words card, 4111 shared of 3: 2/3; bigram "card 4111" 1 of 2: 1/2; tokens 2 of 3
    assert card == SampleScore(1, 0, 2 / 3, 2 / 3, pytest.approx(2 / 3), 0.5,
                               pytest.approx(2 / 3))
    assert missing == SampleScore(1, 0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_score_batch_without_reconstructions_scores_zero() -> None:
    truths = [Truth("a b", (1,), ("a",)), Truth("c", (2,), ())]
    assert score_batch([], truths) == [SampleScore(1, 0, 0, 0, 0, 0, 0),
                                       SampleScore(0, 0, 0, 0, 0, 0, 0)]
    assert score_batch([Reconstruction("a b", (1,))], []) == []


_WORDS = st.sampled_from(["alice", "bob", "smith", "555", "oak", "road", "x"])
_TEXT = st.lists(_WORDS, max_size=4).map(" ".join)
_IDS = st.lists(st.integers(0, 5), max_size=4).map(tuple)
_PII = st.lists(st.sampled_from(["alice", "bob smith", "555", "Oak"]), max_size=2).map(tuple)
_TRUTHS = st.lists(st.builds(Truth, _TEXT, _IDS, _PII), max_size=5)
_RECONS = st.lists(st.builds(Reconstruction, _TEXT, _IDS), max_size=5)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), truths=_TRUTHS, recons=_RECONS)
def test_scores_do_not_depend_on_order(data: st.DataObject, truths: list[Truth],
                                       recons: list[Reconstruction]) -> None:
    reference = Counter(score_batch(recons, truths))
    shuffled_recons = data.draw(st.permutations(recons))
    shuffled_truths = data.draw(st.permutations(truths))
    assert Counter(score_batch(shuffled_recons, truths)) == reference
    assert Counter(score_batch(recons, shuffled_truths)) == reference
    assert sum(reference.values()) == len(truths)


def test_wilson_interval_known_values() -> None:
    # 8 of 10 at 95 %: the textbook Wilson interval (0.4902, 0.9433)
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.49016, abs=1e-4), pytest.approx(0.94332, abs=1e-4))
    # 0 of 10: lower end 0, upper end z^2 / (n + z^2) = 3.8415 / 13.8415
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-4))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_wilson_interval_stays_in_unit_range_at_the_ends() -> None:
    # at k = 0 or k = n the bound equals 0 or 1 exactly, and rounding can overshoot it
    for trials in range(1, 400):
        for successes in (0, trials):
            lo, hi = wilson_interval(successes, trials, 0.99)
            assert 0.0 <= lo <= successes / trials <= hi <= 1.0


def _sample(pii_total: int, pii_exact: int, value: float) -> SampleScore:
    return SampleScore(pii_total, pii_exact, value, value, value, value, value)


def test_summarize_pools_pii_with_wilson_interval() -> None:
    samples = [_sample(3, 2, 0.0), _sample(5, 5, 1.0), _sample(2, 1, 0.5), _sample(0, 0, 0.5)]
    pii = summarize(samples)["pii_exact"]
    assert pii["n"] == 10
    assert pii["mean"] == pytest.approx(0.8)
    assert (pii["lo"], pii["hi"]) == pytest.approx(wilson_interval(8, 10))


def test_summarize_bootstrap_interval() -> None:
    values = [1.0] * 50 + [0.0] * 50
    summary = summarize([_sample(0, 0, v) for v in values], seed=3)
    for name in ("token_precision", "token_recall", "rouge1", "rouge2", "rougeL"):
        stats = summary[name]
        assert stats["n"] == 100 and stats["mean"] == 0.5
        assert stats["lo"] < 0.5 < stats["hi"]
        # normal approximation: 0.5 -+ 1.96 * sqrt(0.25 / 100) = 0.402 .. 0.598
        assert stats["lo"] == pytest.approx(0.402, abs=0.02)
        assert stats["hi"] == pytest.approx(0.598, abs=0.02)
    assert summarize([_sample(0, 0, v) for v in values], seed=3) == summary


def test_summarize_constant_and_empty() -> None:
    constant = summarize([_sample(1, 1, 0.25)] * 7)["rougeL"]
    assert constant == {"mean": 0.25, "lo": 0.25, "hi": 0.25, "n": 7}
    empty = summarize([])
    assert set(empty) == {"pii_exact", "token_precision", "token_recall", "rouge1", "rouge2",
                          "rougeL"}
    assert all(math.isnan(stats["mean"]) and stats["n"] == 0 for stats in empty.values())
    with pytest.raises(ValueError):
        summarize([], confidence=1.0)
