"""Make any dense Flower strategy accept fedpeft client updates.

Clients send *deltas* of their trainable tensors (what compressors and privacy
mechanisms operate on). Flower's strategies aggregate *full* tensors, and the server
optimisers among them (FedAdam, FedYogi, ...) derive their pseudo-gradient from the
difference to the current global arrays. This wrapper therefore, per reply:
validates it (tensor names, shapes, dtype, finiteness, magnitude, ``num-examples``),
rejects a bad reply with a logged reason instead of crashing the round, rebuilds
``global + delta``, screens outsized replies and updates when configured
(``strategies.screening``) and hands the rest to the wrapped strategy. It also
measures the exact serialized bytes of every message sent and received, and records who
was left out of each round: every rejected reply and every update a robust strategy
dropped (``strategies.exclusions``), with round, node and partition id. With ``capture:``
on, an observer (``strategies.observer``) saves chosen replies as they arrived, before
any decoding, with the global arrays the server held when it sent the round.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedpeft import wire
from fedpeft.config import ScreenConfig
from fedpeft.errors import ConfigError, UpdateRejected
from fedpeft.privacy.accounting import PrivacyEvent, event_from_metrics
from fedpeft.privacy.client import LEDGER_KEY
from fedpeft.secagg import SecAggAborted
from fedpeft.types import Exclusion
from strategies import client_dp, exclusions, screening
from strategies.downlink import Downlink
from strategies.observer import Observer, flushes_observations

log = logging.getLogger("fedpeft.strategy")
REJECTED_BY = "decoder"  # ``by`` of replies refused before aggregation


class NodePartitions:
    """Node id -> data partition id, learned from replies: the ``partition-id`` metric, or
    ``partition-id=N:`` in a failed client's error reason. Kept across rounds, so a node
    whose reply lacks it is still named."""

    def __init__(self) -> None:
        self.known: dict[str, int] = {}
        self.placed: dict[str, dict[str, str]] = {}  # node -> where its last reply ran

    def get(self, node: str | int) -> int | None:
        """The partition ``node`` last reported (None before it ever did)."""
        return self.known.get(str(node))

    def learn(self, reply: Message) -> int | None:
        """Update the map from ``reply``; return its node's partition (None if unknown)."""
        node, pid = str(reply.metadata.src_node_id), _reply_partition(reply)
        if pid is not None:
            self.known[node] = pid
        where = wire.placement_of(reply)
        if where:
            self.placed[node] = where
        return self.known.get(node)

    def ordered(self, replies: Iterable[Message]) -> list[Message]:
        """``replies`` by partition id, then node id (unknown partitions last).

        Floating-point sums depend on their order; replies arrive in whatever order the
        workers finish. Aggregating them by partition makes a run's result independent of
        which worker (or Ray node) was faster."""
        replies = list(replies)
        for reply in replies:
            self.learn(reply)

        def key(reply: Message) -> tuple[int, int, int]:
            pid = self.get(reply.metadata.src_node_id)
            return (pid is None, pid or 0, int(reply.metadata.src_node_id))

        return sorted(replies, key=key)

    def placement(self, nodes: Iterable[str]) -> dict[str, dict[str, str]]:
        """Where each of ``nodes`` ran, keyed by partition id (node id when unknown)."""
        return {str(self.known.get(n, f"node-{n}")): self.placed[n] for n in nodes
                if n in self.placed}


def _reply_partition(reply: Message) -> int | None:
    if reply.has_error():
        return wire.partition_from_text(reply.error.reason or "")
    metrics = reply.content.metric_records.get(wire.METRICS_KEY)
    pid = metrics.get(wire.PARTITION_ID_KEY) if metrics is not None else None
    return int(pid) if isinstance(pid, (int, float)) and float(pid).is_integer() else None


@dataclass
class RoundTraffic:
    """What happened on the wire in one training round (keys: node ids as strings)."""

    bytes_down: dict[str, int] = field(default_factory=dict)
    payload_bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    payload_bytes_up: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    excluded: list[Exclusion] = field(default_factory=list)
    privacy: dict[str, PrivacyEvent] = field(default_factory=dict)  # partition -> event
    accepted: int = 0
    aggregate_s: float = 0.0  # server wall time spent in aggregate_train
    extra: dict[str, float] = field(default_factory=dict)  # e.g. secure aggregation's cost

    @classmethod
    def for_messages(cls, messages: list[Message]) -> RoundTraffic:
        """Start a round's record with the serialized and raw sizes of what is sent."""
        return cls(
            bytes_down={str(m.metadata.dst_node_id): wire.message_bytes(m) for m in messages},
            payload_bytes_down={str(m.metadata.dst_node_id):
                                wire.payload_bytes(m.content[wire.ARRAYS_KEY])
                                for m in messages if wire.ARRAYS_KEY in m.content},
        )

    def exclude(self, rnd: int, node: str, partition: int | None, by: str, reason: str) -> None:
        """Record and log that ``node``'s update was left out of round ``rnd``."""
        self.excluded.append(
            Exclusion(node=node, partition=partition, round=rnd, by=by, reason=reason))
        log.warning("round %d: %s excluded node %s (partition %s): %s",
                    rnd, by, node, partition, reason)

    def note_privacy(self, node: str, partition: int | None, metrics: Any,
                     required: bool) -> None:
        """Keep the privacy event a reply reports, keyed by partition (``node-<id>`` while
        unknown). Every reply that reports one is accounted, used or not; with privacy on,
        a reply without one (or with a partial one) is refused: it cannot be accounted."""
        try:
            event = event_from_metrics(metrics)
        except ConfigError as exc:
            raise UpdateRejected(str(exc)) from None
        if event is None and required:
            raise UpdateRejected("privacy is on but the reply reports no privacy event "
                                 "(dp_* metrics), so it cannot be accounted")
        if event is not None:
            self.privacy[str(partition) if partition is not None else f"node-{node}"] = event

    def reject(self, rnd: int, node: str, partition: int | None, reason: str) -> None:
        """A reply refused before aggregation (also kept in ``rejected``: node -> reason)."""
        self.rejected[node] = reason
        self.exclude(rnd, node, partition, REJECTED_BY, reason)


def admitted(strategy: Any, nodes: list[int], rnd: int) -> list[int]:
    """``nodes`` less those the server's privacy budget leaves out (``strategy.admit``,
    set by the server when ``privacy.max_epsilon`` is configured)."""
    admit = getattr(strategy, "admit", None)
    return admit(nodes, rnd) if admit is not None else nodes


def records_aggregate_time(aggregate_train: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a strategy's ``aggregate_train`` to store its wall time in
    ``self.traffic.aggregate_s`` (whether it returns or raises)."""

    @functools.wraps(aggregate_train)
    def timed(self: Any, server_round: int, replies: Iterable[Message]) -> Any:
        t0 = time.perf_counter()
        try:
            return aggregate_train(self, server_round, replies)
        finally:
            self.traffic.aggregate_s = time.perf_counter() - t0

    return timed


class DecodingStrategy(Strategy):
    """Wraps a Flower strategy; see module docstring. ``round_offset`` shifts the round
    number sent to clients (``config['round']``) when a run resumes from a checkpoint;
    ``name`` is the strategy's name in exclusion records (default: the class name,
    lower-cased, which is also its registry name for Flower's strategies); ``screen``
    rejects outsized replies and updates (``strategies.screening``; default: off)."""

    def __init__(self, inner: Strategy, *, round_offset: int = 0, max_abs: float = 1e6,
                 name: str | None = None, screen: ScreenConfig | None = None):
        self.inner = inner
        self.screen = screen or ScreenConfig()
        self.name = name or type(inner).__name__.lower()
        self.partitions = NodePartitions()
        self.round_offset = round_offset
        self.max_abs = max_abs
        self.traffic = RoundTraffic()
        self.last_train_metrics: MetricRecord | None = None
        self.privacy_required = False  # set by the server when a client-side DP runs
        self.client_dp: Any = None  # ClientDPConfig when the run is private at client level
        self.compressor: Any = None  # the codec clients encode with (None: plain arrays)
        self.downlink: Downlink | None = None  # compressed broadcasts (None: full state)
        self.observer: Observer | None = None  # saves what the server saw (None: off)
        self.secagg: Any = None  # SecAggServer when updates are securely aggregated
        self._expected = 0.0
        self._global: dict = {}

    def enable_client_dp(self, cfg: Any) -> None:
        """Sample clients by Poisson and aggregate their noisy mean (``privacy=client``):
        the wrapped strategy builds a message for every node (fraction 1), of which each
        is kept with probability ``cfg.sample_rate``."""
        self.client_dp = cfg
        self.inner.fraction_train = 1.0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = wire.from_arrayrecord(arrays)
        config["round"] = server_round + self.round_offset
        if self.downlink is not None and not self.downlink.model:
            self.downlink.start(self._global, config["round"] - 1)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        keep = set(admitted(self, [m.metadata.dst_node_id for m in messages], config["round"]))
        messages = [m for m in messages if m.metadata.dst_node_id in keep]
        if self.client_dp is not None:
            messages, self._expected = client_dp.sample(messages, self.client_dp)
        if self.downlink is not None:
            messages = self.downlink.address(messages)
        if self.observer is not None:  # the global state, even where deltas were sent
            self.observer.sent(config["round"], messages, self._global)
        if self.secagg is not None:
            return self._secagg_prepare(config["round"], messages, grid)
        self.traffic = RoundTraffic.for_messages(messages)
        return messages

    def _secagg_prepare(self, rnd: int, messages: list[Message], grid: Grid) -> list[Message]:
        """Keys and shares first; the nodes that failed them are rejected by name."""
        t0 = time.perf_counter()
        try:
            kept = self.secagg.prepare(rnd, messages, grid)
        except SecAggAborted as exc:
            log.error("round %d: secure aggregation cannot run: %s", rnd, exc)
            self.traffic = RoundTraffic()
            self.traffic.reject(rnd, "secagg", None, f"secagg: {exc}")
            return []
        self.traffic = RoundTraffic.for_messages(kept)
        for node, why in self.secagg.failed.items():
            self.traffic.reject(rnd, str(node), self.partitions.get(node), why)
        self.traffic.extra["secagg_setup_s"] = time.perf_counter() - t0
        return kept

    @property
    def kind(self) -> str:
        """What replies carry: ``dense`` tensor deltas or a ``compressed`` blob."""
        return "dense" if self.compressor is None else "compressed"

    @flushes_observations
    @records_aggregate_time
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        replies = self.partitions.ordered(replies)
        if self.secagg is not None:
            decoded = self._secagg_decode(rnd, replies)
        else:
            decoded = [m for m in (self._decode(r, rnd) for r in replies) if m is not None]
        decoded = screening.screen_norms(decoded, self._global, self.screen.norm_k,
                                         functools.partial(self._reject, rnd), rnd)
        self.traffic.accepted = self.secagg.summed if self.secagg and decoded else len(decoded)
        if self.client_dp is not None:
            self.traffic.privacy[LEDGER_KEY] = self.client_dp.event()
            if self.secagg is None:  # under secagg the noise went onto the unmasked sum
                decoded = client_dp.aggregate(decoded, self._global, self.client_dp,
                                              self._expected) if decoded else []
        self.last_train_metrics = None
        if not decoded:
            log.warning("round %d: no acceptable client update; global state unchanged", rnd)
            return None, None
        _keep_common_metrics(decoded)
        # Explained before aggregating: Flower's median, trimmed mean and Bulyan consume
        # the reply arrays. Recorded only if the strategy produced an aggregate.
        reasons = exclusions.explain(self.inner, [m.content for m in decoded])
        arrays, metrics = self.inner.aggregate_train(server_round, decoded)
        self.last_train_metrics = metrics
        if arrays is not None:
            self._record_exclusions(rnd, decoded, reasons)
            if self.downlink is not None:  # the global model is what clients rebuild
                arrays = wire.to_arrayrecord(
                    self.downlink.commit(rnd, wire.from_arrayrecord(arrays)))
        return arrays, metrics

    def _secagg_decode(self, rnd: int, replies: list[Message]) -> list[Message]:
        """Masked replies -> one decoded reply with their unmasked mean. Each masked reply
        is accounted for (bytes, size cap, privacy event) on its own; a round that cannot
        be unmasked rejects every masked reply with the reason."""
        t0 = time.perf_counter()
        masked = [r for r in replies if self._masked_ok(r, rnd)]
        dp = (self.client_dp, self._expected) if self.client_dp is not None else None
        try:
            out, bad = self.secagg.unmask(masked, self._global, dp)
            update = wire.decode_update(out[0].content[wire.ARRAYS_KEY], self._global,
                                        max_abs=self.max_abs) if out else None
        except (SecAggAborted, UpdateRejected) as exc:
            log.error("round %d: secure aggregation failed: %s", rnd, exc)
            for reply in masked:
                self._reject(rnd, reply, f"secagg: {exc}")
            return []
        for node, why in bad.items():
            self.traffic.reject(rnd, str(node), self.partitions.get(node), why)
        self.traffic.extra.update({f"secagg_bytes_{k.rsplit('_', 1)[1]}": float(v)
                                   for k, v in self.secagg.bytes.items()})
        self.traffic.extra["secagg_unmask_s"] = time.perf_counter() - t0
        if update is None:
            return []
        full = {k: self._global[k] + update.deltas[k] for k in self._global}
        out[0].content = RecordDict({wire.ARRAYS_KEY: wire.to_arrayrecord(full),
                                     wire.METRICS_KEY: out[0].content[wire.METRICS_KEY]})
        return out

    def _masked_ok(self, reply: Message, rnd: int) -> bool:
        """Account for one masked reply (errors are rejected here, by node)."""
        node, pid = str(reply.metadata.src_node_id), self.partitions.learn(reply)
        if reply.has_error():
            self.traffic.reject(rnd, node, pid, f"client error: {reply.error.reason}")
            return False
        self.traffic.bytes_up[node] = wire.message_bytes(reply)
        try:
            metrics = reply.content.metric_records.get(wire.METRICS_KEY)
            if metrics is None:
                raise UpdateRejected(f"reply carries no '{wire.METRICS_KEY}' record")
            self.traffic.note_privacy(node, pid, metrics, self.privacy_required)
            screening.check_size(self.traffic.bytes_up[node], self.screen.max_reply_bytes)
        except UpdateRejected as exc:
            self.traffic.reject(rnd, node, pid, str(exc))
            return False
        arrays = reply.content.array_records.get(wire.ARRAYS_KEY)
        if arrays is not None:
            self.traffic.payload_bytes_up[node] = wire.payload_bytes(arrays)
        return True

    def _reject(self, rnd: int, reply: Message, reason: str) -> None:
        node = str(reply.metadata.src_node_id)
        self.traffic.reject(rnd, node, self.partitions.get(node), reason)

    def _record_exclusions(self, rnd: int, decoded: list[Message],
                           reasons: list[str | None]) -> None:
        for reply, reason in zip(decoded, reasons, strict=True):
            if reason is not None:
                node = str(reply.metadata.src_node_id)
                self.traffic.exclude(rnd, node, self.partitions.get(node), self.name,
                                     reason)

    def _decode(self, reply: Message, rnd: int) -> Message | None:
        node, pid = str(reply.metadata.src_node_id), self.partitions.learn(reply)
        if reply.has_error():
            self.traffic.reject(rnd, node, pid, f"client error: {reply.error.reason}")
            if self.downlink is not None:
                self.downlink.forget(node)
            return None
        if self.observer is not None:  # as received: before anything decodes it
            self.observer.observe(rnd, reply, pid, self.kind)
        self.traffic.bytes_up[node] = wire.message_bytes(reply)
        try:
            arrays, metrics = _split_reply(reply.content)
            self.traffic.note_privacy(node, pid, metrics, self.privacy_required)
            if self.downlink is not None:
                self.downlink.confirm(node, metrics)
            screening.check_size(self.traffic.bytes_up[node], self.screen.max_reply_bytes)
            self.traffic.payload_bytes_up[node] = wire.payload_bytes(arrays)
            update = self._update(arrays)
        except UpdateRejected as exc:
            self.traffic.reject(rnd, node, pid, str(exc))
            return None
        full = {k: self._global[k] + update.deltas[k] for k in self._global}
        reply.content = RecordDict(
            {wire.ARRAYS_KEY: wire.to_arrayrecord(full), wire.METRICS_KEY: metrics}
        )
        return reply

    def _update(self, arrays: ArrayRecord) -> Any:
        """The reply's dense update: decompressed with the run's codec when one is set."""
        if self.compressor is None:
            return wire.decode_update(arrays, self._global, max_abs=self.max_abs)
        return wire.decode_compressed(arrays, self.compressor.decode, self._global,
                                      max_abs=self.max_abs)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def _split_reply(content: RecordDict) -> tuple[ArrayRecord, MetricRecord]:
    arrays = content.array_records.get(wire.ARRAYS_KEY)
    metrics = content.metric_records.get(wire.METRICS_KEY)
    if arrays is None or metrics is None:
        raise UpdateRejected(
            f"reply must carry ArrayRecord '{wire.ARRAYS_KEY}' and MetricRecord "
            f"'{wire.METRICS_KEY}'; found records {sorted(content.keys())}"
        )
    n = metrics.get(wire.NUM_EXAMPLES_KEY)
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
        raise UpdateRejected(f"'{wire.NUM_EXAMPLES_KEY}' must be a positive number, found {n!r}")
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise UpdateRejected(f"non-finite metric(s) {bad}")
    return arrays, metrics


def _keep_common_metrics(replies: list[Message]) -> None:
    """Flower requires identical metric keys across replies; keep the shared scalars.
    ``partition-id`` is dropped: an averaged partition id would mean nothing."""
    records = [r.content.metric_records[wire.METRICS_KEY] for r in replies]
    common = set.intersection(*(set(m.keys()) for m in records)) - {
        wire.PARTITION_ID_KEY, wire.DOWN_ROUND_KEY}
    for reply, metrics in zip(replies, records, strict=True):
        kept = MetricRecord({k: v for k, v in metrics.items() if k in common
                             and isinstance(v, (int, float))})
        reply.content = RecordDict({wire.ARRAYS_KEY: reply.content[wire.ARRAYS_KEY],
                                    wire.METRICS_KEY: kept})
