"""Shared Flower glue of the seed-based strategies (FedKSeed, Ferret).

Flower has no strategy for methods whose global model is a replay of per-round aggregates,
so this base is written against Flower's ``Strategy`` interface. Per round it samples nodes
with Flower's ``sample_nodes``; each node receives the aggregates of the rounds since it
last synced (a new node, or one whose last reply failed, gets them all); replies are
validated (bad ones are logged and skipped, the round goes on), weighted by
``num-examples`` (or equally), and folded into the round's aggregate, which
``aggregate_train`` returns so the server replays it. With ``capture:`` on, an observer
(``strategies.observer``) saves chosen replies as received with the arrays (history and
extras) their node was sent. Subclasses supply the method-specific parts: ``kind``,
``bind_method``, ``history_since``, ``parse`` and ``add_round``.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpeft import wire
from fedpeft.errors import UpdateRejected
from strategies.decoding import NodePartitions, RoundTraffic, admitted, records_aggregate_time
from strategies.observer import Observer, flushes_observations

log = logging.getLogger("fedpeft.strategy")
STATE_FILE = "strategy-state.npz"


class ReplayStrategy(Strategy):
    """Sampling, per-node catch-up, validation and traffic accounting for replay methods."""

    kind = "seed"  # what replies carry, in captured observations (``fedpeft.capture``)

    def __init__(self, fraction_train: float = 1.0, min_train_nodes: int = 2,
                 min_available_nodes: int = 2, weighting: str = "examples") -> None:
        if weighting not in ("examples", "equal"):
            raise UpdateRejected(f"weighting must be 'examples' or 'equal', found {weighting!r}")
        self.fraction_train, self.weighting = fraction_train, weighting
        self.min_train_nodes, self.min_available_nodes = min_train_nodes, min_available_nodes
        self.synced: dict[int, int] = {}
        self.round_offset = 0  # rounds already done before a resumed run started
        self.traffic = RoundTraffic()
        self.partitions = NodePartitions()
        self.last_train_metrics: MetricRecord | None = None
        self.privacy_required = False  # set by the server when a client-side DP runs
        self.observer: Observer | None = None  # saves what the server saw (None: off)

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def bind_method(self, method: Any) -> None:
        """Take the method's settings (K, layout, ...) once the server has built it."""

    @abstractmethod
    def history_since(self, synced_round: int) -> dict[str, np.ndarray]:
        """Wire arrays of every round's aggregate after ``synced_round``."""

    def extra_arrays(self) -> dict[str, np.ndarray]:
        """Per-round arrays every sampled node receives (e.g. Pro probabilities)."""
        return {}

    @abstractmethod
    def parse(self, arrays: Mapping[str, np.ndarray], metrics: Any) -> tuple[Any, int]:
        """Validate one reply's arrays; return (parsed update, payload bytes).

        Raises ``UpdateRejected`` (or ``KeyError``) for a malformed update."""

    @abstractmethod
    def add_round(self, updates: list[Any], weights: np.ndarray) -> dict[str, np.ndarray]:
        """Fold the round's accepted updates into the history; return its aggregate."""

    @abstractmethod
    def skip_round(self) -> None:
        """Record a round without accepted updates, keeping round numbers aligned."""

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Everything needed to resume (written next to each checkpoint)."""

    @abstractmethod
    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`state`."""

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Path) -> None:
        np.savez(path / STATE_FILE, **self.state())

    def load(self, path: Path) -> None:
        with np.load(path / STATE_FILE) as data:
            self.load_state({k: data[k] for k in data.files})

    # ------------------------------------------------------------------ Flower interface
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        size = max(int(len(list(grid.get_node_ids())) * self.fraction_train),
                   self.min_train_nodes)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, size)
        extra = self.extra_arrays()
        rnd = server_round + self.round_offset
        nodes = admitted(self, list(nodes), rnd)
        messages = [self._message(n, rnd, config, extra) for n in nodes]
        if self.observer is not None:
            self.observer.sent(rnd, messages)
        self.traffic = RoundTraffic.for_messages(messages)
        return messages

    def _message(self, node: int, rnd: int, config: ConfigRecord,
                 extra: dict[str, np.ndarray]) -> Message:
        since = self.synced.get(node, 0)
        arrays = {**self.history_since(since), **extra}
        conf = ConfigRecord({**dict(config), "round": rnd, "since": since, "target": rnd - 1})
        content = RecordDict({wire.ARRAYS_KEY: wire.to_arrayrecord(arrays),
                              wire.CONFIG_KEY: conf})
        return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)

    @flushes_observations
    @records_aggregate_time
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        replies = self.partitions.ordered(replies)  # sums must not depend on arrival order
        parsed = [p for p in (self._parse(r, rnd) for r in replies) if p is not None]
        self.traffic.accepted = len(parsed)
        if not parsed:  # the round still exists in the history (as a no-op)
            log.warning("round %d: no acceptable client update; global model unchanged", rnd)
            self.skip_round()
            self.last_train_metrics = None
            return None, None
        weights = np.array([p[1] for p in parsed], dtype=np.float64)
        aggregate = self.add_round([p[0] for p in parsed], weights)
        losses = np.array([p[2]["train_loss"] for p in parsed])
        ok = np.isfinite(losses)
        loss = float(np.average(losses[ok], weights=weights[ok])) if ok.any() else float("nan")
        summary = {"train_loss": loss}
        for key in ("train_time_s", "project_time_s"):  # mean client seconds
            values = [p[2][key] for p in parsed if key in p[2]]
            if values:
                summary[key] = float(np.mean(values))
        self.last_train_metrics = MetricRecord(summary)
        return wire.to_arrayrecord(aggregate), self.last_train_metrics

    def _parse(self, reply: Message, rnd: int) -> tuple[Any, float, dict] | None:
        node, pid = reply.metadata.src_node_id, self.partitions.learn(reply)
        if reply.has_error():
            self.traffic.reject(rnd, str(node), pid, f"client error: {reply.error.reason}")
            self.synced.pop(node, None)  # resend the full history: its state may be lost
            return None
        if self.observer is not None:  # as received: before anything parses it
            self.observer.observe(rnd, reply, pid, self.kind)
        self.traffic.bytes_up[str(node)] = wire.message_bytes(reply)
        self.synced[node] = rnd - 1  # the node replayed up to rnd-1 before training
        try:
            arrays = wire.from_arrayrecord(reply.content[wire.ARRAYS_KEY])
            metrics = reply.content[wire.METRICS_KEY]
            self.traffic.note_privacy(str(node), pid, metrics, self.privacy_required)
            update, payload = self.parse(arrays, metrics)
            self.traffic.payload_bytes_up[str(node)] = int(payload)
            n = float(metrics[wire.NUM_EXAMPLES_KEY]) if self.weighting == "examples" else 1.0
            if not n > 0:
                raise UpdateRejected(f"num-examples must be > 0, found {n}")
        except (KeyError, UpdateRejected) as exc:
            self.traffic.reject(rnd, str(node), pid, str(exc))
            return None
        scalars = {k: float(metrics[k]) for k in ("train_time_s", "project_time_s")
                   if k in metrics}
        return update, n, {"train_loss": float(metrics.get("train_loss", float("nan"))),
                           **scalars}

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None
