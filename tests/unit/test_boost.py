"""The Personal Notes booster: what it trains, what it keeps, where it caches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

import attacks.boost as boost_mod
from attacks.audit import boost_config, split_overrides, victim_records
from attacks.boost import BoostConfig, boost, boost_records, note_loss
from fedpeft.config import compose
from fedpeft.errors import ConfigError
from fedpeft.models import ModelConfig, load_causal_lm, load_tokenizer

TINY = ModelConfig(name="tiny-llama", device="cpu")
FAST = BoostConfig(records=16, steps=4, batch_size=4, lr=1e-3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private root for boosted models (the tokenizer still comes from the shared cache)."""
    root = tmp_path_factory.mktemp("boost-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(boost_mod, "cache_root", lambda cfg=None: root)
        yield root


@pytest.fixture(scope="module")
def boosted(cache: Path) -> Path:
    """The tiny model boosted for a few steps; the global RNG must come out untouched."""
    before = torch.get_rng_state()
    out = boost(TINY, FAST)
    assert torch.equal(before, torch.get_rng_state())
    return out


def _load(model_dir: Path) -> PreTrainedModel:
    run = compose(["model=hf", f"model.name={model_dir}", "model.device=cpu"])
    return load_causal_lm(run.model)


def test_boosted_dir_loads_as_hf_model_and_keeps_the_embeddings(boosted: Path,
                                                                 cache: Path) -> None:
    assert boosted.parent == cache / "boosted"
    model, base = _load(boosted), load_causal_lm(TINY)
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    q_new = model.model.layers[0].self_attn.q_proj.weight
    q_old = base.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_new, q_old)


def test_note_loss_of_the_training_records_decreased(boosted: Path) -> None:
    tokenizer, records = load_tokenizer(TINY), boost_records(FAST)
    before = note_loss(load_causal_lm(TINY), tokenizer, records)
    after = note_loss(_load(boosted), tokenizer, records)
    assert after < before - 0.05, (before, after)


def test_second_call_reuses_the_cache(boosted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object) -> None:
        raise AssertionError("the cached boosted model was rebuilt")

    monkeypatch.setattr(boost_mod, "_build", no_training)
    assert boost(TINY, FAST) == boosted
    other = boost_mod.cache_key(TINY, BoostConfig(records=16, steps=5, batch_size=4, lr=1e-3))
    assert other["hash"] != boosted.name


def test_boost_records_are_disjoint_from_the_audit_victims() -> None:
    cfg, _ = split_overrides(["audit.boost=true", "audit.clients=4"])
    victims = victim_records(cfg, max(cfg.batch_sizes))
    attacker = boost_records(boost_config(cfg))
    victim_pii = {v for r in victims for v in r.pii[1:3]}  # emails and phones
    assert not {r.text for r in victims} & {r.text for r in attacker}
    assert not victim_pii & {v for r in attacker for v in r.pii[1:3]}


@pytest.mark.parametrize(("key", "value"), [
    ("records", 0), ("steps", 0), ("batch_size", -1), ("lr", 0.0),
])
def test_bad_boost_options_fail_naming_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"boost.{key} must be"):
        BoostConfig(**{key: value}).validate()
