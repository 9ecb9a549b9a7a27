from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import (
    inflate_object_from_contents,
    push_objects,
)

from fedpeft import wire
from strategies.decoding import DecodingStrategy


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def _reply(node: int, deltas: dict, n: int = 10, **metrics: float) -> Message:
    content = wire.reply_content(wire.to_arrayrecord(deltas), n, {"train_loss": 1.0, **metrics})
    return Message(content=content, metadata=_meta(node))


GLOBAL = {"w": np.ones((3, 2), np.float32), "v": np.zeros(4, np.float32)}


def _prepared(inner=None) -> DecodingStrategy:
    strat = DecodingStrategy(inner or FedAvg())
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    return strat


def test_fedavg_of_deltas_equals_global_plus_weighted_mean_delta() -> None:
    d1 = {"w": np.full((3, 2), 1.0, np.float32), "v": np.full(4, 2.0, np.float32)}
    d2 = {"w": np.full((3, 2), 4.0, np.float32), "v": np.full(4, -1.0, np.float32)}
    strat = _prepared()

    arrays, metrics = strat.aggregate_train(1, [_reply(1, d1, n=10), _reply(2, d2, n=30)])

    out = wire.from_arrayrecord(arrays)
    np.testing.assert_allclose(out["w"], 1.0 + (10 * 1.0 + 30 * 4.0) / 40)
    np.testing.assert_allclose(out["v"], 0.0 + (10 * 2.0 - 30 * 1.0) / 40)
    assert metrics["train_loss"] == pytest.approx(1.0)
    assert strat.traffic.accepted == 2 and not strat.traffic.rejected


def test_bad_clients_are_rejected_and_the_round_continues() -> None:
    good = {"w": np.full((3, 2), 2.0, np.float32), "v": np.zeros(4, np.float32)}
    nan = {"w": np.full((3, 2), np.nan, np.float32), "v": np.zeros(4, np.float32)}
    shape = {"w": np.zeros((2, 3), np.float32), "v": np.zeros(4, np.float32)}
    no_n = Message(content=RecordDict({"arrays": wire.to_arrayrecord(good),
                                       "metrics": MetricRecord({"loss": 1.0})}),
                   metadata=_meta(9))
    strat = _prepared()

    arrays, _ = strat.aggregate_train(
        1, [_reply(1, good), _reply(2, nan), _reply(3, shape), no_n,
            _reply(4, good, extra_metric=5.0)])

    np.testing.assert_allclose(wire.from_arrayrecord(arrays)["w"], 3.0)
    assert strat.traffic.accepted == 2
    assert set(strat.traffic.rejected) == {"2", "3", "9"}
    assert "NaN" in strat.traffic.rejected["2"] and "shape" in strat.traffic.rejected["3"]
    assert "num-examples" in strat.traffic.rejected["9"]


def test_all_rejected_keeps_global_state() -> None:
    nan = {"w": np.full((3, 2), np.nan, np.float32), "v": np.zeros(4, np.float32)}
    strat = _prepared()

    assert strat.aggregate_train(1, [_reply(1, nan)]) == (None, None)


def test_server_optimizer_sees_pseudo_gradient_of_full_weights() -> None:
    delta = {"w": np.full((3, 2), 0.5, np.float32), "v": np.full(4, 0.5, np.float32)}
    inner = FedAdam(eta=0.1, tau=1e-9)
    inner.current_arrays = {k: v.copy() for k, v in GLOBAL.items()}  # as configure_train
    strat = _prepared(inner)

    arrays, _ = strat.aggregate_train(1, [_reply(1, delta), _reply(2, delta)])

    moved = wire.from_arrayrecord(arrays)["w"] - GLOBAL["w"]
    # Adam's step follows the delta's sign but its size is set by eta, not by the delta
    # (plain averaging of full weights would have moved by exactly 0.5).
    assert np.all(moved > 0) and np.all(moved < 0.2)


def test_counted_bytes_are_exactly_what_flower_pushes_and_suffice_to_rebuild() -> None:
    msg = _reply(5, {"w": np.arange(6, dtype=np.float32).reshape(3, 2),
                     "v": np.ones(4, np.float32)})
    pushed: dict[str, bytes] = {}

    push_objects(get_all_nested_objects(msg), lambda oid, b: pushed.__setitem__(oid, b),
                 keep_objects=True)

    assert wire.message_bytes(msg) == sum(len(b) for b in pushed.values())
    rebuilt = inflate_object_from_contents(msg.object_id, dict(pushed))
    got = wire.from_arrayrecord(rebuilt.content["arrays"])
    np.testing.assert_array_equal(got["w"], np.arange(6, dtype=np.float32).reshape(3, 2))
