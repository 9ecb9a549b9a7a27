"""The lora method's optimizer choice: one plain-SGD step uploads exactly -lr times the
clipped gradient (FedSGD), and an unknown optimizer fails early with the valid names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.data import DataConfig, collate, encode_example
from fedpeft.errors import ConfigError
from fedpeft.methods.base import TrainContext
from fedpeft.methods.lora import LoraConfig, LoraMethod
from fedpeft.models import ModelConfig, get_tokenizer, load_causal_lm


def test_unknown_optimizer_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="adamw, sgd"):
        LoraConfig(optimizer="adam").validate()


def test_one_sgd_step_uploads_minus_lr_times_the_gradient() -> None:
    cfg = ModelConfig(name="tiny-llama", device="cpu")
    tok = get_tokenizer(cfg)
    lora = LoraConfig(local_steps=1, batch_size=1, lr=0.5, optimizer="sgd", max_grad_norm=1e9,
                      adapter={**LoraConfig().adapter, "lora_dropout": 0.0})
    method = LoraMethod(lora)
    model = method.attach(load_causal_lm(cfg), seed=0)
    rng = np.random.default_rng(0)
    start = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) if "lora_B" in k else v
             for k, v in method.get_state(model).items()}
    example = encode_example(tok, "Write it.", "Ann Lee, Oslo.", [],
                             DataConfig(name="x", label_field=None))
    method.set_state(model, start)
    model.zero_grad()
    model(**collate([example], tok.pad_token_id)).loss.backward()
    names = dict(model.named_parameters())
    grads = {k: names[_param(k, names)].grad.detach().numpy().copy() for k in start}
    result = method.train(model, [example], TrainContext(server_round=1, partition_id=0, seed=0,
                                                      pad_token_id=tok.pad_token_id))
    for key, grad in grads.items():
        np.testing.assert_allclose(result.update.deltas[key], -0.5 * grad, rtol=1e-4,
                                   atol=1e-7)


def _param(key: str, names: dict[str, torch.nn.Parameter]) -> str:
    """The parameter name behind an adapter state key (peft drops the adapter name)."""
    return next(n for n in names if n.replace(".default", "") == key)
