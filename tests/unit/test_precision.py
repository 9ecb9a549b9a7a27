"""``model.device`` and ``model.dtype`` for every method: where the model lives, what
precision each tensor is held in, and that training and evaluation still work."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fedpeft import models
from fedpeft.config import compose
from fedpeft.data import encode_dataset, load_task_data
from fedpeft.errors import ConfigError
from fedpeft.evaluation import evaluate
from fedpeft.methods import METHODS, TrainContext, build_method, build_model
from fedpeft.models import get_tokenizer, resolve_device
from fedpeft.preflight import preflight

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
SEED_STRATEGY = {"fedkseed": "fedkseed", "ferret": "ferret"}


def test_cpu_and_auto_resolve_on_this_machine() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_auto_picks_cuda_when_torch_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda")


@NO_CUDA
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_fails_with_the_remedy(name: str) -> None:
    with pytest.raises(ConfigError, match=r"needs a CUDA GPU.*model\.device=auto.*client_gpus"):
        resolve_device(name)


@NO_CUDA
def test_cuda_device_fails_at_validation_before_any_model_loads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_a: object, **_k: object) -> None:
        raise AssertionError("validation must not load a model")

    monkeypatch.setattr(models, "load_causal_lm", forbidden)
    with pytest.raises(ConfigError, match=re.escape("model.device='cuda' needs a CUDA GPU")):
        preflight(["model=tiny-llama", "model.device=cuda"])


@NO_CUDA
def test_gpu_share_without_a_gpu_fails_before_ray_would_wait_forever() -> None:
    msg = "sim.client_gpus=0.25 but this machine has no"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        preflight(["model=tiny-llama", "sim.client_gpus=0.25"], federation_size="sim")


def test_explicit_cuda_without_a_gpu_share_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray hides GPUs from actors that have no share: a cuda client would fail later."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    msg = "sim.client_gpus=0: simulated clients get no GPU"
    with pytest.raises(ConfigError, match=re.escape(msg)):
        preflight(["model=tiny-llama", "model.device=cuda"], federation_size="sim")
    report = preflight(["model=tiny-llama", "model.device=cuda", "sim.client_gpus=0.25"],
                       federation_size="sim")
    assert report.cfg.sim.client_gpus == 0.25


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda0", "tpu", ""])
def test_unknown_device_names_list_the_choices(name: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown model.device.*auto, cpu, cuda, cuda:N"):
        resolve_device(name)


def test_fp32_on_cpu_leaves_the_forward_untouched() -> None:
    cfg = compose("model=tiny-llama model.device=cpu")
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=0)
    assert "forward" not in vars(model)  # the class's own forward: no casts, no copies
    assert models.model_device(model) == torch.device("cpu")


def _setup(method_name: str, dtype: str):
    strategy = SEED_STRATEGY.get(method_name, "fedavg")
    extra = " method.local_steps=3"
    if method_name in SEED_STRATEGY:  # tune a subset, so a bf16 frozen part remains
        extra += " method.trainable=self_attn" + (
            " method.num_bases=64" if method_name == "ferret" else "")
    cfg = compose(f"method={method_name} strategy={strategy} model=tiny-llama "
                  f"model.dtype={dtype} model.device=cpu data.max_examples=200 "
                  f"data.test_size=16 method.batch_size=2{extra}")
    method = build_method(cfg.method.name, cfg.method)
    model = build_model(method, cfg.model, seed=0)
    tok = get_tokenizer(cfg.model)
    data = load_task_data(cfg.data)
    examples = encode_dataset(data.train.select(range(12)), tok, data.label_names, cfg.data)
    return cfg, method, model, tok, data, examples


def _train_and_eval(method_name: str, dtype: str):
    cfg, method, model, tok, data, examples = _setup(method_name, dtype)
    start = method.get_state(model)
    ctx = TrainContext(server_round=1, partition_id=0, seed=0, pad_token_id=tok.pad_token_id)
    result = method.train(model, examples, ctx)
    ev = evaluate(model, tok, data.test, data.label_names, cfg.data, batch_size=8)
    return method, model, start, result, ev


# Every registered method's YAML (plugins other tests register have none); dora and ia3 in
# bf16 are covered by tests/contracts/test_methods.py.
METHOD_YAMLS = ["lora", "fedkseed", "ferret"]
assert {METHODS.get(m).name for m in METHOD_YAMLS} >= {"lora", "fedkseed", "ferret"}


@pytest.fixture(scope="module", params=METHOD_YAMLS)
def fp32_and_bf16(request):
    return {dt: _train_and_eval(request.param, dt) for dt in ("float32", "bfloat16")}


def test_bf16_base_holds_trainables_in_fp32(fp32_and_bf16) -> None:
    method, model, _, _, _ = fp32_and_bf16["bfloat16"]
    tuned = method.tuned(model)
    assert tuned and all(p.dtype == torch.float32 for p in tuned.values())
    frozen = {p.dtype for n, p in model.named_parameters() if n not in tuned}
    assert frozen == {torch.bfloat16}


def test_bf16_state_on_the_wire_is_float32_numpy_and_training_moved_it(fp32_and_bf16) -> None:
    method, model, start, result, _ = fp32_and_bf16["bfloat16"]
    end = method.get_state(model)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in end.values())
    assert any(not np.array_equal(start[k], end[k]) for k in start)
    assert np.isfinite(result.metrics["train_loss"])


def test_bf16_losses_track_fp32(fp32_and_bf16) -> None:
    """Autocast computes in bf16 (the numbers differ) but close to fp32 (they are right)."""
    full, half = fp32_and_bf16["float32"], fp32_and_bf16["bfloat16"]
    train = (full[3].metrics["train_loss"], half[3].metrics["train_loss"])
    assert train[0] != train[1]
    assert train[1] == pytest.approx(train[0], rel=1e-2)
    assert half[4].loss == pytest.approx(full[4].loss, rel=1e-2)


@pytest.mark.parametrize("method_name", ["fedkseed", "ferret"])
def test_bf16_replay_is_bit_identical_across_parties(method_name: str) -> None:
    """Server replay and a client's catch-up run the same kernels on fp32 trainables."""
    _, method, model, tok, _, examples = _setup(method_name, "bfloat16")
    ctx = TrainContext(server_round=1, partition_id=0, seed=0, pad_token_id=tok.pad_token_id)
    update = method.train(model, examples, ctx).update
    aggregate = _aggregate(method_name, update)
    parties = [_setup(method_name, "bfloat16")[1:3] for _ in range(3)]
    base = parties[2][0].get_state(parties[2][1])  # a party that has not replayed
    for party, party_model in parties[:2]:
        party.apply_global(party_model, aggregate)
    one, two = (m.get_state(pm) for m, pm in parties[:2])
    assert any(not np.array_equal(one[k], base[k]) for k in one)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])


def _aggregate(method_name: str, update) -> dict[str, np.ndarray]:
    if method_name == "fedkseed":
        return {"idx": update.indices, "vals": update.values}
    from fedpeft.methods.ferret import Contribution, encode_round

    return encode_round([Contribution(update.seed, 1.0, update.counts, update.gammas)])
