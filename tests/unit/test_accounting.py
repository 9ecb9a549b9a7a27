"""Tests for fedpeft.privacy.accounting: reference ε, exact composition, resume, edge cases.

Reference values are Opacus 1.6's own (RDP and PRV at eps_error 0.01); PRV on 3120 steps
takes ~0.2 s, so PRV is used only where a test needs it.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpeft.errors import ConfigError
from fedpeft.privacy import accounting
from fedpeft.privacy.accounting import PrivacyEvent, PrivacyLedger, noise_for_target

E = PrivacyEvent
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


def _ledger(*events: PrivacyEvent, key: str = "0") -> PrivacyLedger:
    ledger = PrivacyLedger()
    for r, event in enumerate(events, start=1):
        ledger.record(key, event, r)
    return ledger


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "rdp", "prv"), [
    (0.0064, 1.0, 3120, 1e-5, 2.2069, 1.9952),
    (0.1, 1.0, 200, 1e-3, 8.1842, 7.1069),
])
def test_reference_values(q: float, sigma: float, steps: int, delta: float, rdp: float,
                          prv: float) -> None:
    ledger = _ledger(E(sigma, q, steps))
    assert ledger.epsilon("0", delta, "rdp") == pytest.approx(rdp, rel=5e-3)
    assert ledger.epsilon("0", delta, "prv") == pytest.approx(prv, rel=5e-3)


def test_split_over_rounds_and_calls_equals_one_history() -> None:
    split = PrivacyLedger()
    for r, steps in [(1, 1000), (2, 500), (2, 500), (3, 0), (4, 1000), (5, 120)]:
        split.record("c", E(1.0, 0.0064, steps), r)
    assert split.history("c") == [(1.0, 0.0064, 3120)]
    whole = _ledger(E(1.0, 0.0064, 3120), key="c")
    for accountant, reference in (("rdp", 2.2069), ("prv", 1.9952)):
        eps = split.epsilon("c", 1e-5, accountant)
        assert eps == whole.epsilon("c", 1e-5, accountant)
        assert eps == pytest.approx(reference, rel=5e-3)
    assert split.rounds("c") == [1, 2, 3, 4, 5]


def test_heterogeneous_events_match_opacus_stepping() -> None:
    plan = [(1.0, 0.01, 30), (1.2, 0.02, 20), (1.0, 0.01, 10), (1.0, 0.01, 5)]
    ledger = _ledger(*(E(s, q, n) for s, q, n in plan))
    for cls in (RDPAccountant, PRVAccountant):
        reference = cls()
        for sigma, q, n in plan:
            for _ in range(n):
                reference.step(noise_multiplier=sigma, sample_rate=q)
        assert ledger.history("0") == reference.history
        assert ledger.epsilon("0", 1e-5, cls.mechanism()) == reference.get_epsilon(delta=1e-5)


def test_keys_are_independent_and_worst_picks_the_most_exposed() -> None:
    ledger = PrivacyLedger()
    for r in (1, 2, 3):
        for key in ("a", "b", "c")[: 4 - r]:  # a in 3 rounds, b in 2, c in 1
            ledger.record(key, E(1.0, 0.05, 20), r)
    for accountant in ("rdp", "prv"):
        eps = {k: ledger.epsilon(k, 1e-5, accountant) for k in "abc"}
        assert eps["a"] > eps["b"] > eps["c"] > 0
        assert ledger.worst(1e-5, accountant) == ("a", eps["a"])
        alone = _ledger(E(1.0, 0.05, 20), E(1.0, 0.05, 20), key="b")
        assert eps["b"] == alone.epsilon("b", 1e-5, accountant)
    assert ledger.epsilon("never-sampled", 1e-5) == 0.0
    assert PrivacyLedger().worst(1e-5) is None


EVENTS = st.builds(E, st.sampled_from([0.7, 1.0, 2.5]), st.sampled_from([0.005, 0.05, 0.2]),
                   st.integers(0, 40))


@settings(max_examples=25, deadline=None)
@given(st.lists(EVENTS, min_size=1, max_size=12))
def test_rdp_epsilon_never_decreases_as_events_are_added(events: list[E]) -> None:
    _assert_monotone(events, "rdp")


@settings(max_examples=3, deadline=None)  # PRV: ~0.2-1 s per new history
@given(st.lists(EVENTS, min_size=1, max_size=4))
def test_prv_epsilon_never_decreases_as_events_are_added(events: list[E]) -> None:
    _assert_monotone(events, "prv")


def _assert_monotone(events: list[E], accountant: str) -> None:
    ledger, previous = PrivacyLedger(), 0.0
    for r, event in enumerate(events, start=1):
        predicted = ledger.epsilon_if("k", event, 1e-5, accountant)
        ledger.record("k", event, r)
        eps = ledger.epsilon("k", 1e-5, accountant)
        assert eps == predicted
        assert eps >= previous
        previous = eps


def test_epsilon_if_records_nothing_and_works_for_new_keys() -> None:
    ledger = _ledger(E(1.0, 0.05, 20))
    before = ledger.to_dict()
    grown = ledger.epsilon_if("0", E(1.0, 0.05, 20), 1e-5)
    assert grown > ledger.epsilon("0", 1e-5)
    assert ledger.epsilon_if("new", E(1.0, 0.05, 20), 1e-5) == ledger.epsilon("0", 1e-5)
    assert ledger.to_dict() == before


def test_save_load_round_trip_and_resume_continues(tmp_path) -> None:
    path = tmp_path / "run" / "ledger.json"
    events = [E(1.1, 0.013, 7), E(0.9, 0.021, 11), E(1.1, 0.013, 3)]
    ledger = PrivacyLedger()
    for r, event in enumerate(events, start=1):
        ledger.record(str(r % 2), event, r)
    ledger.save(path)
    loaded = PrivacyLedger.load(path)
    assert loaded.to_dict() == ledger.to_dict()
    for key in ("0", "1"):
        for accountant in ("rdp", "prv"):
            assert loaded.epsilon(key, 1e-5, accountant) == ledger.epsilon(key, 1e-5, accountant)
    before = loaded.epsilon("1", 1e-5)
    loaded.record("1", E(1.1, 0.013, 5), 4)
    loaded.save(path)
    resumed = PrivacyLedger.load(path)
    assert resumed.epsilon("1", 1e-5) > before
    assert resumed.history("1") == [(1.1, 0.013, 15)]
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temp files left


def test_load_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="missing_ok"):
        PrivacyLedger.load(tmp_path / "absent.json")
    assert PrivacyLedger.load(tmp_path / "absent.json", missing_ok=True).keys() == []


_GOOD_EVENT = {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3,
               "level": "sample"}


def _doc(**changes: object) -> str:
    doc = {"format": "fedpeft-privacy-ledger", "version": 1, "entries": {"0": [_GOOD_EVENT]}}
    doc.update(changes)
    return json.dumps(doc)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "expected JSON"),
    ("[]", "format"),
    (_doc(format="something-else"), "format"),
    (_doc(version=2), "version: expected 1, found 2"),
    (_doc(entries=[]), "entries: expected a JSON object"),
    (_doc(entries={"0": {}}), "expected a list of events"),
    (_doc(entries={"0": [{"noise_multiplier": 1.0}]}), "'round'"),
    (_doc(entries={"0": [{**_GOOD_EVENT, "steps": -1}]}), "steps: expected an integer >= 0"),
    (_doc(entries={"0": [{**_GOOD_EVENT, "round": -1}]}), "round: expected an integer >= 0"),
    (_doc(entries={"0": [{**_GOOD_EVENT, "extra": 1}]}), "expected fields"),
    (_doc(entries={"0": [{**_GOOD_EVENT, "sample_rate": 2}]}), r"sample_rate: expected .*\(0, 1\]"),
    (_doc(entries={"0": [_GOOD_EVENT, {**_GOOD_EVENT, "level": "client"}]}), "level"),
    (_doc(entries={"": [_GOOD_EVENT]}), "non-empty string"),
    (_doc().replace("1.0", "NaN"), "noise_multiplier"),
])
def test_malformed_ledger_file_is_rejected(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "ledger.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        PrivacyLedger.load(path)
    assert str(path) in str(info.value)


def test_zero_noise_is_infinite_and_json_safe(tmp_path) -> None:
    ledger = _ledger(E(1.0, 0.05, 10), E(0.0, 0.05, 10), key="leaky")
    ledger.record("ok", E(1.0, 0.05, 10), 1)
    ledger.record("no-steps", E(0.0, 0.05, 0), 1)  # nothing released
    for accountant in ("rdp", "prv"):
        assert ledger.epsilon("leaky", 1e-5, accountant) == math.inf
        assert ledger.worst(1e-5, accountant) == ("leaky", math.inf)
        assert ledger.epsilon("no-steps", 1e-5, accountant) == 0.0
    summary = ledger.summary(1e-5)
    text = json.dumps(summary)
    assert "Infinity" not in text and "NaN" not in text
    json.dumps(summary, allow_nan=False)
    assert summary["keys"]["leaky"]["rdp"] == summary["keys"]["leaky"]["prv"] == "inf"
    assert summary["keys"]["leaky"]["prv_fallback"] is None  # inf by rule, not by failure
    assert summary["worst"]["prv"] == {"key": "leaky", "epsilon": "inf"}
    assert float(summary["keys"]["leaky"]["rdp"]) == math.inf
    ledger.save(tmp_path / "l.json")
    assert PrivacyLedger.load(tmp_path / "l.json").epsilon("leaky", 1e-5) == math.inf


def test_summary_layout() -> None:
    ledger = _ledger(E(1.0, 0.0064, 3000), E(1.0, 0.0064, 120), key="7")
    summary = json.loads(json.dumps(ledger.summary(1e-5), allow_nan=False))
    assert summary["delta"] == 1e-5
    assert summary["keys"]["7"] == {
        "level": "sample", "rounds": [1, 2], "steps": 3120, "prv_fallback": None,
        "rdp": pytest.approx(2.2069, rel=5e-3), "prv": pytest.approx(1.9952, rel=5e-3)}
    assert summary["worst"]["rdp"]["key"] == summary["worst"]["prv"]["key"] == "7"
    assert PrivacyLedger().summary(1e-5) == {"delta": 1e-5, "keys": {},
                                             "worst": {"rdp": None, "prv": None}}


def test_prv_falls_back_to_rdp_and_says_so(monkeypatch) -> None:
    accounting._compose.cache_clear()
    capped = PrivacyLedger(prv_max_grid=1)
    capped.record("k", E(1.3, 0.03, 17), 1)
    rdp = capped.epsilon("k", 1e-5, "rdp")
    assert capped.epsilon("k", 1e-5, "prv") == rdp
    assert "exceeds the limit" in capped.summary(1e-5)["keys"]["k"]["prv_fallback"]
    for broken in (lambda h, d: float("nan"), lambda h, d: 1 / 0):
        accounting._compose.cache_clear()
        monkeypatch.setattr(accounting, "_prv", broken)
        ledger = _ledger(E(1.3, 0.03, 17), key="k")
        assert ledger.epsilon("k", 1e-5, "prv") == rdp
        assert ledger.summary(1e-5)["keys"]["k"]["prv_fallback"].startswith("PRV ")
    accounting._compose.cache_clear()


@pytest.mark.parametrize(("accountant", "q", "steps"), [("rdp", 0.0064, 3120),
                                                        ("prv", 0.05, 100)])
def test_noise_for_target_meets_the_target_closely(accountant: str, q: float,
                                                   steps: int) -> None:
    sigma = noise_for_target(2.0, 1e-5, q, steps, accountant)
    eps = _ledger(E(sigma, q, steps)).epsilon("0", 1e-5, accountant)
    assert 2.0 - 0.02 <= eps <= 2.0


def test_noise_for_target_falls_back_to_rdp_sigma_when_prv_cannot_certify(monkeypatch) -> None:
    honest = noise_for_target(2.0, 1e-5, 1.0, 1, "prv")
    rdp = noise_for_target(2.0, 1e-5, 1.0, 1, "rdp")
    assert honest < rdp
    monkeypatch.setattr(accounting, "_prv", lambda h, d: float("nan"))
    accounting._compose.cache_clear()
    assert noise_for_target(2.0, 1e-5, 1.0, 1, "prv") == rdp
    accounting._compose.cache_clear()


@pytest.mark.parametrize(("target", "message"), [
    (0.0, "target_epsilon: expected a finite number > 0, found 0.0"),
    (-1.0, "target_epsilon"),
    (math.inf, "target_epsilon"),
    (math.nan, "target_epsilon"),
    (1e-7, "expected a budget reachable"),
])
def test_noise_for_target_rejects_infeasible_targets(target: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        noise_for_target(target, 1e-5, 1.0, 1000)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"noise_multiplier": -0.1}, r"noise_multiplier: expected a finite number >= 0, found -0\.1"),
    ({"noise_multiplier": math.inf}, "noise_multiplier: expected"),
    ({"noise_multiplier": "1.0"}, "noise_multiplier: expected"),
    ({"sample_rate": 0.0}, r"sample_rate: expected a number in \(0, 1\], found 0\.0"),
    ({"sample_rate": 1.5}, "sample_rate: expected"),
    ({"sample_rate": math.nan}, "sample_rate: expected"),
    ({"steps": -1}, "steps: expected an integer >= 0, found -1"),
    ({"steps": 2.0}, "steps: expected an integer"),
    ({"steps": True}, "steps: expected an integer"),
    ({"level": "user"}, "unknown PrivacyEvent.level 'user'; valid choices: client, sample"),
])
def test_bad_events_are_rejected_with_expected_and_found(kwargs: dict, message: str) -> None:
    fields = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        PrivacyEvent(**fields)


def test_event_dict_round_trip_and_normalisation() -> None:
    event = PrivacyEvent(1, 0.5, 3, "client")
    assert isinstance(event.noise_multiplier, float)
    assert PrivacyEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event


def test_misuse_of_the_ledger_is_rejected() -> None:
    ledger = _ledger(E(1.0, 0.1, 1))
    with pytest.raises(ConfigError, match="sample-level events; found a client-level"):
        ledger.record("0", E(1.0, 0.1, 1, "client"), 2)
    with pytest.raises(ConfigError, match="unknown privacy accountant 'gdp'; valid choices"):
        ledger.epsilon("0", 1e-5, "gdp")
    with pytest.raises(ConfigError, match=r"delta: expected a number in \(0, 1\), found 0"):
        ledger.epsilon("0", 0)
    with pytest.raises(ConfigError, match="ledger key: expected a non-empty string"):
        ledger.record(3, E(1.0, 0.1, 1), 1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expected a PrivacyEvent"):
        ledger.record("0", (1.0, 0.1, 1), 1)  # type: ignore[arg-type]
    assert ledger.worst(1e-5, level="client") is None


def test_event_metrics_round_trip_and_partial_reports_fail() -> None:
    event = E(1.3, 0.02, 7)
    assert accounting.event_from_metrics(accounting.event_metrics(event)) == event
    assert accounting.event_from_metrics({"train_loss": 1.0}) is None
    with pytest.raises(ConfigError, match="expected all of"):
        accounting.event_from_metrics({"dp_noise_multiplier": 1.0, "dp_steps": 3.0})
    with pytest.raises(ConfigError, match="must be whole"):
        accounting.event_from_metrics({**accounting.event_metrics(event), "dp_steps": 2.5})
