"""The TAG-style optimisation baseline on a real (tiny) model's lora update: its
objective ranks the true record first, the optimisation lowers it, the output has the
batch's shape, and the attack leaves the model and the global RNG as it found them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks.base import AttackContext, Observation
from attacks.optimization import TagAttack, TagConfig, adapter_params, attacked_state
from attacks.recit import prompt_ids
from attacks.victims import PROMPT, faker_records
from fedpeft.data import DataConfig, encode_example
from fedpeft.errors import ConfigError
from tests.unit.attack_setup import client_update, round_two_state, tiny_context


@pytest.fixture(scope="module")
def tiny() -> AttackContext:
    return tiny_context(batch_size=1)


@pytest.fixture(scope="module")
def observed(tiny: AttackContext) -> tuple[Observation, str]:
    """A round-2 observation (nonzero LoRA-B) of one client's step on one record."""
    state = round_two_state(tiny)
    text = faker_records(1, seed=3)[0].text
    update = client_update(tiny, state, [text])
    obs = Observation(round=2, partition=0, kind="dense", update=update, sent_global=state,
                      num_examples=1)
    return obs, text


def test_objective_is_lowest_at_the_true_record(tiny: AttackContext, observed) -> None:
    obs, text = observed
    answer = tiny.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
    answer.append(tiny.tokenizer.eos_token_id)
    emb = tiny.model.get_input_embeddings().weight.detach()
    attack = TagAttack(TagConfig(length=len(answer)), tiny)
    with attacked_state(tiny, obs.sent_global):
        params = adapter_params(tiny, obs.update)
        targets = attack.targets(obs.update, params)
        truth = attack.matching_loss(emb[torch.tensor([answer])], params, targets).item()
        start = attack.matching_loss(attack.initial(1), params, targets).item()
    assert len(params) == len(obs.update)  # every tensor moved, so every tensor is matched
    assert truth < 0.1 * start


def test_optimisation_lowers_the_matching_loss(tiny: AttackContext, observed) -> None:
    obs, _ = observed
    _, history = TagAttack(TagConfig(length=8, steps=15), tiny).optimise(obs, 1)
    assert len(history) == 15
    assert history[-1] < 0.9 * history[0]


def test_one_reconstruction_per_record_of_the_configured_length(
        tiny: AttackContext, observed) -> None:
    obs, _ = observed
    attack = TagAttack(TagConfig(length=6, steps=2), tiny)
    recons = attack.run(obs, 3)
    assert len(recons) == 3
    assert all(len(r.token_ids) == 6 for r in recons)
    seed_obs = Observation(round=2, partition=0, kind="seed", update={}, sent_global={},
                           num_examples=1)
    assert attack.run(seed_obs, 3) == []


def test_model_and_global_rng_are_left_as_found(tiny: AttackContext, observed) -> None:
    obs, _ = observed
    before, rng = tiny.method.get_state(tiny.model), torch.get_rng_state()
    grads = [_copy(p.grad) for p in tiny.method.tuned(tiny.model).values()]
    tiny.model.train()
    attn = tiny.model.config._attn_implementation
    TagAttack(TagConfig(length=4, steps=2), tiny).run(obs, 2)
    after = tiny.method.get_state(tiny.model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert tiny.model.training and tiny.model.config._attn_implementation == attn
    assert grads == [_copy(p.grad) for p in tiny.method.tuned(tiny.model).values()]


def _copy(grad: torch.Tensor | None) -> list[float] | None:
    return None if grad is None else grad.flatten().tolist()


def test_prompt_is_the_clients_prompt(tiny: AttackContext) -> None:
    enc = encode_example(tiny.tokenizer, PROMPT, "x", [],
                         DataConfig(name="x", label_field=None, max_input_tokens=16))
    ids = prompt_ids(tiny)
    assert enc.input_ids[:len(ids)] == ids and enc.labels[len(ids) - 1] == -100


@pytest.mark.parametrize("bad", [{"space": "hard"}, {"steps": 0}, {"softness": 0.0},
                                 {"l2": -1.0}])
def test_config_rejects_bad_options(bad: dict) -> None:
    with pytest.raises(ConfigError, match="attack"):
        TagConfig(**bad).validate()
