"""FedKSeed strategy: aggregate per-seed scalars; send each client only what it missed.

Paper: Qin et al., ICML 2024, arXiv 2312.06353.

Sampling, catch-up and validation plumbing is ``strategies/replay.py``; this module adds
FedKSeed's parts: the seed accumulator (example-weighted or equal ΔA per round), the
history each node needs (each round sparse or dense, whichever is smaller) and the Pro
sampling probabilities broadcast with every round when enabled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft import wire
from strategies.base import STRATEGIES, StrategySpec
from strategies.replay import ReplayStrategy
from strategies.seed_accumulator import SeedAccumulator, SeedReply, check_reply

log = logging.getLogger("fedpeft.strategy")


class FedKSeedStrategy(ReplayStrategy):
    """Seed-accumulator strategy; ``bind_method`` takes K and Pro settings from the method."""

    acc: SeedAccumulator | None = None
    pro, temperature = False, 1.0

    def bind_method(self, method: Any) -> None:
        cfg = method.cfg
        self.acc = SeedAccumulator(cfg.num_seeds, pro_clip=cfg.pro_clip)
        self.pro, self.temperature = cfg.pro, cfg.pro_temperature

    def summary(self) -> None:
        log.info("FedKSeed: K=%s, weighting=%s, pro=%s", self.acc and self.acc.num_seeds,
                 self.weighting, self.pro)

    def history_since(self, synced_round: int) -> dict[str, np.ndarray]:
        return self.acc.since(synced_round)

    def extra_arrays(self) -> dict[str, np.ndarray]:
        if not self.pro:
            return {}
        return {"probs": self.acc.probabilities(self.temperature).astype(np.float64)}

    def parse(self, arrays: Mapping[str, np.ndarray], metrics: Any) -> tuple[Any, int]:
        idx, vals = arrays[wire.SEED_IDX_KEY], arrays[wire.SEED_GRAD_KEY]
        check_reply(idx, vals, self.acc.num_seeds)
        return (idx, vals), int(idx.nbytes + vals.nbytes)

    def add_round(self, updates: list[Any], weights: np.ndarray) -> dict[str, np.ndarray]:
        replies = [SeedReply(i, v, float(w)) for (i, v), w in zip(updates, weights, strict=True)]
        idx, vals = self.acc.add_round(replies)
        return {"idx": idx, "vals": vals}

    def skip_round(self) -> None:
        self.acc.history.append((np.zeros(0, np.int32), np.zeros(0, np.float32)))

    def state(self) -> dict[str, np.ndarray]:
        return self.acc.state()

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.acc.load_state(arrays)


STRATEGIES.add("fedkseed", StrategySpec(
    factory=FedKSeedStrategy, accepts=frozenset({"seeds"}), wrap=False,
    paper="Qin et al., ICML 2024, arXiv 2312.06353"))
