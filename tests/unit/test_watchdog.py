"""The server's watchdog and health rules, on a grid whose nodes never answer.

The end-to-end versions run real Flower processes (tests/integration/test_run_health.py);
here a minimal in-memory Grid makes the timing rules fast and exact.
"""

from __future__ import annotations

import logging
import time

import pytest
from flwr.app import Error, Message, Metadata, RecordDict
from flwr.common.constant import ErrorCode

from fedpeft.types import RoundRecord
from server.health import NothingTrained, RunHealth
from server.watchdog import NodeWaitTimeout, Stalled, WatchedGrid


class SilentGrid:
    """Nodes connect, accept messages and never reply (until ``answer`` is set)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes, self.pushed, self.answer = nodes, [], False

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.pushed = [f"id{m.metadata.dst_node_id}" for m in messages]
        return list(self.pushed)

    def pull_messages(self, ids: list[str]) -> list[Message]:
        if not self.answer or not ids:
            return []
        node = int(ids[0][2:])
        return [Message(RecordDict(), metadata=_meta(node, reply_to=ids[0]))]


def _meta(node: int, reply_to: str = "") -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=node,
                    reply_to_message_id=reply_to, group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def _grid(inner: SilentGrid, **kw: float) -> WatchedGrid:
    opts = {"stall_timeout_s": 0.3, "node_wait_s": 0.3, "poll_s": 0.05, **kw}
    return WatchedGrid(inner, nodes_needed=3, partition_of={"11": 0, "12": 1}.get, **opts)


def test_waiting_for_nodes_fails_with_the_counts_seen() -> None:
    grid = _grid(SilentGrid([11]))
    with pytest.raises(NodeWaitTimeout, match=r"1 connected, the strategy needs 3"):
        while True:  # what Flower's sample_nodes does while too few nodes are connected
            grid.get_node_ids()
            time.sleep(0.05)


def test_silent_round_fails_naming_phase_nodes_and_partitions() -> None:
    grid = _grid(SilentGrid([11, 12]))
    messages = [Message(RecordDict(), metadata=_meta(n)) for n in (11, 12)]
    t0 = time.monotonic()
    with pytest.raises(Stalled) as info:
        grid.send_and_receive(messages, timeout=30)
    assert time.monotonic() - t0 < 2
    text = str(info.value)
    assert "phase 'train'" in text and "no client has replied yet" in text
    assert "silent nodes ['11', '12'] (partitions [0, 1])" in text


def test_replies_keep_the_round_alive_and_end_it() -> None:
    inner = SilentGrid([11])
    inner.answer = True
    grid = _grid(inner)
    replies = grid.send_and_receive([Message(RecordDict(), metadata=_meta(11))], timeout=5)
    assert [r.metadata.src_node_id for r in replies] == [11]


class StaggeredGrid(SilentGrid):
    """Node ``n`` replies ``delays[n]`` seconds after the push (a straggler when large)."""

    def __init__(self, delays: dict[int, float]) -> None:
        super().__init__(list(delays))
        self.delays, self.t0 = delays, 0.0

    def push_messages(self, messages: list[Message]) -> list[str]:
        self.t0 = time.monotonic()
        return super().push_messages(messages)

    def pull_messages(self, ids: list[str]) -> list[Message]:
        due = [i for i in ids if time.monotonic() - self.t0 >= self.delays[int(i[2:])]]
        return [Message(RecordDict(), metadata=_meta(int(i[2:]), reply_to=i)) for i in due]


def test_arrivals_record_when_each_node_replied() -> None:
    grid = _grid(StaggeredGrid({11: 0.0, 12: 0.4}), stall_timeout_s=5)
    grid.send_and_receive([Message(RecordDict(), metadata=_meta(n)) for n in (11, 12)],
                          timeout=5)
    got = grid.arrivals["train"]
    assert set(got) == {"11", "12"} and got["11"] < 0.1
    assert 0.4 <= got["12"] < 0.6  # the straggler, to the poll (0.05 s)


class FaultyGrid(SilentGrid):
    """Node 13 answers; the SuperLink (node 1) answers for dead nodes 11 and 12; node 14
    never answers."""

    def pull_messages(self, ids: list[str]) -> list[Message]:
        out = []
        for i in ids:
            node = int(i[2:])
            if node == 13:
                out.append(Message(RecordDict(), metadata=_meta(13, reply_to=i)))
            elif node in (11, 12):
                meta = _meta(node, reply_to=i)
                meta.__dict__["_src_node_id"] = 1  # what the SuperLink sends for a dead node
                out.append(Message(Error(ErrorCode.NODE_UNAVAILABLE, "node unavailable"),
                                   metadata=meta))
        return out

    def push_messages(self, messages: list[Message]) -> list[str]:
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"id{m.metadata.dst_node_id}"
        return super().push_messages(messages)


def test_replies_are_filed_under_the_node_they_were_sent_to() -> None:
    """A SuperLink-made error names the dead node, not the SuperLink; a node silent past
    the round timeout gets an error reply of its own; each node is rejected once."""
    from strategies import build_strategy
    from strategies.decoding import DecodingStrategy

    grid = _grid(FaultyGrid([11, 12, 13, 14]), stall_timeout_s=5)
    messages = [Message(RecordDict(), metadata=_meta(n)) for n in (11, 12, 13, 14)]
    replies = grid.send_and_receive(messages, timeout=0.5)
    by_node = {r.metadata.src_node_id: r for r in replies}
    assert sorted(by_node) == [11, 12, 13, 14]
    assert "SuperLink for node 12" in by_node[12].error.reason
    assert "no reply within" in by_node[14].error.reason
    assert not by_node[13].has_error()
    strategy = DecodingStrategy(build_strategy("fedavg", {}))
    errors = [r for r in replies if r.has_error()]
    strategy.aggregate_train(1, errors)
    assert sorted(strategy.traffic.rejected) == ["11", "12", "14"]


def _rec(rnd: int, accepted: int, rejected: dict[str, str]) -> RoundRecord:
    return RoundRecord(round=rnd, wall_time_s=1.0, num_clients=accepted,
                       num_rejected=len(rejected), rejected=rejected)


def test_health_warns_on_a_mostly_failed_round_and_fails_after_empty_rounds(
        caplog: pytest.LogCaptureFixture) -> None:
    health = RunHealth(max_empty_rounds=2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        health.check(_rec(1, 1, {"a": "partition-id=3: ValueError: bad", "b": "x"}))
        health.check(_rec(2, 0, {"a": "y"}))
    assert "2 of 3 clients failed or were rejected" in caplog.text
    with pytest.raises(NothingTrained) as info:
        health.check(_rec(3, 0, {"a": "z"}))
    assert info.value.first_error == "partition-id=3: ValueError: bad"
    assert "for 2 round(s) in a row" in str(info.value)
    assert "First client error: partition-id=3: ValueError: bad" in str(info.value)


@pytest.mark.parametrize("name", ["fedavg", "fedkseed"])
def test_server_maps_nodes_to_partitions_for_dense_and_replay_strategies(name: str) -> None:
    from server.app import _partition_of
    from strategies import STRATEGIES, build_strategy
    from strategies.decoding import DecodingStrategy

    strategy = build_strategy(name, {})
    if STRATEGIES.get(name).wrap:
        strategy = DecodingStrategy(strategy)
    strategy.partitions.known["5"] = 2
    assert _partition_of(strategy, "5") == 2 and _partition_of(strategy, "6") is None
