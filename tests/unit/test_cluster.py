"""Ray attachment, client placement and arrival-order independent aggregation."""

from __future__ import annotations

import itertools
import socket

import numpy as np
import pytest
from flwr.app import Message, Metadata
from flwr.serverapp.strategy import FedAvg

from fedpeft import cluster, wire
from fedpeft.config import compose
from fedpeft.errors import ConfigError
from fedpeft.procs import RunWorkspace
from strategies.decoding import DecodingStrategy, NodePartitions


def _reply(node: int, pid: int, value: float, where: dict | None = None) -> Message:
    arrays = wire.to_arrayrecord({"w": np.full(3, value, np.float32)})
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    content = wire.reply_content(arrays, 10, {"train_loss": 1.0}, partition_id=pid,
                                 placement=where)
    return Message(content=content, metadata=meta)


def _aggregate(order: tuple[int, ...]) -> np.ndarray:
    values = [5e5, 0.013, -5e5, 0.37, 0.0021]  # float32 sums of these depend on their order
    replies = [_reply(100 - i, i, values[i]) for i in order]
    strat = DecodingStrategy(FedAvg())
    strat._global = {"w": np.zeros(3, np.float32)}
    arrays, _ = strat.aggregate_train(1, replies)
    return wire.from_arrayrecord(arrays)["w"]


def test_aggregate_is_bit_identical_whatever_order_replies_arrive_in() -> None:
    results = {_aggregate(p).tobytes() for p in itertools.permutations(range(5))}
    assert len(results) == 1


def test_replies_are_ordered_by_partition_then_node_unknown_last() -> None:
    unknown = _reply(1, 0, 0.0)
    unknown.content.metric_records[wire.METRICS_KEY].pop(wire.PARTITION_ID_KEY)
    replies = [_reply(5, 2, 0.0), unknown, _reply(9, 0, 0.0), _reply(3, 1, 0.0)]
    ordered = NodePartitions().ordered(replies)
    assert [m.metadata.src_node_id for m in ordered] == [9, 3, 5, 1]


def test_placement_is_recorded_per_partition() -> None:
    strat = DecodingStrategy(FedAvg())
    strat._global = {"w": np.zeros(3, np.float32)}
    where = {"host": "h1", "ray_node": "abc", "ray_ip": "198.18.0.3"}
    strat.aggregate_train(1, [_reply(7, 2, 1.0, where), _reply(8, 3, 1.0)])
    assert strat.partitions.placement(strat.traffic.bytes_up) == {"2": where}


def test_placement_outside_ray_names_the_host_only() -> None:
    assert cluster.placement() == {"host": socket.gethostname()}
    assert cluster.ray_nodes() is None


def test_default_workspace_never_joins_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # a user's shell pointing at a cluster
    ws = RunWorkspace()
    try:
        env = ws.env()
        assert env["RAY_ADDRESS"] == "local" and env["RAY_TMPDIR"] == str(ws.path)
        joined = RunWorkspace(ray_address="auto")
        assert joined.env()["RAY_ADDRESS"] == "10.1.2.3:6379"
        assert joined.env().get("RAY_TMPDIR") != str(joined.path)  # Ray finds the cluster
        joined.remove()
    finally:
        ws.remove()
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster.ray_env("auto") == {"RAY_ADDRESS": "auto"}
    assert cluster.ray_env("198.18.0.2:6379") == {"RAY_ADDRESS": "198.18.0.2:6379"}


@pytest.mark.parametrize("bad", ["local", "nohost", "10.0.0.1:port", "a b:1"])
def test_bad_ray_address_fails_validation(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"sim\.ray_address"):
        compose([f"sim.ray_address={bad}"])


def test_good_ray_addresses_validate() -> None:
    assert compose(["sim.ray_address=auto"]).sim.ray_address == "auto"
    assert compose(["sim.ray_address=head.example:6379"]).sim.ray_address == "head.example:6379"
    assert compose([]).sim.ray_address is None
