"""Scoring of gradient-inversion reconstructions of one batch of text records.

Why: an inversion attack on a client's update returns a batch of reconstructed texts in no
particular order. Judging it needs (a) a one-to-one pairing of reconstructions with the true
records, (b) per-record scores of how much of each record came back, and (c) batch and run
summaries with confidence intervals, so that small audits do not over-claim. This module is
the only place that sees the ground truth; attacks only produce :class:`Reconstruction`.

What:

- **Text overlap**: ROUGE-1, ROUGE-2 (F1 over n-gram multisets) and ROUGE-L (F1 from the
  longest common subsequence) over :func:`words` (lowercased runs of letters and digits).
- **Token overlap**: precision and recall of the reconstructed token ids against the true
  ones, as multisets (a token counts as often as it occurs in both).
- **PII**: a value is *exactly recovered* when it appears verbatim (after whitespace
  normalisation, case-sensitive) in the matched reconstruction; partial recovery of an email
  or phone number is not a leak that can be acted on, so only exact recovery counts.
- **Matching**: :func:`match` pairs reconstructions with truths by the Hungarian algorithm
  (``scipy.optimize.linear_sum_assignment``) maximising total ROUGE-L F1; with unequal counts
  the surplus stays unmatched and an unmatched true record scores zero.
- **Order invariance**: :func:`score_batch` puts both lists in a canonical order (by content)
  before matching, so shuffling either list permutes the per-record scores but never changes
  them, even when several assignments tie.
- **Summaries**: :func:`summarize` reports the pooled PII exact-recovery rate with a Wilson
  score interval and every other metric's mean with a percentile bootstrap interval.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_METRICS = ("token_precision", "token_recall", "rouge1", "rouge2", "rougeL")
_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class Truth:
    """One true record of the attacked batch: its text, token ids and PII values in it."""

    text: str
    token_ids: tuple[int, ...]
    pii: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reconstruction:
    """One record as recovered by an attack: decoded text and token ids."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class SampleScore:
    """Scores of one true record against its matched reconstruction (zeros if unmatched)."""

    pii_total: int
    pii_exact: int
    token_precision: float
    token_recall: float
    rouge1: float
    rouge2: float
    rougeL: float  # the metric's usual name


def words(text: str) -> list[str]:
    """Lowercased runs of letters and digits: the word tokens ROUGE is computed on."""
    return _WORD.findall(text.lower())


def _f1(overlap: int, n_candidate: int, n_reference: int) -> float:
    """F1 of an overlap count; 0.0 when either side is empty or nothing overlaps."""
    if overlap == 0 or n_candidate == 0 or n_reference == 0:
        return 0.0
    precision, recall = overlap / n_candidate, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def _multiset_overlap(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Size of the multiset intersection of ``a`` and ``b`` (each item at most min count)."""
    return sum((Counter(a) & Counter(b)).values())


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """All contiguous n-grams of ``tokens``, in order, with repeats."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def rouge_n(candidate: Sequence[str], reference: Sequence[str], n: int) -> float:
    """ROUGE-N F1 of two token lists over their n-gram multisets.

    0.0 when either list has no n-gram (e.g. is shorter than ``n``): an attack gets no credit
    from emptiness.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cand, ref = _ngrams(candidate, n), _ngrams(reference, n)
    return _f1(_multiset_overlap(cand, ref), len(cand), len(ref))


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of ``a`` and ``b`` (O(len a * len b) DP)."""
    if len(b) > len(a):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1: LCS length over candidate (precision) and reference (recall) lengths."""
    return _f1(lcs_length(candidate, reference), len(candidate), len(reference))


def token_precision_recall(
    candidate_ids: Sequence[int], true_ids: Sequence[int]
) -> tuple[float, float]:
    """Multiset precision and recall of reconstructed token ids against the true ones.

    Each id counts at most as often as it occurs in both lists. An empty candidate has
    precision 0.0 and an empty truth has recall 0.0 (no credit from emptiness), so two empty
    lists score (0.0, 0.0).
    """
    overlap = _multiset_overlap(candidate_ids, true_ids)
    precision = overlap / len(candidate_ids) if candidate_ids else 0.0
    recall = overlap / len(true_ids) if true_ids else 0.0
    return precision, recall


def _normalize_whitespace(text: str) -> str:
    """Runs of whitespace collapsed to one space, ends stripped."""
    return " ".join(text.split())


def pii_recovered(text: str, values: Sequence[str]) -> list[bool]:
    """For each PII value, whether it appears verbatim in ``text``.

    Exact recovery is the metric reported for PII leakage from gradients: a partially
    recovered email or card number cannot be used, so near misses do not count. Only
    whitespace is normalised (decoders differ in spacing); case is kept. A value that is
    empty after normalisation is a ground-truth error and raises ``ValueError``.
    """
    haystack = _normalize_whitespace(text)
    needles = [_normalize_whitespace(value) for value in values]
    if not all(needles):
        raise ValueError("PII values must contain non-whitespace characters")
    return [needle in haystack for needle in needles]


def _canonical_order(keys: Sequence[tuple]) -> list[int]:
    """Indices that sort ``keys`` (stable), so equal keys keep their relative order."""
    return sorted(range(len(keys)), key=keys.__getitem__)


def match(reconstructions: Sequence[str], truths: Sequence[str]) -> list[tuple[int, int]]:
    """Optimal one-to-one pairs ``(reconstruction index, truth index)`` of one batch.

    Maximises the total ROUGE-L F1 over :func:`words` (Hungarian algorithm). With unequal
    counts, ``min(len)`` pairs are returned and the rest stay unmatched. Both lists are
    sorted by text before solving, so the pairing of distinct texts does not depend on the
    order they came in. Pairs are sorted by reconstruction index.
    """
    if not reconstructions or not truths:
        return []
    r_order = _canonical_order([(t,) for t in reconstructions])
    t_order = _canonical_order([(t,) for t in truths])
    r_words = [words(reconstructions[i]) for i in r_order]
    t_words = [words(truths[j]) for j in t_order]
    similarity = np.array([[rouge_l(r, t) for t in t_words] for r in r_words])
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return sorted((r_order[i], t_order[j]) for i, j in zip(rows, cols, strict=True))


def _score_pair(recon: Reconstruction, truth: Truth) -> SampleScore:
    """Scores of one true record against the reconstruction matched to it."""
    cand, ref = words(recon.text), words(truth.text)
    precision, recall = token_precision_recall(recon.token_ids, truth.token_ids)
    return SampleScore(
        pii_total=len(truth.pii),
        pii_exact=sum(pii_recovered(recon.text, truth.pii)),
        token_precision=precision,
        token_recall=recall,
        rouge1=rouge_n(cand, ref, 1),
        rouge2=rouge_n(cand, ref, 2),
        rougeL=rouge_l(cand, ref),
    )


def _unmatched(truth: Truth) -> SampleScore:
    """Score of a true record no reconstruction was matched to: nothing recovered."""
    return SampleScore(len(truth.pii), 0, 0.0, 0.0, 0.0, 0.0, 0.0)


def score_batch(
    recons: Sequence[Reconstruction], truths: Sequence[Truth]
) -> list[SampleScore]:
    """One :class:`SampleScore` per true record, in the order of ``truths``.

    Reconstructions are paired with truths by :func:`match`; true records left unmatched
    score zero. Both lists are first put in a canonical content order, so that the scores
    are the same (up to the order of ``truths``) however either list is shuffled.
    """
    r_order = _canonical_order([(r.text, r.token_ids) for r in recons])
    t_order = _canonical_order([(t.text, t.token_ids, t.pii) for t in truths])
    pairs = match([recons[i].text for i in r_order], [truths[j].text for j in t_order])
    scores = [_unmatched(truth) for truth in truths]
    for i, j in pairs:
        recon, truth_index = recons[r_order[i]], t_order[j]
        scores[truth_index] = _score_pair(recon, truths[truth_index])
    return scores


def _z(confidence: float) -> float:
    """Two-sided standard normal quantile for a ``confidence`` interval."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (NaNs when there are no trials).

    Preferred to the normal (Wald) interval because it stays inside [0, 1] and keeps its
    coverage for proportions near 0 or 1, which is where exact PII recovery rates live.
    """
    z = _z(confidence)
    if trials == 0:
        return math.nan, math.nan
    p, z2 = successes / trials, z * z
    centre = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z / (1 + z2 / trials) * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials**2))
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, free of rounding
    hi = 1.0 if successes == trials else min(1.0, centre + half)
    return lo, hi


def _bootstrap(values: np.ndarray, indices: np.ndarray, confidence: float) -> dict[str, float]:
    """Mean of ``values`` and the percentile interval of its bootstrap resample means."""
    means = values[indices].mean(axis=1)
    tail = (1 - confidence) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return {"mean": float(values.mean()), "lo": float(lo), "hi": float(hi), "n": len(values)}


def summarize(
    samples: Sequence[SampleScore], confidence: float = 0.95, seed: int = 0
) -> dict[str, dict]:
    """Mean and ``confidence`` interval of each metric over per-record scores.

    ``pii_exact`` is the exact-recovery rate pooled over all PII values (``n`` = number of
    values) with a Wilson score interval. Every other metric gets a percentile bootstrap
    over records (``n`` = number of records; 2000 resamples from
    ``numpy.random.default_rng(seed)``, the same resamples for all metrics). Statistics of
    an empty population are NaN.
    """
    _z(confidence)
    found, total = sum(s.pii_exact for s in samples), sum(s.pii_total for s in samples)
    lo, hi = wilson_interval(found, total, confidence)
    rate = found / total if total else math.nan
    summary = {"pii_exact": {"mean": rate, "lo": lo, "hi": hi, "n": total}}
    if not samples:
        empty = {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
        return summary | {name: dict(empty) for name in BOOTSTRAP_METRICS}
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(samples), size=(BOOTSTRAP_RESAMPLES, len(samples)))
    for name in BOOTSTRAP_METRICS:
        values = np.array([getattr(s, name) for s in samples], dtype=float)
        summary[name] = _bootstrap(values, indices, confidence)
    return summary

