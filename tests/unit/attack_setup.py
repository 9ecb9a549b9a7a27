"""What the attack tests share: a tiny-model attack context, a round-2 global state (LoRA-B
nonzero, as after one aggregation) and one client step of the lora method."""

from __future__ import annotations

import numpy as np
import torch

from attacks.base import AttackContext
from attacks.victims import PROMPT
from fedpeft.data import DataConfig, collate, encode_example
from fedpeft.methods.lora import LoraConfig, LoraMethod
from fedpeft.models import ModelConfig, TinyModelConfig, get_tokenizer, load_causal_lm


def tiny_context(batch_size: int = 1, rank: int | None = None,
                 hidden: int = 64) -> AttackContext:
    """The random tiny Llama (``hidden`` wide) with the default LoRA adapter attached (or
    one of ``rank``, without dropout, trained by plain SGD)."""
    cfg = ModelConfig(name="tiny-llama", device="cpu",
                      tiny=TinyModelConfig(hidden_size=hidden, intermediate_size=2 * hidden))
    lora = LoraConfig(local_steps=1, batch_size=batch_size)
    if rank is not None:
        adapter = {**lora.adapter, "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0}
        lora = LoraConfig(local_steps=1, batch_size=batch_size, adapter=adapter,
                          optimizer="sgd")
    method = LoraMethod(lora)
    model = method.attach(load_causal_lm(cfg), seed=0)
    return AttackContext(model=model, tokenizer=get_tokenizer(cfg), method=method,
                         prompt=PROMPT)


def round_two_state(ctx: AttackContext, seed: int = 1) -> dict[str, np.ndarray]:
    """The adapter state with random LoRA-B (so LoRA-A receives a gradient)."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(v.shape).astype(np.float32) * 0.1 if "lora_B" in k
                else v) for k, v in ctx.method.get_state(ctx.model).items()}


def client_update(ctx: AttackContext, state: dict, texts: list[str],
                  optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
                  ) -> dict[str, np.ndarray]:
    """One step of ``optimizer`` (AdamW: the lora default) on ``texts``, as a client takes
    it (no dropout, so two batch orders see the same examples' gradients)."""
    dcfg = DataConfig(name="x", label_field=None, max_input_tokens=16)
    batch = collate([encode_example(ctx.tokenizer, PROMPT, t, [], dcfg) for t in texts],
                    ctx.tokenizer.pad_token_id)
    ctx.method.set_state(ctx.model, state)
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    opt = optimizer(params, lr=1e-3)
    ctx.model.eval()
    ctx.model(**batch).loss.backward()
    opt.step()
    return {k: v - state[k] for k, v in ctx.method.get_state(ctx.model).items()}
