"""Save what the server observes from chosen clients in chosen rounds (``capture:``).

The strategies call an :class:`Observer` where messages cross the wire: ``sent`` when a
round's messages are built (what each node is sent), ``observe`` for each reply before
anything decodes or validates it (what the node sent back), and ``flush`` once the
round's replies are judged, so refused updates are written with the server's reason.
Replies that are errors carry no update and are not captured. Writing is best effort:
a failure (disk full, permissions) is logged as a warning and never fails the round.
The format is ``fedpeft.capture``; observations are as sensitive as the updates.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from fedpeft import wire
from fedpeft.capture import OBSERVATIONS_DIR, CapturedUpdate, write_observation
from fedpeft.config import CaptureConfig

log = logging.getLogger("fedpeft.strategy")


class Observer:
    """Captures replies of ``cfg.partitions`` (all when None) in ``cfg.rounds`` (absolute
    round numbers) under ``cfg.dir`` (default ``<run_dir>/observations``)."""

    def __init__(self, cfg: CaptureConfig, run_dir: str | Path) -> None:
        self.rounds = frozenset(cfg.rounds)
        self.partitions = None if cfg.partitions is None else frozenset(cfg.partitions)
        root = Path(cfg.dir).expanduser() if cfg.dir else Path(run_dir) / OBSERVATIONS_DIR
        self.root = root.resolve()
        self._sent: dict[int, tuple[Mapping[str, np.ndarray], dict[str, Any]]] = {}
        self._pending: list[CapturedUpdate] = []

    def wants(self, rnd: int, partition: int | None) -> bool:
        """Whether round ``rnd``'s reply from ``partition`` is captured (an unknown
        partition only when every partition is)."""
        if rnd not in self.rounds:
            return False
        return self.partitions is None or (partition is not None and partition in self.partitions)

    def sent(self, rnd: int, messages: Sequence[Message],
             arrays: Mapping[str, np.ndarray] | None = None) -> None:
        """Remember what each node is sent in round ``rnd``: its train config and either
        ``arrays`` (the server's global arrays, the same for every node) or the arrays in
        its message. Replaces what was remembered for the previous round."""
        self._sent = {}
        if rnd in self.rounds:
            self._sent = {m.metadata.dst_node_id: (_arrays(m) if arrays is None else arrays,
                                                   _config(m)) for m in messages}

    def observe(self, rnd: int, reply: Message, partition: int | None, kind: str) -> None:
        """Keep ``reply`` as received if it is wanted (written by :meth:`flush`)."""
        if reply.has_error() or not self.wants(rnd, partition):
            return
        try:
            self._pending.append(self._capture(rnd, reply, partition, kind))
        except Exception as exc:  # a malformed reply must not stop the round
            log.warning("round %d: could not capture the reply of node %s (partition %s): "
                        "%s: %s", rnd, reply.metadata.src_node_id, partition,
                        type(exc).__name__, exc)

    def _capture(self, rnd: int, reply: Message, partition: int | None,
                 kind: str) -> CapturedUpdate:
        node = reply.metadata.src_node_id
        sent, config = self._sent.get(node, ({}, {}))
        metrics = reply.content.metric_records.get(wire.METRICS_KEY)
        return CapturedUpdate(round=rnd, partition=partition, node=int(node), kind=kind,
                              received=_arrays(reply), sent_global=dict(sent),
                              metrics=dict(metrics or {}), config=config)

    def flush(self, rejected: Mapping[str, str]) -> None:
        """Write the kept replies, each with its refusal reason from ``rejected``
        (node id as text -> reason); failures are warnings."""
        pending, self._pending = self._pending, []
        for update in pending:
            reason = rejected.get(str(update.node))
            try:
                write_observation(self.root, dataclasses.replace(update, rejected=reason))
            except Exception as exc:  # disk full, permissions: the round goes on
                log.warning("round %d: could not save the observation of partition %s "
                            "under %s: %s: %s", update.round, update.partition, self.root,
                            type(exc).__name__, exc)


def _arrays(message: Message) -> dict[str, np.ndarray]:
    """The arrays ``message`` carries (none if it has no ArrayRecord)."""
    record = message.content.array_records.get(wire.ARRAYS_KEY)
    return wire.from_arrayrecord(record) if record is not None else {}


def _config(message: Message) -> dict[str, Any]:
    """The train config ``message`` carries (empty if it has none)."""
    return dict(message.content.config_records.get(wire.CONFIG_KEY) or {})


def flushes_observations(aggregate_train: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a strategy's ``aggregate_train`` to write the round's observations once
    it has judged the replies (``self.observer``; ``self.traffic.rejected``), whether it
    returns or raises."""

    @functools.wraps(aggregate_train)
    def observed(self: Any, server_round: int, replies: Iterable[Message]) -> Any:
        try:
            return aggregate_train(self, server_round, replies)
        finally:
            if self.observer is not None:
                self.observer.flush(self.traffic.rejected)

    return observed
