"""Compressed broadcasts: clients rebuild exactly the server's global model, through
skipped rounds, lost replies and restarts, and server-side error feedback loses nothing."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from client.downlink import global_arrays
from fedpeft import wire
from fedpeft.compression import build_compressor
from fedpeft.compression.compeft import ComPEFTConfig
from fedpeft.config import compose
from fedpeft.errors import IncompatibleComponentsError
from strategies.downlink import Downlink

SHAPES = {"a": (40, 8), "b": (8, 40)}


def _message(node: int) -> Message:
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=0, dst_node_id=node,
                    reply_to_message_id="", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    content = RecordDict({wire.ARRAYS_KEY: wire.to_arrayrecord({}),
                          wire.CONFIG_KEY: ConfigRecord({"round": 1})})
    return Message(content=content, metadata=meta)


class Node:
    """One client's persistent state, as Flower keeps ``context.state``."""

    def __init__(self, node_id: int) -> None:
        self.id, self.state = node_id, RecordDict()

    def receive(self, msg: Message, codec) -> tuple[dict, int | None]:
        return global_arrays(msg.content, codec, self.state)


def _round(down: Downlink, nodes: list[Node], rnd: int, rng, codec, *, reply=True,
           lose: set[int] = frozenset()) -> tuple[dict, list[int]]:
    """Broadcast, let the nodes rebuild, aggregate a random change; return the new global
    model and the payload size each node received."""
    messages = down.address([_message(n.id) for n in nodes])
    sizes = []
    for node, msg in zip(nodes, messages, strict=True):
        model, held = node.receive(msg, codec)
        for k in model:  # bit-identical to the server's model
            np.testing.assert_array_equal(model[k], down.model[k])
        sizes.append(wire.payload_bytes(msg.content[wire.ARRAYS_KEY]))
        if reply and node.id not in lose:
            down.confirm(str(node.id), MetricRecord({wire.DOWN_ROUND_KEY: held}))
    aggregate = {k: down.model[k] + rng.normal(0, 0.01, v.shape).astype(np.float32)
                 for k, v in down.model.items()}
    return down.commit(rnd, aggregate), sizes


def test_clients_rebuild_the_servers_model_bit_for_bit() -> None:
    rng, codec = np.random.default_rng(0), build_compressor(ComPEFTConfig(density=0.1))
    down = Downlink(codec)
    down.start({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}, 0)
    nodes = [Node(1), Node(2), Node(3)]
    full = sum(int(np.prod(s)) * 4 for s in SHAPES.values())
    _, sizes = _round(down, nodes, 1, rng, codec)
    assert sizes == [full] * 3  # nobody holds anything yet
    _, sizes = _round(down, nodes, 2, rng, codec, lose={2})
    assert max(sizes) < full / 10  # one compressed delta each
    _, sizes = _round(down, nodes[:1], 3, rng, codec)  # nodes 2, 3 skip a round
    _, sizes = _round(down, nodes, 4, rng, codec)
    assert sizes[2] == len(down.history[2]) + len(down.history[3])  # two deltas
    nodes[0].state = RecordDict()  # node 1 restarts and loses its copy
    with pytest.raises(RuntimeError, match="holds round -1"):
        _round(down, nodes[:1], 5, rng, codec)
    down.forget("1")
    _, sizes = _round(down, nodes, 5, rng, codec)
    assert sizes[0] == full


def test_server_error_feedback_delays_but_never_drops_the_change() -> None:
    rng, codec = np.random.default_rng(1), build_compressor(ComPEFTConfig(density=0.05))
    down = Downlink(codec)
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    down.start(start, 0)
    target = {k: v.copy() for k, v in start.items()}
    for rnd in range(1, 40):
        step = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}
        target = {k: target[k] + step[k] for k in target}
        down.commit(rnd, {k: down.model[k] + step[k] for k in step})
    for k in target:  # broadcast model + what is still owed = every aggregated change
        np.testing.assert_allclose(down.model[k] + down.residual[k], target[k], atol=1e-5)
    assert max(float(np.abs(down.residual[k]).max()) for k in target) > 0


def test_downlink_needs_dense_updates() -> None:
    with pytest.raises(IncompatibleComponentsError, match="fedkseed"):
        compose("compression.downlink=true method=fedkseed strategy=fedkseed")
    assert compose("compression=compeft compression.downlink=true").compression.downlink
