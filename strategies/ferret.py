"""Ferret strategy: average projected updates in coordinate space, broadcast (seed, γ).

Paper: Shu et al., ICML 2025, arXiv 2409.06277.

Each accepted reply (seed, counts K_l, coordinates γ) becomes a contribution with step
coefficient c_j = η_g · ω_j (ω the normalised example or equal weights), so the global step
is w ← w - η_g Σ_j ω_j Δ̂_j: the paper's mean of reconstructions with a global learning
rate. The server never reconstructs per client; it replays the round once
(``fedpeft.methods.ferret.apply_contributions``) and clients do the same from the
contributions of the rounds they missed. Seeds must be fresh: a seed seen before (in this
or an earlier round) is rejected, so no basis is ever reused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft import wire
from fedpeft.errors import UpdateRejected
from fedpeft.methods.ferret import Contribution, decode_round, encode_round
from strategies.base import STRATEGIES, StrategySpec
from strategies.replay import ReplayStrategy

log = logging.getLogger("fedpeft.strategy")


def check_projection(seed: np.ndarray, counts: np.ndarray, gammas: np.ndarray,
                     num_blocks: int, max_bases: int) -> None:
    """Reject malformed projections (shapes, dtypes, counts, non-finite coordinates)."""
    if seed.shape != (1,) or seed.dtype.kind not in "iu":
        raise UpdateRejected(f"expected one integer seed, found {seed.dtype}{seed.shape}")
    if counts.shape != (num_blocks,) or counts.dtype.kind not in "iu":
        raise UpdateRejected(f"expected {num_blocks} integer block counts, found "
                             f"{counts.dtype}{counts.shape}")
    if counts.min() < 1 or counts.sum() > max_bases:
        raise UpdateRejected(f"block counts must be >= 1 and sum to <= {max_bases}, found "
                             f"min {counts.min()} sum {counts.sum()}")
    if gammas.dtype.kind != "f" or gammas.shape != (int(counts.sum()),):
        raise UpdateRejected(f"expected {int(counts.sum())} float coordinates, found "
                             f"{gammas.dtype}{gammas.shape}")
    if not np.isfinite(gammas).all():
        raise UpdateRejected("non-finite projection coordinate")


class FerretStrategy(ReplayStrategy):
    """Coordinate-space averaging with a global learning rate; per-node catch-up."""

    kind = "projected"

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 2,
                 min_available_nodes: int = 2, weighting: str = "equal",
                 global_lr: float = 10.0) -> None:
        super().__init__(fraction_train, min_train_nodes, min_available_nodes, weighting)
        if not global_lr > 0:
            raise UpdateRejected(f"global_lr must be > 0, found {global_lr}")
        self.global_lr = float(global_lr)
        self.history: list[list[Contribution]] = []
        self.seen: set[int] = set()
        self.num_blocks, self.max_bases = 0, 0

    def bind_method(self, method: Any) -> None:
        self.num_blocks = method.layout.num_blocks
        # allocate() gives K_l >= min_bases and Σ K_l <= max(K, L·min_bases)
        self.max_bases = max(method.cfg.num_bases, self.num_blocks * method.cfg.min_bases)

    def summary(self) -> None:
        log.info("Ferret: %d blocks, <= %d coordinates/client, global_lr=%g, weighting=%s",
                 self.num_blocks, self.max_bases, self.global_lr, self.weighting)

    def history_since(self, synced_round: int) -> dict[str, np.ndarray]:
        parts = [encode_round(c, r) for r, c in enumerate(self.history, 1)
                 if r > synced_round and c]
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def parse(self, arrays: Mapping[str, np.ndarray], metrics: Any) -> tuple[Any, int]:
        seed, counts = arrays[wire.PROJ_SEED_KEY], arrays[wire.PROJ_COUNTS_KEY]
        gammas = arrays[wire.PROJ_GAMMA_KEY]
        check_projection(seed, counts, gammas, self.num_blocks, self.max_bases)
        if int(seed[0]) in self.seen:
            raise UpdateRejected(f"seed {int(seed[0])} was already used; bases must be fresh")
        self.seen.add(int(seed[0]))
        return (int(seed[0]), counts, gammas), int(seed.nbytes + counts.nbytes + gammas.nbytes)

    def add_round(self, updates: list[Any], weights: np.ndarray) -> dict[str, np.ndarray]:
        omega = weights / weights.sum()
        contributions = [Contribution(s, self.global_lr * float(w), c, g)
                         for (s, c, g), w in zip(updates, omega, strict=True)]
        self.history.append(contributions)
        return encode_round(contributions)

    def skip_round(self) -> None:
        self.history.append([])

    def state(self) -> dict[str, np.ndarray]:
        return {**self.history_since(0), "num_rounds": np.array([len(self.history)], np.int64),
                "seen": np.array(sorted(self.seen), np.int64)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.history = [[] for _ in range(int(arrays["num_rounds"][0]))]
        if "counts" in arrays:
            for rnd, c in decode_round(arrays):
                self.history[rnd - 1].append(c)
        self.seen = {int(s) for s in arrays["seen"]}


STRATEGIES.add("ferret", StrategySpec(
    factory=FerretStrategy, accepts=frozenset({"projections"}), wrap=False,
    paper="Shu et al., ICML 2025, arXiv 2409.06277"))
