"""Frozen value types that cross module boundaries (client -> wire -> strategy).

Only plain numpy arrays live here so that ``wire.py`` can pack them into Flower
records without knowing about torch, and strategies can aggregate them without a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np

ArrayDict = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class DenseUpdate:
    """Delta (local - global) of every trainable tensor, keyed by stable tensor name."""

    deltas: ArrayDict

    def num_values(self) -> int:
        """Number of scalars carried."""
        return int(sum(a.size for a in self.deltas.values()))


@dataclass(frozen=True)
class SeedUpdate:
    """FedKSeed upload: per-seed summed scalar gradients (index int32, value float32)."""

    indices: np.ndarray
    values: np.ndarray

    def num_values(self) -> int:
        return int(self.indices.size * 2)


@dataclass(frozen=True)
class ProjectedUpdate:
    """Ferret upload: the client's basis seed, bases per block, coordinates γ."""

    seed: int
    counts: np.ndarray
    gammas: np.ndarray

    def num_values(self) -> int:
        return int(1 + self.counts.size + self.gammas.size)


@dataclass(frozen=True)
class TrainResult:
    """What a client method returns after local training on one round."""

    update: DenseUpdate | SeedUpdate | ProjectedUpdate
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


class Exclusion(TypedDict):
    """One client update left out of a round's aggregate, and by whom.

    ``by`` is ``"decoder"`` for a reply refused before aggregation (client error,
    malformed or non-finite update) or the strategy's name (``krum``, ``fedmedian``, ...)
    for an update the robust rule dropped; ``partition`` is None while the node's data
    partition is unknown (it never sent a ``partition-id``)."""

    node: str
    partition: int | None
    round: int
    by: str
    reason: str


@dataclass(frozen=True)
class RoundRecord:
    """One line of ``runs/<run-id>/metrics.jsonl``."""

    round: int
    wall_time_s: float
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_time_s: float | None = None
    client_train_s: float | None = None  # mean over clients: local training (+ projection)
    server_aggregate_s: float | None = None  # strategy aggregate_train
    server_apply_s: float | None = None  # bringing the server model to the new global
    num_clients: int = 0
    num_rejected: int = 0
    bytes_up: Mapping[str, int] = field(default_factory=dict)
    bytes_down: Mapping[str, int] = field(default_factory=dict)
    payload_bytes_up: Mapping[str, int] = field(default_factory=dict)
    payload_bytes_down: Mapping[str, int] = field(default_factory=dict)
    rejected: Mapping[str, str] = field(default_factory=dict)  # node -> reason (refused replies)
    excluded: list[Exclusion] = field(default_factory=list)  # every rejection and exclusion
    privacy: Mapping[str, object] = field(default_factory=dict)  # worst ε so far (DP runs)
    extra: Mapping[str, float] = field(default_factory=dict)
    placement: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # partition -> host
    reply_s: Mapping[str, float] = field(default_factory=dict)  # node -> s from push to reply
    partitions: Mapping[str, int] = field(default_factory=dict)  # node -> partition id


def compact_counts(counts: np.ndarray) -> np.ndarray:
    """Non-negative counts (Ferret's bases per block) as uint16 when they fit: half the
    bytes of int32 on the wire."""
    fits = counts.size == 0 or int(counts.max()) < 1 << 16
    return counts.astype(np.uint16 if fits else np.int32)
