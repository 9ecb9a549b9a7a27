"""Replay strategies' Flower glue: round alignment with failed rounds, sync bookkeeping,
rejection of bad replies without crashing the round, client timing metrics."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from flwr.app import Error, Message, Metadata

from fedpeft import wire
from fedpeft.methods.fedkseed import FedKSeedConfig, decode_history
from strategies.fedkseed import FedKSeedStrategy


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=str(node), src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def _reply(node: int, idx: list[int], vals: list[float], n: int = 8) -> Message:
    arrays = {wire.SEED_IDX_KEY: np.array(idx, np.int32),
              wire.SEED_GRAD_KEY: np.array(vals, np.float32)}
    content = wire.reply_content(wire.to_arrayrecord(arrays), n,
                                 {"train_loss": 0.5, "train_time_s": 2.0 * node})
    return Message(content=content, metadata=_meta(node))


def _failed(node: int) -> Message:
    return Message(metadata=_meta(node), error=Error(code=0, reason="disk wiped"))


def _strategy() -> FedKSeedStrategy:
    strategy = FedKSeedStrategy()
    strategy.bind_method(SimpleNamespace(cfg=FedKSeedConfig(num_seeds=8)))
    return strategy


def test_a_round_without_accepted_updates_keeps_round_numbers_aligned() -> None:
    strategy = _strategy()
    strategy.aggregate_train(1, [_reply(1, [1], [1.0])])
    arrays, _ = strategy.aggregate_train(2, [_reply(1, [9], [1.0]), _failed(2)])  # all bad
    assert arrays is None and strategy.traffic.accepted == 0
    assert "outside" in strategy.traffic.rejected["1"]
    strategy.aggregate_train(3, [_reply(1, [3], [3.0])])

    assert strategy.acc.rounds == 3
    assert [(r, i.tolist()) for r, i, _ in decode_history(strategy.history_since(0))] == [
        (1, [1]), (3, [3])]


def test_sync_points_follow_replies_and_a_failed_node_gets_everything_again() -> None:
    strategy = _strategy()
    strategy.aggregate_train(1, [_reply(1, [1], [1.0]), _reply(2, [2], [1.0])])
    assert strategy.synced == {1: 0, 2: 0}
    strategy.aggregate_train(2, [_reply(1, [1], [1.0]), _failed(2)])

    assert strategy.synced == {1: 1}  # node 2's state may be lost: next time since = 0
    assert strategy.traffic.rejected == {"2": "client error: disk wiped"}


def test_round_metrics_average_client_seconds_and_weight_losses() -> None:
    strategy = _strategy()
    _, metrics = strategy.aggregate_train(1, [_reply(1, [1], [1.0]), _reply(2, [2], [1.0])])

    assert metrics["train_time_s"] == 3.0 and metrics["train_loss"] == 0.5
    assert strategy.traffic.accepted == 2 and strategy.traffic.aggregate_s > 0
    assert set(strategy.traffic.payload_bytes_up) == {"1", "2"}


def test_resumed_strategy_numbers_rounds_after_the_checkpoint() -> None:
    strategy = _strategy()
    strategy.aggregate_train(1, [_reply(1, [1], [1.0])])
    resumed = _strategy()
    resumed.load_state(strategy.state())
    resumed.round_offset = 1

    resumed.aggregate_train(1, [_reply(1, [4], [1.0])])  # Flower's round 1 = run round 2

    assert resumed.synced == {1: 1}
    assert [r for r, _, _ in decode_history(resumed.history_since(0))] == [1, 2]
