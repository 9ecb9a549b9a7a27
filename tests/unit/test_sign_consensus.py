"""Sign-consensus merge (TIES elect + disjoint mean), checked on cases done by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, Metadata
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import wire
from fedpeft.config import compose
from fedpeft.errors import ConfigError
from strategies import build_strategy
from strategies.decoding import DecodingStrategy
from strategies.sign_consensus import SignConsensus, sign_consensus

# Three clients, four coordinates.
D1 = [+1.0, -1.0, +2.0, +1.0]
D2 = [+1.0, +3.0, -1.0, +3.0]
D3 = [-2.0, -1.0, +0.0, -1.0]
# coordinate 0: sum 1 + 1 - 2 = 0, a tie: no sign has more mass, nothing agrees -> 0
# coordinate 1: sum -1 + 3 - 1 = +1 -> "+"; agreeing non-zero: 3 -> 3
# coordinate 2: sum 2 - 1 + 0 = +1 -> "+"; agreeing: 2 (the 0 does not count) -> 2
# coordinate 3: sum 1 + 3 - 1 = +3 -> "+"; agreeing: 1 and 3 -> (1 + 3) / 2 = 2
UNWEIGHTED = [0.0, 3.0, 2.0, 2.0]
# Weighted 1, 1, 4 (num-examples 10, 10, 40):
# coordinate 0: 1 + 1 - 4*2 = -6 -> "-"; agreeing: D3's -2 -> -2
# coordinate 1: -1 + 3 - 4*1 = -2 -> "-"; agreeing: D1's -1 (w 1), D3's -1 (w 4) -> -1
# coordinate 2: 2 - 1 + 0 = +1 -> "+"; agreeing: D1's 2 -> 2
# coordinate 3: 1 + 3 - 4*1 = 0, a tie -> 0
WEIGHTED = [-2.0, -1.0, 2.0, 0.0]


def test_hand_computed_example() -> None:
    merged = sign_consensus([np.array(d, np.float32) for d in (D1, D2, D3)])

    np.testing.assert_array_equal(merged, UNWEIGHTED)
    assert merged.dtype == np.float32


def test_hand_computed_example_weighted() -> None:
    merged = sign_consensus([np.array(d) for d in (D1, D2, D3)], weights=[10, 10, 40])

    np.testing.assert_array_equal(merged, WEIGHTED)


def test_negative_election_zeros_and_shape() -> None:
    # column 0: -2 + 1 - 2 = -3 -> "-"; agreeing -2, -2 -> -2. column 1: all 0 -> 0.
    deltas = [np.array([[-2.0, 0.0]]), np.array([[1.0, 0.0]]), np.array([[-2.0, 0.0]])]

    np.testing.assert_array_equal(sign_consensus(deltas), [[-2.0, 0.0]])


def test_ternary_updates_keep_their_size_where_a_mean_shrinks_them() -> None:
    # ternary {-s, 0, +s} with s = 0.5: two clients move +, one -, one does nothing
    deltas = [np.array([0.5]), np.array([0.5]), np.array([-0.5]), np.array([0.0])]

    assert sign_consensus(deltas)[0] == 0.5  # the mean would be 0.125


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")


def _reply(node: int, delta: list[float], n: int) -> Message:
    content = wire.reply_content(wire.to_arrayrecord({"w": np.array(delta, np.float32)}),
                                 n, {"train_loss": float(node)})
    return Message(content=content, metadata=_meta(node))


GLOBAL = {"w": np.array([10.0, -5.0, 0.0, 1.0], np.float32)}


@pytest.mark.parametrize(("weighted", "expected"), [(False, UNWEIGHTED), (True, WEIGHTED)])
def test_through_the_server_wrapper_merges_deltas_from_the_global(
    weighted: bool, expected: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):  # Flower sets them in a live run
        monkeypatch.setattr(TaskIdentity, key, 1)
    inner = build_strategy("sign_consensus", {"weighted": weighted})
    strat = DecodingStrategy(inner, name="sign_consensus")
    grid = SimpleNamespace(get_node_ids=lambda: [1, 2, 3])

    sent = list(strat.configure_train(1, wire.to_arrayrecord(GLOBAL), ConfigRecord(), grid))
    arrays, metrics = strat.aggregate_train(
        1, [_reply(1, D1, 10), _reply(2, D2, 10), _reply(3, D3, 40)])

    assert len(sent) == 3 and isinstance(inner, SignConsensus)
    np.testing.assert_allclose(wire.from_arrayrecord(arrays)["w"],
                               GLOBAL["w"] + np.array(expected, np.float32))
    assert metrics["train_loss"] == pytest.approx((1 * 10 + 2 * 10 + 3 * 40) / 60)


def test_aggregating_before_configure_train_says_why() -> None:
    strat = DecodingStrategy(build_strategy("sign_consensus", {}))
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}

    with pytest.raises(RuntimeError, match="configure_train must run first"):
        strat.aggregate_train(1, [_reply(1, D1, 10), _reply(2, D2, 10)])


def test_option_is_typed_and_typos_are_rejected() -> None:
    assert compose("strategy=sign_consensus strategy.weighted=true").strategy.params[
        "weighted"] is True
    with pytest.raises(ConfigError, match="did you mean weighted"):
        compose("strategy=sign_consensus strategy.weigthed=true")
    with pytest.raises(ConfigError, match="expected true or false"):
        compose("strategy=sign_consensus strategy.weighted=3")
