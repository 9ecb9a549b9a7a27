"""CUDA-only truths (skipped without a GPU; ``bash scripts/dev.sh gpu-check`` runs them):
every method trains on the GPU with what crosses the wire still CPU float32 numpy, and the
seed methods' replay gives the same bits on the GPU as on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.config import compose
from fedpeft.data import encode_dataset, load_task_data
from fedpeft.evaluation import evaluate
from fedpeft.methods import TrainContext, build_method, build_model
from fedpeft.models import get_tokenizer, model_device, resolve_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SEED_STRATEGY = {"fedkseed": "fedkseed", "ferret": "ferret"}


def _build(method_name: str, device: str, dtype: str = "float32"):
    extra = " method.trainable=self_attn method.local_steps=3" if method_name in \
        SEED_STRATEGY else " method.local_steps=3"
    cfg = compose(f"method={method_name} strategy={SEED_STRATEGY.get(method_name, 'fedavg')} "
                  f"model=tiny-llama model.device={device} model.dtype={dtype} "
                  f"data.max_examples=200 data.test_size=16 method.batch_size=2{extra}")
    method = build_method(cfg.method.name, cfg.method)
    return cfg, method, build_model(method, cfg.model, seed=0)


def test_auto_is_cuda_here() -> None:
    assert resolve_device("auto").type == "cuda"


@pytest.mark.parametrize("method_name", ["lora", "dora", "ia3", "fedkseed", "ferret"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_method_trains_on_the_gpu_and_ships_cpu_float32(method_name: str,
                                                              dtype: str) -> None:
    cfg, method, model = _build(method_name, "cuda", dtype)
    assert model_device(model).type == "cuda"
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(12)), tok, data.label_names, cfg.data)
    result = method.train(model, examples, TrainContext(1, 0, 0, tok.pad_token_id))
    assert np.isfinite(result.metrics["train_loss"])
    state = method.get_state(model)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in state.values())
    ev = evaluate(model, tok, data.test, data.label_names, cfg.data, batch_size=8)
    assert np.isfinite(ev.loss)


@pytest.mark.parametrize("method_name", ["fedkseed", "ferret"])
def test_replay_on_gpu_matches_cpu_bitwise(method_name: str) -> None:
    cfg, method, model = _build(method_name, "cpu")
    tok, data = get_tokenizer(cfg.model), load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(12)), tok, data.label_names, cfg.data)
    update = method.train(model, examples, TrainContext(1, 0, 0, tok.pad_token_id)).update
    if method_name == "fedkseed":
        arrays = {"idx": update.indices, "vals": update.values}
    else:
        from fedpeft.methods.ferret import Contribution, encode_round

        arrays = encode_round([Contribution(update.seed, 0.5, update.counts, update.gammas)])
    states = []
    for device in ("cpu", "cuda"):
        _, party, party_model = _build(method_name, device)
        party.apply_global(party_model, arrays)
        states.append(party.get_state(party_model))
    for k in states[0]:
        np.testing.assert_array_equal(states[0][k], states[1][k])
