"""Sign-consensus merge (the "elect" and "disjoint merge" steps of TIES-Merging).

What: per coordinate, the sign with the larger total mass among the clients' deltas
wins (the sign of their sum); the new delta there is the mean of only those deltas that
are non-zero and carry the elected sign. A coordinate where no delta agrees (all zero,
or a tie: the sum is exactly 0) stays 0.

Why: ternary and sparse updates (sign compression, top-k) have many zeros and values of
equal size; a plain mean lets zeros dilute the clients that did move a coordinate and
lets opposite signs cancel into a small step nobody asked for. Electing a sign and
averaging the agreeing, non-zero entries keeps the size of the agreed direction.

Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023, arXiv 2306.01708. TIES also trims each delta to its largest entries and
gives a zero sum the majority sign of the whole vector; here trimming is left to the
clients' compression and a tie stays 0.

Deltas are the reply arrays minus the global arrays this strategy sent in
``configure_train`` (the server's ``DecodingStrategy`` hands on full tensors,
``global + delta``). Sampling and configuration are Flower's ``FedAvg``, unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedpeft import wire
from strategies.base import STRATEGIES, StrategySpec


def sign_consensus(deltas: Sequence[np.ndarray],
                   weights: Sequence[float] | None = None) -> np.ndarray:
    """Merge same-shaped ``deltas``: elect each coordinate's sign by the (weighted) sum,
    then take the (weighted) mean of the non-zero entries with that sign (0 where none)."""
    stack = np.stack([np.asarray(d, np.float64) for d in deltas])
    w = np.ones(len(deltas)) if weights is None else np.asarray(weights, np.float64)
    w = w.reshape((-1,) + (1,) * (stack.ndim - 1))
    elected = np.sign((w * stack).sum(axis=0))
    # sign(0) = 0 never matches an elected +-1, so zeros never count; where the sum is
    # exactly 0 the elected sign is 0 and only zeros "agree": the merge is 0 there.
    agree = np.sign(stack) == elected
    mass = (w * agree).sum(axis=0)
    total = (w * stack * agree).sum(axis=0)
    merged = np.divide(total, mass, out=np.zeros_like(total), where=mass > 0)
    return merged.astype(np.asarray(deltas[0]).dtype)


class SignConsensus(FedAvg):
    """FedAvg's sampling with a sign-consensus merge of the deltas (see module docstring).

    ``weighted``: weight each client by its ``num-examples`` in both the sign election
    and the mean (default False: every client counts once, as the paper merges models).
    """

    def __init__(self, fraction_train: float = 1.0, fraction_evaluate: float = 1.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 2,
                 min_available_nodes: int = 2, weighted: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes,
                         min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, **kwargs)
        self.weighted = weighted
        self.current_arrays: ArrayRecord | None = None  # the global sent this round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays (the deltas' origin), then configure as FedAvg."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Global + the sign-consensus merge of the replies' deltas; metrics as FedAvg."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if self.current_arrays is None:
            raise RuntimeError("sign_consensus aggregates deltas from the global arrays "
                               "it sent; configure_train must run first")
        contents = [m.content for m in valid]
        base = wire.from_arrayrecord(self.current_arrays)
        fulls = [wire.from_arrayrecord(c[self.arrayrecord_key]) for c in contents]
        weights = ([float(next(iter(c.metric_records.values()))[self.weighted_by_key])
                    for c in contents] if self.weighted else None)
        merged = {k: g + sign_consensus([f[k] - g for f in fulls], weights)
                  for k, g in base.items()}
        return (wire.to_arrayrecord(merged),
                self.train_metrics_aggr_fn(contents, self.weighted_by_key))


STRATEGIES.add("sign_consensus", StrategySpec(
    factory=SignConsensus,
    paper="Yadav et al., NeurIPS 2023, arXiv 2306.01708 (TIES-Merging)"))
