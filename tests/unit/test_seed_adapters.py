"""FedKSeed and Ferret over a peft adapter (``method.adapter``): only adapter parameters are
tuned, the base stays frozen, and replays stay bit-identical across parties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.config import compose
from fedpeft.data import encode_dataset, load_task_data
from fedpeft.errors import ConfigError
from fedpeft.methods import TrainContext, build_method
from fedpeft.models import get_tokenizer, load_causal_lm

ADAPTER = "method.adapter={peft_type:lora,r:4,lora_alpha:8,target_modules:[q_proj,v_proj]}"
EXTRA = {"fedkseed": "method.num_seeds=32 method.local_steps=3 method.lr=0.01",
         "ferret": "method.num_bases=64 method.block_size=1024 method.local_steps=2 "
                   "method.batch_size=2 method.lr=0.01"}


@pytest.mark.parametrize("name", ["fedkseed", "ferret"])
def test_seed_method_over_lora_tunes_only_the_adapter(name: str) -> None:
    # Prepare
    cfg = compose(f"method={name} strategy={name} model=tiny-llama {EXTRA[name]} {ADAPTER}")
    method = build_method(name, cfg.method)
    model = method.attach(load_causal_lm(cfg.model), seed=0)
    params = method.params(model)
    base_before = {n: p.clone() for n, p in model.named_parameters() if n not in params}
    start = {n: p.clone() for n, p in params.items()}
    tok = get_tokenizer(cfg.model)
    data = load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(8)), tok, data.label_names, cfg.data)
    ctx = TrainContext(server_round=1, partition_id=0, seed=0, pad_token_id=tok.pad_token_id)
    # Execute
    result = method.train(model, examples, ctx)
    # Assert: adapter-only tuning, the base untouched, an update was produced
    assert params and all("lora_" in n for n in params)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters()
               if n in base_before)
    assert any(not torch.equal(p, start[n]) for n, p in params.items())
    assert np.isfinite(result.metrics["train_loss"])


def test_adapter_init_is_identical_on_every_party() -> None:
    cfg = compose(f"method=fedkseed strategy=fedkseed model=tiny-llama {ADAPTER}")
    method = build_method("fedkseed", cfg.method)
    one = method.params(method.attach(load_causal_lm(cfg.model), seed=3))
    two = method.params(method.attach(load_causal_lm(cfg.model), seed=3))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_bad_adapter_spec_fails_at_config_time() -> None:
    with pytest.raises(ConfigError, match="valid keys"):
        compose("method=ferret strategy=ferret method.adapter={peft_type:lora,rank:4}")
