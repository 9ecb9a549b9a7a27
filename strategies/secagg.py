"""Server side of SecAgg+ over Flower's Message API (protocol: :mod:`fedpeft.secagg`).

:class:`~strategies.decoding.DecodingStrategy` calls :meth:`SecAggServer.prepare` after it
has built the round's training messages: two extra exchanges on the same grid
(``train.secagg_keys``: public keys; ``train.secagg_share``: sealed shares) run before the
training messages leave, each of which then carries the shares addressed to its node.
Clients reply with masked vectors. :meth:`SecAggServer.unmask` asks the survivors for the
shares it needs (``train.secagg_unmask``), removes every mask, and hands the decoding
wrapper one reply: Σ n_i·Δ_i / Σ n_i as a dense update with ``num-examples`` Σ n_i, which
FedAvg returns as is and the server optimisers take as their pseudo-gradient. With
client-level DP the clients clip and send weight 1; the noise is added to the unmasked sum.

A node that fails a stage is left out of the round and named (``failed``); a round that
cannot be unmasked (fewer than t shares of some secret) aborts with the counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedpeft import wire
from fedpeft.config import SecAggConfig
from fedpeft.errors import UpdateRejected
from fedpeft.secagg import (
    SecAggAborted,
    ServerRound,
    check_params,
    decode,
    neighbours,
    unflatten,
)
from fedpeft.types import DenseUpdate

log = logging.getLogger("fedpeft.strategy")

KEYS, SHARE, UNMASK = "train.secagg_keys", "train.secagg_share", "train.secagg_unmask"


class SecAggServer:
    """One SecAgg+ round at a time, driven from the decoding wrapper."""

    def __init__(self, cfg: SecAggConfig) -> None:
        self.cfg = cfg
        self.round: ServerRound | None = None
        self.failed: dict[int, str] = {}  # node -> why it was left out of this round
        self.bytes: dict[str, int] = {}  # stage -> bytes exchanged (both ways)
        self.grid: Grid | None = None
        self.rnd = 0
        self.summed = 0  # clients whose masked updates the last aggregate holds

    def prepare(self, rnd: int, messages: list[Message], grid: Grid) -> list[Message]:
        """Keys and shares for the nodes of ``messages``; the messages of the nodes that
        completed both stages, each with its sealed shares attached."""
        self.grid, self.rnd, self.failed, self.bytes, self.summed = grid, rnd, {}, {}, 0
        nodes = [m.metadata.dst_node_id for m in messages]
        k, t = self.sizes(len(nodes))
        rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        self.round = ServerRound(rnd, t, neighbours(nodes, k, rng))
        keys = self._ask(KEYS, nodes, lambda _n: {"round": rnd})
        self.round.keys = {n: (f["c"], f["s"]) for n, f in keys.items()}
        sealed = self._ask(SHARE, list(keys), self._share_request)
        inbox = self.round.route({n: dict(zip(map(int, f["to"]), f["sealed"], strict=True))
                                  for n, f in sealed.items()})
        kept = [m for m in messages if m.metadata.dst_node_id in sealed]
        for msg in kept:
            fields = self._train_fields(inbox.get(msg.metadata.dst_node_id, {}), len(nodes))
            msg.content = wire.with_secagg(msg.content, fields)
        return kept

    def sizes(self, n: int) -> tuple[int, int]:
        """(k, t) for ``n`` sampled clients, checked."""
        if n < 3:
            raise SecAggAborted(f"secure aggregation needs at least 3 clients in a round "
                                f"(with 2, each learns the other's update from the sum); "
                                f"{n} sampled")
        k = min(self.cfg.degree or n - 1, n - 1)
        t = self.cfg.threshold or k // 2 + 1
        check_params(n, k, t)
        return k, t

    def _share_request(self, node: int) -> dict[str, Any]:
        peers = self.round.peers_of(node)
        return {"round": self.rnd, "threshold": self.round.threshold,
                "peers": [str(j) for j in peers], "peer_keys": [c + s for c, s in
                                                                peers.values()]}

    def _train_fields(self, inbox: dict[int, bytes], n: int) -> dict[str, Any]:
        return {"round": self.rnd, "frac_bits": self.cfg.frac_bits, "max_clients": n,
                "inbox_from": [str(j) for j in inbox], "inbox": list(inbox.values())}

    def _ask(self, action: str, nodes: list[int],
             payload: Callable[[int], dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """One exchange: ``action`` to ``nodes``; the fields of the good replies."""
        out = [Message(wire.secagg_content(payload(n)), dst_node_id=n, message_type=action,
                       group_id=str(self.rnd)) for n in nodes]
        replies = list(self.grid.send_and_receive(out, timeout=self.cfg.stage_timeout_s))
        self.bytes[action] = sum(wire.message_bytes(m) for m in [*out, *replies])
        good = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.failed[node] = f"secagg {action}: {reply.error.reason}"
                log.warning("round %d: node %s failed %s: %s", self.rnd, node, action,
                            reply.error.reason)
                continue
            good[node] = wire.secagg_fields(reply.content)
        return good

    def unmask(self, replies: Iterable[Message], reference: dict[str, np.ndarray],
               dp: Any = None) -> tuple[list[Message], dict[int, str]]:
        """The error replies as they are, plus one reply with the unmasked mean (none
        when no masked vector came); also the nodes whose masked reply was unusable."""
        size = sum(int(v.size) for v in reference.values()) + 1
        errors, masked, bad, metrics = [], {}, {}, {}
        for reply in replies:
            if reply.has_error():
                errors.append(reply)
                continue
            try:
                masked[reply.metadata.src_node_id] = wire.masked_vector(reply.content, size)
                metrics[reply.metadata.src_node_id] = reply
            except UpdateRejected as exc:
                bad[reply.metadata.src_node_id] = str(exc)
        if not masked:
            return errors, bad
        first = metrics[min(masked)]
        first.content = self._aggregate(masked, reference, list(metrics.values()), dp)
        return [*errors, first], bad

    def _aggregate(self, masked: dict[int, np.ndarray], reference: dict[str, np.ndarray],
                   replies: list[Message], dp: Any) -> RecordDict:
        alive, gone = self.round.unmask_plan(masked)
        got = self._ask(UNMASK, alive, lambda _n: {"round": self.rnd, "alive":
                                                   [str(a) for a in alive], "gone":
                                                   [str(g) for g in gone]})
        reveals = {n: _reveals(f) for n, f in got.items()}
        total, weight = decode(self.round.aggregate(masked, reveals), self.cfg.frac_bits)
        self.summed = len(alive)
        mean = unflatten(_noisy(total, weight, dp), reference)
        log.info("secagg round %d: %d masked updates summed (%d dropped after sharing)",
                 self.rnd, len(alive), len(gone))
        return wire.reply_content(wire.encode_update(DenseUpdate(mean)),
                                  max(round(weight), 1), _mean_metrics(replies))


def _reveals(fields: dict[str, Any]) -> dict[int, tuple[str, int, bytes]]:
    return {int(j): (kind, int(idx), share) for j, kind, idx, share in
            zip(fields["of"], fields["kind"], fields["index"], fields["share"], strict=True)}


def _noisy(total: np.ndarray, weight: float, dp: Any) -> np.ndarray:
    """Σ w·x / Σ w; with client-level DP, (Σ clipped Δ + N(0, σ²C²)) / (q·N) instead."""
    if dp is None:
        return total / weight
    cfg, expected = dp
    from fedpeft.privacy.client import secure_rng

    std = cfg.noise_multiplier * cfg.clip
    noise = secure_rng().normal(0.0, std, size=total.shape) if std > 0 else 0.0
    return (total + noise) / expected


def _mean_metrics(replies: list[Message]) -> dict[str, float]:
    """Example-weighted mean of the scalar metrics every reply carries (what FedAvg
    reports); the example counts travel in clear, as in any FedAvg round."""
    records = [r.content.metric_records[wire.METRICS_KEY] for r in replies]
    common = set.intersection(*(set(m.keys()) for m in records)) - {
        wire.NUM_EXAMPLES_KEY, wire.PARTITION_ID_KEY, wire.DOWN_ROUND_KEY}
    weights = np.array([float(m.get(wire.NUM_EXAMPLES_KEY, 1)) for m in records])
    return {k: float(np.average([float(m[k]) for m in records], weights=weights))
            for k in sorted(common) if all(isinstance(m[k], (int, float)) for m in records)}
