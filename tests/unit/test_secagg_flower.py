"""SecAgg+ over Flower messages, in one process: the server's decoding wrapper around
Flower's FedAvg and the client stage handlers of ``client/secagg.py`` exchange real
``Message`` objects through a loopback grid (real processes: test_simulation.py and
test_deployment.py under tests/integration). The aggregate equals plain FedAvg's, what the
server receives from a client looks uniform, a dropout after key sharing is survived, and
too many abort the round with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import secagg as client_stages
from fedpeft import secagg, wire
from fedpeft.config import SecAggConfig
from fedpeft.types import DenseUpdate
from strategies import build_strategy
from strategies.decoding import DecodingStrategy
from strategies.secagg import SecAggServer

NODES = [17139739380951909927, 7779486201788493592, 12345, 99]
REF = {"a.weight": np.zeros((3, 4), np.float32), "b.bias": np.zeros(5, np.float32)}
STAGES = {"train.secagg_keys": client_stages.keys, "train.secagg_share": client_stages.share,
          "train.secagg_unmask": client_stages.unmask}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("_run_id", "_node_id", "_task_id"):  # Flower sets them in a live run
        monkeypatch.setattr(TaskIdentity, key, 1)


class LoopGrid:
    """Delivers each message to its node's handler at once; ``silent`` nodes answer the
    key and share stages, then never again (a dropout after key sharing)."""

    def __init__(self, updates: dict[int, tuple[dict, int]], silent: set[int] = frozenset()):
        self.updates, self.silent = updates, set(silent)
        self.ctx = {n: Context(1, n, {}, RecordDict(), {}) for n in updates}
        self.received: dict[int, np.ndarray] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.updates)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        out = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            msg.metadata.__dict__["_message_id"] = f"{node}-{kind}"
            if node in self.silent and kind not in ("train.secagg_keys", "train.secagg_share"):
                continue
            out.append(STAGES[kind](msg, self.ctx[node]) if kind in STAGES
                       else self._train(msg))
        return out

    def _train(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        deltas, n = self.updates[node]
        arrays = client_stages.mask_update(deltas, float(n), msg, self.ctx[node])
        self.received[node] = arrays[wire.MASKED_KEY].numpy()
        return Message(wire.reply_content(arrays, n, {"train_loss": float(n)}), reply_to=msg)


def _updates(seed: int = 0) -> dict[int, tuple[dict, int]]:
    rng = np.random.default_rng(seed)
    return {node: ({k: rng.normal(size=v.shape).astype(np.float32) for k, v in REF.items()},
                   int(rng.integers(5, 40))) for node in NODES}


def _round(grid: LoopGrid, cfg: SecAggConfig) -> tuple[DecodingStrategy, dict | None]:
    strategy = DecodingStrategy(build_strategy("fedavg", {"min_available_nodes": 3,
                                                          "min_train_nodes": 3}))
    strategy.secagg = SecAggServer(cfg)
    messages = strategy.configure_train(1, wire.to_arrayrecord(REF), ConfigRecord(), grid)
    arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
    return strategy, None if arrays is None else wire.from_arrayrecord(arrays)


def _fedavg(updates: dict[int, tuple[dict, int]], skip=()) -> dict[str, np.ndarray]:
    kept = [(d, n) for node, (d, n) in updates.items() if node not in skip]
    total = sum(n for _, n in kept)
    return {k: sum(d[k].astype(np.float64) * n for d, n in kept) / total for k in REF}


def _sign_extended(words: np.ndarray) -> np.ndarray:
    """Words whose top 24 bits are all 0 or all 1: every fixed-point encoding of a value
    below 2^15 in magnitude (frac_bits 24), and almost no uniformly random word."""
    top = words.view(np.uint64) >> np.uint64(40)
    return (top == 0) | (top == (1 << 24) - 1)


def test_secure_round_equals_plain_fedavg_and_hides_each_update() -> None:
    updates = _updates()
    grid = LoopGrid(updates)
    strategy, result = _round(grid, SecAggConfig(enabled=True))
    expected = _fedavg(updates)
    assert all(np.abs(result[k] - expected[k]).max() < 1e-6 for k in REF)
    assert strategy.traffic.accepted == len(NODES) and not strategy.traffic.rejected
    assert strategy.last_train_metrics["train_loss"] == pytest.approx(
        sum(n * n for _, n in updates.values()) / sum(n for _, n in updates.values()))
    assert {"secagg_bytes_keys", "secagg_bytes_share", "secagg_bytes_unmask"} <= set(
        strategy.traffic.extra)
    received = np.concatenate(list(grid.received.values()))
    assert not _sign_extended(received).any()  # a uniform word: 2^-23 chance per word
    plain = secagg.encode(secagg.flatten(updates[99][0]), 1.0, 24, len(NODES))
    assert _sign_extended(plain).all()  # what the server would see without masks
    sent = wire.reply_content(wire.encode_update(DenseUpdate(updates[99][0])), 1, {})
    assert wire.payload_bytes(sent[wire.ARRAYS_KEY]) < received.nbytes / len(NODES)


def test_dropout_after_key_sharing_is_survived_and_too_many_abort() -> None:
    updates = _updates(1)
    cfg = SecAggConfig(enabled=True, degree=3, threshold=2)
    _, result = _round(LoopGrid(updates, silent={12345}), cfg)
    expected = _fedavg(updates, skip={12345})
    assert all(np.abs(result[k] - expected[k]).max() < 1e-6 for k in REF)
    strategy, result = _round(LoopGrid(updates, silent={12345, 99, 7779486201788493592}), cfg)
    assert result is None
    (reason,) = set(strategy.traffic.rejected.values())
    assert "secagg" in reason and "needed; too many clients dropped" in reason


def test_too_few_clients_fail_the_round_with_the_reason() -> None:
    updates = dict(list(_updates().items())[:2])
    strategy = DecodingStrategy(build_strategy("fedavg", {}))
    strategy.secagg = SecAggServer(SecAggConfig(enabled=True))
    messages = strategy.configure_train(1, wire.to_arrayrecord(REF), ConfigRecord(),
                                        LoopGrid(updates))
    assert messages == []
    assert "at least 3 clients" in strategy.traffic.rejected["secagg"]


def test_client_level_dp_noise_goes_on_the_unmasked_sum() -> None:
    """Clients clip and send weight 1; the server adds N(0, σ²C²) to the unmasked sum
    and divides by q·N: with σ = 0 that is the plain mean of the clipped deltas, with
    σ > 0 the result moves by about σC/(q·N) per coordinate."""
    from fedpeft.privacy.client import LEDGER_KEY, ClientDPConfig
    from strategies.client_dp import clip

    clipped = {n: (clip(d, 1.0)[0], 1) for n, (d, _) in _updates(2).items()}
    means = []
    for sigma in (0.0, 4.0):
        strategy = DecodingStrategy(build_strategy("fedavg", {"min_train_nodes": 3}))
        strategy.secagg = SecAggServer(SecAggConfig(enabled=True))
        strategy.enable_client_dp(ClientDPConfig(clip=1.0, noise_multiplier=sigma,
                                                 sample_rate=1.0))
        grid = LoopGrid(clipped)
        messages = strategy.configure_train(1, wire.to_arrayrecord(REF), ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(1, grid.send_and_receive(messages))
        means.append(wire.from_arrayrecord(arrays))
        assert LEDGER_KEY in strategy.traffic.privacy  # the round is accounted
    plain = _fedavg(clipped)
    assert all(np.abs(means[0][k] - plain[k]).max() < 1e-6 for k in REF)
    noise = np.concatenate([(means[1][k] - plain[k]).ravel() for k in REF])
    assert 0.5 < noise.std() / (4.0 / len(NODES)) < 1.6
