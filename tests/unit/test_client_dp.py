"""Client-level DP truths: bounded influence, noise scale, Poisson sampling, validation,
and the server's ledger and budget (``privacy=client``)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Message, Metadata
from flwr.serverapp.strategy import FedAvg

from fedpeft import wire
from fedpeft.config import compose
from fedpeft.errors import BudgetExhausted, IncompatibleComponentsError
from fedpeft.privacy.client import ClientDPConfig, noisy_mean, poisson_sample, secure_rng
from fedpeft.reporting import RunDir
from server.privacy import PrivacyBook
from strategies import client_dp
from strategies.decoding import DecodingStrategy

GLOBAL = {"a": np.zeros((64, 32), np.float32), "b": np.zeros(500, np.float32)}


def _reply(node: int, deltas: dict) -> Message:
    content = wire.reply_content(wire.to_arrayrecord(deltas), 10, {"train_loss": 1.0},
                                 partition_id=node)
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    return Message(content=content, metadata=meta)


def _strategy(cfg: ClientDPConfig, expected: float) -> DecodingStrategy:
    strat = DecodingStrategy(FedAvg())
    strat.enable_client_dp(cfg)
    strat._global = {k: v.copy() for k, v in GLOBAL.items()}
    strat._expected = expected
    return strat


def _step(strat: DecodingStrategy, deltas: list[dict]) -> dict[str, np.ndarray]:
    arrays, _ = strat.aggregate_train(1, [_reply(i, d) for i, d in enumerate(deltas)])
    new = wire.from_arrayrecord(arrays)
    return {k: new[k] - GLOBAL[k] for k in GLOBAL}


def _norm(arrays: dict) -> float:
    return float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in arrays.values())))


def test_one_client_moves_the_aggregate_by_at_most_c_over_expected_clients() -> None:
    cfg = ClientDPConfig(clip=0.5, noise_multiplier=0.0, sample_rate=0.5)
    rng = np.random.default_rng(0)
    honest = {k: rng.normal(0, 1e-4, v.shape).astype(np.float32) for k, v in GLOBAL.items()}
    huge = {k: 1e3 * np.ones_like(v) for k, v in GLOBAL.items()}
    with_it = _step(_strategy(cfg, 4.0), [honest, huge])
    without = _step(_strategy(cfg, 4.0), [honest])
    moved = _norm({k: with_it[k] - without[k] for k in GLOBAL})
    assert moved == pytest.approx(0.5 / 4.0, rel=1e-4)  # clipped to C, divided by q·N
    assert moved <= 0.5 / 4.0 * (1 + 1e-5)


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_noise_std_is_sigma_c_over_expected_clients(sigma: float) -> None:
    cfg = ClientDPConfig(clip=2.0, noise_multiplier=sigma, sample_rate=0.5)
    zero = {k: np.zeros_like(v) for k, v in GLOBAL.items()}
    step = _step(_strategy(cfg, 5.0), [zero, zero])
    values = np.concatenate([v.ravel() for v in step.values()])
    assert float(values.std()) == pytest.approx(sigma * 2.0 / 5.0, rel=0.05)
    assert abs(float(values.mean())) < 0.05 * sigma


def test_noise_comes_fresh_from_the_os_not_a_run_seed() -> None:
    cfg = ClientDPConfig(clip=1.0, noise_multiplier=1.0)
    zero = [{"a": np.zeros(1000, np.float32)}]
    one, two = (noisy_mean(zero, cfg, 2.0, secure_rng())["a"] for _ in range(2))
    assert not np.array_equal(one, two)


def test_sampling_is_poisson_not_a_fixed_count() -> None:
    nodes, q, trials = list(range(40)), 0.25, 2000
    counts = np.array([len(poisson_sample(nodes, q)) for _ in range(trials)])
    assert counts.mean() == pytest.approx(len(nodes) * q, rel=0.03)
    assert counts.var() == pytest.approx(len(nodes) * q * (1 - q), rel=0.15)  # binomial
    assert counts.min() < counts.max()


def test_the_strategy_samples_from_every_node_and_records_one_event_per_round() -> None:
    cfg = ClientDPConfig(sample_rate=0.3)
    strat = _strategy(cfg, 0.0)
    assert strat.inner.fraction_train == 1.0  # Flower builds messages for all nodes
    msgs = [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in range(100)]
    kept, expected = client_dp.sample(msgs, cfg)
    assert expected == pytest.approx(30.0) and 10 < len(kept) < 60
    strat.aggregate_train(1, [])
    assert strat.traffic.privacy == {"clients": cfg.event()}


@pytest.mark.parametrize(("overrides", "fragment"), [
    ("privacy=client strategy=krum", "strategy=krum: its sensitivity bound"),
    ("privacy=client strategy=qfedavg", "Strategies that fit: fedavg"),
    ("privacy=client method=fedkseed strategy=fedkseed", "use privacy=dpzo"),
    ("privacy=client method=ferret strategy=ferret", "privacy=dpsgd (ferret)"),
])
def test_combinations_that_cannot_be_private_fail_and_say_why(overrides: str,
                                                              fragment: str) -> None:
    with pytest.raises(IncompatibleComponentsError, match=fragment.replace("(", r"\(")
                       .replace(")", r"\)")):
        compose(overrides)


def _book(tmp_path, overrides: str, resume: bool = False) -> PrivacyBook:
    return PrivacyBook(compose(overrides), RunDir(tmp_path), resume=resume)


def test_ledger_reports_every_round_and_resume_continues(tmp_path) -> None:
    book = _book(tmp_path, "privacy=client")
    event = book.mechanism.cfg.event()
    first = book.record_round(1, {"clients": event})
    second = book.record_round(2, {"clients": event})
    assert 0 < first["epsilon_prv"] <= first["epsilon_rdp"] < second["epsilon_rdp"]
    doc = json.loads((tmp_path / "privacy.json").read_text())
    assert doc["epsilon_rdp"]["clients"] == second["epsilon_rdp"]
    resumed = _book(tmp_path, "privacy=client", resume=True)
    third = resumed.record_round(3, {"clients": event})
    assert third["epsilon_rdp"] > second["epsilon_rdp"]  # continued, not reset
    (tmp_path / "other").mkdir()
    fresh = _book(tmp_path / "other", "privacy=client")
    assert fresh.record_round(1, {"clients": event})["epsilon_rdp"] == first["epsilon_rdp"]


def test_budget_stops_the_run_before_a_round_would_exceed_it(tmp_path) -> None:
    book = _book(tmp_path, "privacy=client privacy.max_epsilon=5")
    assert book.admit([1, 2, 3], lambda n: n, 1) == [1, 2, 3]  # ε after round 1: 3.9
    book.record_round(1, {"clients": book.mechanism.cfg.event()})
    with pytest.raises(BudgetExhausted, match=r"before round 2.*max_epsilon=5"):
        book.admit([1, 2, 3], lambda n: n, 2)  # round 2 would reach 5.4


def test_sample_level_budget_leaves_out_only_the_exhausted_clients(tmp_path) -> None:
    from fedpeft.privacy.accounting import PrivacyEvent

    book = _book(tmp_path, "privacy=client privacy.max_epsilon=5")
    book.mechanism.level = "sample"  # the book's rule for client-side mechanisms
    book.record_round(1, {"7": PrivacyEvent(1.0, 0.5, 2), "8": PrivacyEvent(1.0, 0.01, 2)})
    assert book.admit([7, 8, 9], lambda n: n, 2) == [8, 9]  # 9 never reported: no cost yet


def test_target_epsilon_chooses_sigma_for_the_planned_rounds_and_validate_shows_it() -> None:
    from fedpeft.preflight import privacy_line
    from fedpeft.privacy.accounting import PrivacyLedger

    cfg = compose("privacy=client privacy.target_epsilon=3 privacy.sample_rate=0.25 "
                  "run.num_rounds=10")
    ledger = PrivacyLedger()
    for rnd in range(1, 11):
        ledger.record("clients", cfg.privacy.event(), rnd)
    assert 2.9 < ledger.epsilon("clients", 1e-5) <= 3.0
    assert cfg.privacy.noise_multiplier != 1.0  # replaced, not the YAML default
    assert "(chosen for target epsilon 3.0)" in privacy_line(cfg.privacy)
