"""Compressed broadcasts (``compression.downlink=true``): the server sends each client
the compressed global deltas since the round that client last synced to, instead of the
whole global state.

The server's global model *is* what clients rebuild: after each aggregation the change
since the last broadcast, plus what earlier compression dropped (server-side error
feedback, so nothing is lost, only delayed), is encoded once; the server adds the decoded
delta to its copy, exactly as every client will, with the same float32 operations in the
same order, so both sides hold bit-identical arrays. A node with no usable state (first
round, restart, lost reply, or more delta bytes than the state itself) gets the full
state. Clients report the round they hold (``downlink-round``) in every reply; a client
that cannot apply what it got fails its round and is sent the full state next time.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedpeft import wire

log = logging.getLogger("fedpeft.strategy")


class Downlink:
    """Server side: the broadcast model, its residual, the recent deltas and which round
    each node holds."""

    def __init__(self, codec: Any) -> None:
        self.codec = codec
        self.model: dict[str, np.ndarray] = {}  # what every synced client holds
        self.residual: dict[str, np.ndarray] = {}
        self.round = 0  # the round ``model`` belongs to
        self.history: dict[int, bytes] = {}  # round -> compressed delta of that round
        self.confirmed: dict[str, int] = {}  # node -> round of the model it reported

    def start(self, arrays: dict[str, np.ndarray], rnd: int) -> None:
        """Begin from the global state ``arrays`` of round ``rnd`` (sent in full)."""
        self.model = {k: np.asarray(v, np.float32).copy() for k, v in arrays.items()}
        self.residual = {k: np.zeros_like(v) for k, v in self.model.items()}
        self.round, self.history, self.confirmed = rnd, {}, {}

    def commit(self, rnd: int, aggregate: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode the change to ``aggregate`` (plus the residual) as round ``rnd``'s delta;
        return the new global model, which is what clients will rebuild."""
        change = {k: (aggregate[k] - self.model[k]) + self.residual[k] for k in self.model}
        blob = self.codec.encode(change)
        sent = self.codec.decode(blob, {k: v.shape for k, v in change.items()})
        self.model = {k: self.model[k] + sent[k] for k in self.model}
        self.residual = {k: change[k] - sent[k] for k in change}
        self.history[rnd], self.round = blob, rnd
        self._prune()
        return {k: v.copy() for k, v in self.model.items()}

    def _prune(self) -> None:
        """Keep only the newest deltas whose bytes together stay under the full state's."""
        full, total = sum(v.nbytes for v in self.model.values()), 0
        for rnd in sorted(self.history, reverse=True):
            total += len(self.history[rnd])
            if total > full:
                del self.history[rnd]

    def payload(self, node: str) -> tuple[ArrayRecord, int]:
        """What ``node`` needs to reach the current model, and the round it builds on
        (-1: the full state)."""
        have = self.confirmed.get(node)
        if have is not None and (have == self.round or have + 1 in self.history):
            blobs = {r: b for r, b in self.history.items() if r > have}
            return wire.encode_blobs(blobs), have
        return wire.to_arrayrecord(self.model), -1

    def address(self, messages: list[Message]) -> list[Message]:
        """Replace each message's arrays with what its node needs."""
        for msg in messages:
            arrays, base = self.payload(str(msg.metadata.dst_node_id))
            msg.content = wire.with_arrays(msg.content, arrays,
                                           **{wire.DOWN_ROUND_KEY: self.round,
                                              wire.DOWN_BASE_KEY: base})
        return messages

    def confirm(self, node: str, metrics: Any) -> None:
        """Note the round a reply says its node holds."""
        held = metrics.get(wire.DOWN_ROUND_KEY)
        if isinstance(held, (int, float)) and float(held).is_integer():
            self.confirmed[node] = int(held)

    def forget(self, node: str) -> None:
        """``node`` failed: send it the full state next time."""
        self.confirmed.pop(node, None)
