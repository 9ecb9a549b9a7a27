"""The one-run canary audit on real training (tiny model, the lora method's own train,
real Opacus DP-SGD): a large bound without DP, never above the accountant's ε with it."""

from __future__ import annotations

import pytest

from attacks.base import AttackContext
from attacks.membership import canaries, membership_audit
from attacks.victims import PROMPT
from fedpeft.methods.lora import LoraConfig, LoraMethod
from fedpeft.models import ModelConfig, TinyModelConfig, get_tokenizer, load_causal_lm
from fedpeft.privacy.dpsgd import DPSGDConfig

M, GUESSES = 200, 20
SPAN_M = 100


def _context() -> AttackContext:
    cfg = ModelConfig(name="tiny-llama", device="cpu")
    adapter = {"peft_type": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                  "up_proj", "down_proj"]}
    method = LoraMethod(LoraConfig(adapter=adapter, local_steps=30, batch_size=16, lr=1e-2))
    return AttackContext(model=method.attach(load_causal_lm(cfg), seed=0),
                         tokenizer=get_tokenizer(cfg), method=method, prompt=PROMPT)


def _fedsgd_context() -> AttackContext:
    """FedSGD (one plain-SGD step on every included canary) with a rank above their count,
    on a 128-wide tiny model: the update has an exact layer-0 span."""
    cfg = ModelConfig(name="tiny-llama", device="cpu",
                      tiny=TinyModelConfig(hidden_size=128, intermediate_size=256))
    adapter = {"peft_type": "lora", "r": 128, "lora_alpha": 256, "lora_dropout": 0.0,
               "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    method = LoraMethod(LoraConfig(adapter=adapter, local_steps=1, batch_size=SPAN_M,
                                   optimizer="sgd"))
    return AttackContext(model=method.attach(load_causal_lm(cfg), seed=0),
                         tokenizer=get_tokenizer(cfg), method=method, prompt=PROMPT)


def test_span_test_guesses_every_fedsgd_canary() -> None:
    # 40 guesses each way: with 100 coin flips the members are rarely exactly 50, so
    # guessing all 100 would force wrong guesses even from a perfect ranking
    res = membership_audit(_fedsgd_context(), SPAN_M, 40, seed=0, length=1)
    assert res.tpr_at_0_1_fpr == 1.0
    assert res.num_correct == res.num_guesses == 80
    assert res.epsilon_lower_bound > 3.0  # 3.26 at 80 of 80


def test_span_bound_with_dp_stays_below_the_accountant() -> None:
    privacy = DPSGDConfig(target_epsilon=3.0, noise_multiplier=None)
    res = membership_audit(_fedsgd_context(), SPAN_M, 40, seed=0, length=1,
                           privacy=privacy)
    assert res.epsilon == pytest.approx(3.0, rel=0.05)
    assert 0.0 <= res.epsilon_lower_bound <= res.epsilon


def test_canaries_are_distinct_and_seeded() -> None:
    tok = get_tokenizer(ModelConfig(name="tiny-llama", device="cpu"))
    assert canaries(50, 1, tok) == canaries(50, 1, tok) != canaries(50, 2, tok)
    assert len(set(canaries(50, 1, tok))) == 50


def test_non_private_training_gives_a_large_bound() -> None:
    res = membership_audit(_context(), M, GUESSES, seed=0)
    assert res.epsilon is None
    # measured: 31 of 40 guesses right, bound 0.57 (a random 2-layer model memorises
    # weakly; coin-flip guessing stays below 0.2, see test_canary.py)
    assert res.num_correct >= 0.7 * res.num_guesses
    assert res.epsilon_lower_bound > 0.3


@pytest.mark.parametrize("target", [3.0])
def test_dp_training_bound_stays_below_the_accountant(target: float) -> None:
    privacy = DPSGDConfig(target_epsilon=target, noise_multiplier=None)
    res = membership_audit(_context(), M, GUESSES, seed=0, privacy=privacy)
    assert res.epsilon == pytest.approx(target, rel=0.05)
    assert 0.0 <= res.epsilon_lower_bound <= res.epsilon
