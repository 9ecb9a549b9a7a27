"""The attack interface: what an observation may hold, the registry, the ReCIT pieces
on planted signals, and order invariance on a real (tiny) model's updates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import attacks
from attacks.base import ATTACKS, AttackContext, Observation
from attacks.metrics import Truth, score_batch
from attacks.recit import RecitAttack, RecitConfig, first_layer_rows, matching_pursuit
from attacks.victims import faker_records
from fedpeft.errors import ConfigError
from fedpeft.schema import build
from tests.unit.attack_setup import client_update, round_two_state, tiny_context

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "attack"


def test_observation_holds_only_what_the_server_saw() -> None:
    names = {f.name for f in dataclasses.fields(Observation)}
    assert names == {"round", "partition", "kind", "update", "sent_global", "num_examples",
                     "hparams"}
    with pytest.raises(ValueError, match="kind must be one of"):
        Observation(round=1, partition=0, kind="records", update={}, sent_global={},
                    num_examples=1)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_has_a_yaml_that_builds(name: str) -> None:
    import yaml

    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg = build(ATTACKS.get(name).config_cls, raw, f"attack {name}")
    assert cfg.name == name
    with pytest.raises(ConfigError, match="valid keys"):
        build(ATTACKS.get(name).config_cls, {**raw, "bogus": 1}, f"attack {name}")


def test_registry_names_are_the_shipped_attacks() -> None:
    assert set(attacks.ATTACKS.names()) == {p.stem for p in CONFIGS.glob("*.yaml")}


def test_matching_pursuit_finds_planted_tokens() -> None:
    rng = np.random.default_rng(0)
    vocab = rng.standard_normal((500, 64))
    vocab /= np.linalg.norm(vocab, axis=1, keepdims=True)
    planted = [7, 123, 321, 499]
    rows = rng.standard_normal((24, 4)) @ vocab[planted]  # each row mixes the batch tokens
    assert sorted(matching_pursuit(rows, vocab, 4)) == planted


def test_first_layer_rows_ignores_zero_and_foreign_tensors() -> None:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    other = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    assert first_layer_rows({key: np.zeros((8, 16)), other: np.ones((8, 16))}) is None
    assert first_layer_rows({key: np.ones((8, 16))}).shape == (8, 16)


@pytest.fixture(scope="module")
def tiny() -> AttackContext:
    return tiny_context(batch_size=4)


def test_shuffled_batch_scores_the_same(tiny: AttackContext) -> None:
    records = faker_records(4, seed=3)
    state = round_two_state(tiny)
    attack = RecitAttack(RecitConfig(max_new_tokens=12, beams=2), tiny)
    truths = [Truth(text=r.text, token_ids=tuple(tiny.tokenizer(" " + r.text)["input_ids"]),
                    pii=r.pii) for r in records]
    seen = []
    for order in ([0, 1, 2, 3], [2, 0, 3, 1]):
        update = client_update(tiny, state, [records[i].text for i in order])
        obs = Observation(round=2, partition=0, kind="dense", update=update,
                          sent_global=state, num_examples=4)
        bag = attack.candidates(obs, 4)
        assert bag  # the first layer carries a signal
        recons = attack.run(obs, 4)
        scores = sorted(dataclasses.astuple(s) for s in score_batch(recons, truths))
        seen.append((set(bag), sorted(r.text for r in recons), scores))
    assert seen[0] == seen[1]
