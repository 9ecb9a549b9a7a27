"""Which client updates a robust Flower strategy left out of a round, and why.

Krum, MultiKrum, Bulyan, FedMedian and FedTrimmedAvg drop or trim client updates inside
their ``aggregate_train`` without saying whose. So that every exclusion can be traced to
a node (and, through :class:`strategies.decoding.DecodingStrategy`, to its data
partition), this module re-derives the decision from the same reply contents, with
Flower's own helpers where they exist (``compute_distances``, ``select_multikrum``, the
strategy's ``selection_rule``, ``beta``, ...). The strategies themselves run unchanged.

An explainer is registered per strategy class and found through the class hierarchy
(Krum is a MultiKrum). It returns, aligned with the contents, a reason for every
excluded update and None for the others:

- Krum / MultiKrum: the updates not among the ``num_nodes_to_select`` lowest Krum
  scores, with their score and the highest selected one.
- Bulyan: the updates outside its selection set (``n - 2f`` by its selection rule).
- FedTrimmedAvg / FedMedian act per coordinate, so no update is dropped as a whole: an
  update counts as excluded when at least ``EXCLUDE_FRACTION`` of its coordinates fall
  outside the band the rule keeps (trimmed mean: all but the ``int(beta*n)`` lowest and
  highest values; median: the middle half, i.e. all but the ``max(1, n//4)`` lowest and
  highest — the median itself keeps only one or two values per coordinate, which would
  flag every honest client). Values tied with a kept value count as kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from flwr.serverapp import strategy as fs
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

# An update trimmed at this fraction of its coordinates or more is reported as excluded.
EXCLUDE_FRACTION = 0.5

Reasons = list[str | None]
Explainer = Callable[[Any, Sequence[RecordDict]], Reasons]
_EXPLAINERS: dict[type, Explainer] = {}


def explains(cls: type) -> Callable[[Explainer], Explainer]:
    """Register the decorated function as the explainer of strategy class ``cls``."""

    def add(fn: Explainer) -> Explainer:
        _EXPLAINERS[cls] = fn
        return fn

    return add


def explain(strategy: Any, contents: Sequence[RecordDict]) -> Reasons:
    """Reason per excluded update (None if kept), aligned with ``contents``; all None
    for strategies without an explainer. Call it before the strategy aggregates: Flower's
    median, trimmed mean and Bulyan consume the reply arrays while aggregating."""
    found = next((_EXPLAINERS[c] for c in type(strategy).__mro__ if c in _EXPLAINERS), None)
    return found(strategy, contents) if found and contents else [None] * len(contents)


def _arrays(content: RecordDict) -> ArrayRecord:
    """The first ArrayRecord of a reply, as Flower's strategies take it."""
    return next(iter(content.array_records.values()))


def krum_scores(contents: Sequence[RecordDict], f: int) -> np.ndarray:
    """Krum score of each update, as Flower's ``select_multikrum`` ranks them: the sum
    of squared distances to its ``max(1, n - f - 2)`` nearest other updates."""
    dist = compute_distances([_arrays(c) for c in contents])
    k = max(1, len(contents) - f - 2)
    return np.sort(dist, axis=1)[:, 1:k + 1].sum(axis=1)


def _not_selected(contents: Sequence[RecordDict], selected: Sequence[RecordDict],
                  what: str, scores: np.ndarray | None, tail: str) -> Reasons:
    """Reasons for the contents that are not (by identity) among ``selected``, with their
    Krum score next to the highest selected one when ``scores`` are given."""
    ids = {id(s) for s in selected}
    kept = [id(c) in ids for c in contents]
    detail = [""] * len(contents)
    if scores is not None:
        best = max(s for s, k in zip(scores, kept, strict=True) if k)
        label = "selected" if sum(kept) == 1 else "highest selected"
        detail = [f" (Krum score {s:.3g} vs {label} {best:.3g})" for s in scores]
    return [None if k else f"{what}{d}, {tail}" for k, d in zip(kept, detail, strict=True)]


@explains(fs.MultiKrum)
def _multikrum(strategy: Any, contents: Sequence[RecordDict]) -> Reasons:
    """Krum/MultiKrum keep the ``num_nodes_to_select`` updates of lowest Krum score."""
    f, m = strategy.num_malicious_nodes, strategy.num_nodes_to_select
    selected = select_multikrum(list(contents), f, m)
    return _not_selected(contents, selected, f"not among the {m} lowest Krum scores",
                         krum_scores(contents, f), f"n={len(contents)} f={f}")


@explains(fs.Bulyan)
def _bulyan(strategy: Any, contents: Sequence[RecordDict]) -> Reasons:
    """Bulyan averages, per coordinate, within the ``n - 2f`` updates its selection rule
    picks; the others are out. With fewer than ``4f + 3`` updates it skips the round."""
    n, f, rule = len(contents), strategy.num_malicious_nodes, strategy.selection_rule
    if n < 4 * f + 3:
        return [None] * n
    theta = n - 2 * f
    scores = krum_scores(contents, f) if rule is select_multikrum else None
    return _not_selected(contents, rule(list(contents), f, theta),
                         f"not among the {theta} updates Bulyan's {rule.__name__} keeps",
                         scores, f"n={n} f={f}")


def trimmed_fractions(contents: Sequence[RecordDict], cut: int) -> np.ndarray:
    """Per update, the fraction of coordinates where its value is below the ``cut``-th
    lowest or above the ``cut``-th highest of all updates' values there."""
    records = [_arrays(c) for c in contents]
    outside, total = np.zeros(len(records)), 0
    for name in records[0]:
        stack = np.stack([r[name].numpy().ravel() for r in records])
        ordered = np.sort(stack, axis=0)
        low, high = ordered[cut], ordered[len(records) - 1 - cut]
        outside += ((stack < low) | (stack > high)).sum(axis=1)
        total += stack.shape[1]
    return outside / max(total, 1)


def _trimmed(contents: Sequence[RecordDict], cut: int, band: str) -> Reasons:
    """Reasons for the updates trimmed at ``EXCLUDE_FRACTION`` or more coordinates."""
    if cut <= 0:
        return [None] * len(contents)
    fractions = trimmed_fractions(contents, cut)
    return [f"trimmed at {x:.0%} of coordinates (>= {EXCLUDE_FRACTION:.0%} excludes): "
            f"among the {cut} lowest or {cut} highest of n={len(contents)} values {band}"
            if x >= EXCLUDE_FRACTION else None for x in fractions]


@explains(fs.FedTrimmedAvg)
def _trimmed_mean(strategy: Any, contents: Sequence[RecordDict]) -> Reasons:
    """The trimmed mean drops the ``int(beta*n)`` lowest and highest values per coordinate."""
    cut = int(strategy.beta * len(contents))
    return _trimmed(contents, cut, f"the trimmed mean drops (beta={strategy.beta})")


@explains(fs.FedMedian)
def _median(strategy: Any, contents: Sequence[RecordDict]) -> Reasons:
    """The median keeps the middle value(s); judged against the middle half of ranks."""
    n = len(contents)
    cut = max(1, n // 4) if n >= 3 else 0
    return _trimmed(contents, cut, "(outside the middle half around the median)")
