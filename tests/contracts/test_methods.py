"""Every registered client method, on the tiny model and in each base precision: state
round trip, local training changes only trainable tensors, and the update survives the
wire exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import wire
from fedpeft.config import compose
from fedpeft.data import encode_dataset, load_task_data
from fedpeft.methods import METHODS, TrainContext, build_method, build_model
from fedpeft.models import get_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "method"
METHOD_YAMLS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def _method_name(yaml_name: str) -> str:
    import yaml

    return yaml.safe_load((CONFIGS / f"{yaml_name}.yaml").read_text())["name"]


# Dense methods share this contract; seed-based ones have their own tests
# (tests/unit/test_fedkseed.py, tests/integration/test_fedkseed_simulation.py).
DENSE_YAMLS = [y for y in METHOD_YAMLS if METHODS.get(_method_name(y)).update_kind == "dense"]


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_has_a_yaml(name: str) -> None:
    assert any(_method_name(y) == name for y in METHOD_YAMLS)


PRECISIONS = ("float32", "bfloat16")


@pytest.fixture(scope="module", params=[(y, d) for y in DENSE_YAMLS for d in PRECISIONS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def trained(request):
    yaml_name, dtype = request.param
    cfg = compose(f"method={yaml_name} model=tiny-llama model.dtype={dtype} "
                  "data.max_examples=200 data.test_size=20 method.local_steps=2 "
                  "method.batch_size=2")
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=0, data_cfg=cfg.data)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()
                     if not p.requires_grad}
    start = method.get_state(model)
    tok = get_tokenizer(cfg.model)
    data = load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(16)), tok, data.label_names, cfg.data)
    ctx = TrainContext(server_round=1, partition_id=0, seed=0, pad_token_id=tok.pad_token_id)
    result = method.train(model, examples, ctx)
    return method, model, start, result, frozen_before


def test_state_is_sorted_float32_numpy(trained) -> None:
    _, _, start, _, _ = trained
    assert list(start) == sorted(start)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in start.values())


def test_update_covers_exactly_the_trainable_state_and_is_nonzero(trained) -> None:
    method, model, start, result, _ = trained
    deltas = result.update.deltas
    assert sorted(deltas) == sorted(start)
    assert all(deltas[k].shape == start[k].shape for k in start)
    assert sum(float(np.abs(d).sum()) for d in deltas.values()) > 0
    end = method.get_state(model)
    for k in start:
        np.testing.assert_allclose(start[k] + deltas[k], end[k], rtol=1e-6, atol=1e-7)
    assert result.num_examples > 0 and np.isfinite(result.metrics["train_loss"])


def test_frozen_base_weights_do_not_change(trained) -> None:
    _, model, _, _, frozen_before = trained
    now = dict(model.named_parameters())
    assert len(frozen_before) > len(now) // 2
    for name, before in frozen_before.items():
        torch.testing.assert_close(now[name], before, rtol=0, atol=0)


def test_set_state_round_trip_and_wire_round_trip(trained) -> None:
    method, model, start, result, _ = trained
    method.set_state(model, start)
    again = method.get_state(model)
    for k in start:
        np.testing.assert_array_equal(again[k], start[k])
    decoded = wire.decode_update(wire.encode_update(result.update), start)
    for k, v in result.update.deltas.items():
        np.testing.assert_array_equal(decoded.deltas[k], v)


def test_local_training_is_reproducible_for_a_seed_round_and_client() -> None:
    cfg = compose("model=tiny-llama data.max_examples=200 data.test_size=20 "
                  "method.local_steps=2 method.batch_size=2")
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=0)
    tok = get_tokenizer(cfg.model)
    data = load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(16)), tok, data.label_names, cfg.data)
    start = method.get_state(model)
    ctx = TrainContext(server_round=3, partition_id=1, seed=7, pad_token_id=tok.pad_token_id)

    first = method.train(model, examples, ctx)
    method.set_state(model, start)
    second = method.train(model, examples, ctx)

    for k, v in first.update.deltas.items():
        np.testing.assert_array_equal(v, second.update.deltas[k])
