"""Every registered strategy: has a YAML, composes, builds, and aggregates deltas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, Metadata
from flwr.serverapp.strategy import FedAvgM, QFedAvg
from flwr.serverapp.strategy.fedopt import FedOpt

from fedpeft import wire
from fedpeft.config import compose
from fedpeft.methods import METHODS
from strategies import STRATEGIES, build_strategy
from strategies.decoding import DecodingStrategy
from strategies.sign_consensus import SignConsensus

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "strategy"
OPTIMIZERS = {"fedadam", "fedyogi", "fedadagrad", "qfedavg", "fedavgm"}


def test_flower_builtins_are_registered() -> None:
    expected = {"fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"}
    assert expected <= set(STRATEGIES.names())


DENSE = [n for n in STRATEGIES.names() if "dense" in STRATEGIES.get(n).accepts]


def _compose(name: str):
    """Compose the strategy with a method whose update kind it accepts."""
    accepts = STRATEGIES.get(name).accepts
    method = next(m for m in ("lora", "fedkseed", "ferret")
                  if METHODS.get(m).update_kind in accepts)
    return compose(f"strategy={name} method={method}")


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_strategy_has_yaml_and_composes(name: str) -> None:
    assert (CONFIGS / f"{name}.yaml").is_file()

    cfg = _compose(name)

    assert cfg.strategy.name == name
    assert STRATEGIES.get(name).paper


def _as_if_configured(inner: object, glob: dict) -> None:
    """Set the round state ``configure_train`` would set (it needs a live grid)."""
    if isinstance(inner, FedOpt):
        inner.current_arrays = {k: v.copy() for k, v in glob.items()}
    elif isinstance(inner, (QFedAvg, FedAvgM, SignConsensus)):
        inner.current_arrays = wire.to_arrayrecord(glob)


def _reply(node: int, delta: dict) -> Message:
    meta = Metadata(run_id=1, message_id=str(node), src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    content = wire.reply_content(wire.to_arrayrecord(delta), 8, {"train_loss": 0.5})
    return Message(content=content, metadata=meta)


@pytest.mark.parametrize("name", DENSE)
def test_strategy_aggregates_identical_deltas_towards_them(name: str) -> None:
    cfg = compose(f"strategy={name}")
    inner = build_strategy(name, cfg.strategy.params)
    glob = {"a": np.zeros((2, 3), np.float32), "b": np.ones(5, np.float32)}
    delta = {"a": np.full((2, 3), 0.25, np.float32), "b": np.full(5, -0.5, np.float32)}
    _as_if_configured(inner, glob)
    strat = DecodingStrategy(inner)
    strat._global = glob

    arrays, _ = strat.aggregate_train(1, [_reply(i, delta) for i in range(1, 8)])

    out = wire.from_arrayrecord(arrays)
    moved = {k: out[k] - glob[k] for k in glob}
    if name in OPTIMIZERS:  # server optimisers rescale, but must follow the delta's sign
        for k in glob:
            assert np.all(np.sign(moved[k]) == np.sign(delta[k]))
    else:
        for k in glob:
            np.testing.assert_allclose(moved[k], delta[k], rtol=1e-5)
