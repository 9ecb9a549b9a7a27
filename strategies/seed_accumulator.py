"""Server-side bookkeeping of FedKSeed: the per-seed accumulator, per-round history and
per-client catch-up, kept apart from Flower glue (pure, unit-tested).

Paper: Qin et al., ICML 2024, arXiv 2312.06353 (FedKSeed and FedKSeed-Pro).

The global model is defined by replaying each round's aggregated scalars (ΔA_r) in order
(``fedpeft.methods.fedkseed.apply_round``). A client last synced at round r' therefore needs
exactly the rounds r'+1 .. r-1, which :meth:`SeedAccumulator.since` encodes (each round
sparse or dense, whichever is smaller); the running sum ``A`` is kept for reporting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpeft.errors import UpdateRejected
from fedpeft.methods.fedkseed import decode_history, encode_history, pro_probabilities


@dataclass(frozen=True)
class SeedReply:
    """One client's round: seed indices, summed scalar gradients, aggregation weight."""

    indices: np.ndarray
    values: np.ndarray
    weight: float


def check_reply(indices: np.ndarray, values: np.ndarray, num_seeds: int) -> None:
    """Reject malformed seed updates (dtype, length, range, duplicates, non-finite)."""
    if indices.dtype.kind not in "iu" or values.dtype.kind != "f":
        raise UpdateRejected(f"expected integer indices and float values, found "
                             f"{indices.dtype}/{values.dtype}")
    if indices.shape != values.shape or indices.ndim != 1:
        raise UpdateRejected(f"indices {indices.shape} and values {values.shape} must be "
                             "equal-length vectors")
    if indices.size and (indices.min() < 0 or indices.max() >= num_seeds):
        raise UpdateRejected(f"seed index outside [0, {num_seeds})")
    if np.unique(indices).size != indices.size:
        raise UpdateRejected("duplicate seed indices")
    if not np.isfinite(values).all():
        raise UpdateRejected("non-finite scalar gradient")


@dataclass
class SeedAccumulator:
    """A (K,), the history of per-round sparse ΔA, and Pro statistics."""

    num_seeds: int
    pro_clip: float = 1000.0
    total: np.ndarray = field(init=False)
    history: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    _abs_sum: np.ndarray = field(init=False)
    _count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.num_seeds, dtype=np.float64)
        self._abs_sum = np.zeros(self.num_seeds, dtype=np.float64)
        self._count = np.zeros(self.num_seeds, dtype=np.int64)

    @property
    def rounds(self) -> int:
        return len(self.history)

    def add_round(self, replies: Sequence[SeedReply]) -> tuple[np.ndarray, np.ndarray]:
        """ΔA_r = Σ_i ω_i a_i (ω normalised to sum 1); returns sorted (indices, values)."""
        delta = np.zeros(self.num_seeds, dtype=np.float64)
        total_w = sum(r.weight for r in replies)
        for r in replies:
            np.add.at(delta, r.indices.astype(np.int64), r.values * (r.weight / total_w))
            clipped = np.clip(r.values.astype(np.float64), -self.pro_clip, self.pro_clip)
            np.add.at(self._abs_sum, r.indices.astype(np.int64), np.abs(clipped))
            np.add.at(self._count, r.indices.astype(np.int64), 1)
        idx = np.flatnonzero(delta.astype(np.float32)).astype(np.int32)  # no zero entries
        vals = delta[idx].astype(np.float32)
        self.total[idx] += vals
        self.history.append((idx, vals))
        return idx, vals

    def since(self, synced_round: int) -> dict[str, np.ndarray]:
        """Wire arrays of every ΔA after ``synced_round`` (``encode_history``'s format)."""
        rounds = [(r, i, v) for r, (i, v) in enumerate(self.history, start=1)
                  if r > synced_round]
        return encode_history(rounds, self.num_seeds)

    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume: the full history plus Pro statistics."""
        return {**encode_history([(r, i, v) for r, (i, v) in enumerate(self.history, 1)],
                                 self.num_seeds),
                "pro_abs_sum": self._abs_sum, "pro_count": self._count,
                "num_rounds": np.array([self.rounds], np.int64)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state` (resume from a checkpoint)."""
        self.__post_init__()
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32))
        self.history = [empty] * int(arrays["num_rounds"][0])  # rounds with no ΔA stay empty
        for rnd, idx, vals in decode_history(arrays):
            self.history[rnd - 1] = (idx, vals)
            self.total[idx] += vals
        self._abs_sum = np.asarray(arrays["pro_abs_sum"], np.float64).copy()
        self._count = np.asarray(arrays["pro_count"], np.int64).copy()

    def probabilities(self, temperature: float = 1.0) -> np.ndarray:
        """FedKSeed-Pro sampling probabilities from the clipped scalar history."""
        return pro_probabilities(self._abs_sum, self._count, temperature)

