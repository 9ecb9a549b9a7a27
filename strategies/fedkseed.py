"""FedKSeed strategy: aggregate per-seed scalars; send each client only what it missed.

Paper: Qin et al., ICML 2024, arXiv 2312.06353.

Flower has no seed-based strategy, so this one is written against Flower's ``Strategy``
interface. Per round it samples nodes with Flower's ``sample_nodes``; each node receives the
per-round aggregates since the round it last synced (a new node gets them all), plus the
Pro probabilities when enabled. Replies are validated (bad ones are logged and skipped),
weighted by ``num-examples`` (or equally), and become the round's ΔA, which
``aggregate_train`` returns so the server replays it once per touched seed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpeft import wire
from fedpeft.errors import UpdateRejected
from strategies.base import STRATEGIES, StrategySpec
from strategies.decoding import RoundTraffic
from strategies.seed_accumulator import SeedAccumulator, SeedReply, check_reply

log = logging.getLogger("fedpeft.strategy")
HIST_KEYS = ("hist_round", "hist_idx", "hist_val")


class FedKSeedStrategy(Strategy):
    """Seed-accumulator strategy; ``bind_method`` takes K and Pro settings from the method."""

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 2,
                 min_available_nodes: int = 2, weighting: str = "examples") -> None:
        if weighting not in ("examples", "equal"):
            raise UpdateRejected(f"weighting must be 'examples' or 'equal', found {weighting!r}")
        self.fraction_train, self.weighting = fraction_train, weighting
        self.min_train_nodes, self.min_available_nodes = min_train_nodes, min_available_nodes
        self.acc: SeedAccumulator | None = None
        self.pro, self.temperature = False, 1.0
        self.synced: dict[int, int] = {}
        self.traffic = RoundTraffic()
        self.last_train_metrics: MetricRecord | None = None

    def bind_method(self, method_cfg: Any) -> None:
        self.acc = SeedAccumulator(method_cfg.num_seeds, pro_clip=method_cfg.pro_clip)
        self.pro, self.temperature = method_cfg.pro, method_cfg.pro_temperature

    def summary(self) -> None:
        log.info("FedKSeed: K=%s, weighting=%s, pro=%s", self.acc and self.acc.num_seeds,
                 self.weighting, self.pro)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        size = max(int(len(list(grid.get_node_ids())) * self.fraction_train),
                   self.min_train_nodes)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, size)
        probs = self.acc.probabilities(self.temperature) if self.pro else None
        messages = [self._message(n, server_round, config, probs) for n in nodes]
        self.traffic = RoundTraffic(
            bytes_down={str(m.metadata.dst_node_id): wire.message_bytes(m) for m in messages})
        return messages

    def _message(self, node: int, rnd: int, config: ConfigRecord, probs) -> Message:
        since = self.synced.get(node, 0)
        arrays = dict(zip(HIST_KEYS, self.acc.since(since), strict=True))
        if probs is not None:
            arrays["probs"] = probs.astype(np.float64)
        conf = ConfigRecord({**dict(config), "round": rnd, "since": since, "target": rnd - 1})
        content = RecordDict({wire.ARRAYS_KEY: wire.to_arrayrecord(arrays),
                              wire.CONFIG_KEY: conf})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        parsed = [p for p in (self._parse(r, server_round) for r in replies) if p is not None]
        self.traffic.accepted = len(parsed)
        if not parsed:
            self.last_train_metrics = None
            return None, None
        idx, vals = self.acc.add_round([p[0] for p in parsed])
        weights = np.array([p[0].weight for p in parsed])
        losses = np.array([p[1] for p in parsed])
        ok = np.isfinite(losses)
        loss = float(np.average(losses[ok], weights=weights[ok])) if ok.any() else float("nan")
        self.last_train_metrics = MetricRecord({"train_loss": loss})
        return wire.to_arrayrecord({"idx": idx, "vals": vals}), self.last_train_metrics

    def _parse(self, reply: Message, rnd: int) -> tuple[SeedReply, float] | None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            self.traffic.rejected[str(node)] = f"client error: {reply.error.reason}"
            return None
        self.traffic.bytes_up[str(node)] = wire.message_bytes(reply)
        self.synced[node] = rnd - 1  # the node replayed up to rnd-1 before training
        try:
            arrays = wire.from_arrayrecord(reply.content[wire.ARRAYS_KEY])
            metrics = reply.content[wire.METRICS_KEY]
            idx, vals = arrays[wire.SEED_IDX_KEY], arrays[wire.SEED_GRAD_KEY]
            check_reply(idx, vals, self.acc.num_seeds)
            self.traffic.payload_bytes_up[str(node)] = int(idx.nbytes + vals.nbytes)
            n = float(metrics[wire.NUM_EXAMPLES_KEY]) if self.weighting == "examples" else 1.0
        except (KeyError, UpdateRejected) as exc:
            self.traffic.rejected[str(node)] = str(exc)
            log.warning("rejected update from node %s: %s", node, exc)
            return None
        return SeedReply(idx, vals, n), float(metrics.get("train_loss", float("nan")))

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None


STRATEGIES.add("fedkseed", StrategySpec(
    factory=FedKSeedStrategy, accepts=frozenset({"seeds"}), wrap=False,
    paper="Qin et al., ICML 2024, arXiv 2312.06353"))
