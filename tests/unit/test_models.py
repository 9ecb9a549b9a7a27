"""Base model loading: tiny test model, bundled SmolLM2 / MiniLM, caches, errors."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from fedpeft import models
from fedpeft.errors import ConfigError, ModelNotFoundError
from fedpeft.models import (
    BUNDLED_MODELS,
    ModelConfig,
    TinyModelConfig,
    get_causal_lm,
    get_tokenizer,
    load_causal_lm,
    load_encoder,
    load_tokenizer,
)
from fedpeft.schema import build


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _sentence_loss(model: torch.nn.Module, tokenizer: object, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # (1, T)
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


# ------------------------------------------------------------ tiny-llama


def test_tiny_llama_same_seed_gives_identical_weights_without_touching_global_rng(
    tiny_cfg: ModelConfig,
) -> None:
    # Prepare
    torch.manual_seed(1234)
    rng_before = torch.random.get_rng_state()

    # Execute
    first, second = load_causal_lm(tiny_cfg), load_causal_lm(tiny_cfg)

    # Assert
    assert first is not second
    assert _same_weights(first, second)
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_tiny_llama_different_seed_gives_different_weights(tiny_cfg: ModelConfig) -> None:
    # Prepare
    other = dataclasses.replace(tiny_cfg, tiny=TinyModelConfig(seed=1))

    # Execute
    a, b = load_causal_lm(tiny_cfg), load_causal_lm(other)

    # Assert
    assert not torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)


def test_tiny_llama_is_frozen_tied_and_uses_the_smollm2_vocabulary(
    tiny_cfg: ModelConfig,
) -> None:
    # Execute
    model = load_causal_lm(tiny_cfg)
    tokenizer = get_tokenizer(tiny_cfg)

    # Assert
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.hidden_size == tiny_cfg.tiny.hidden_size


def test_bfloat16_dtype_is_applied_after_load(tiny_cfg: ModelConfig) -> None:
    # Prepare
    cfg = dataclasses.replace(tiny_cfg, dtype="bfloat16")

    # Execute
    model = load_causal_lm(cfg)

    # Assert
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_get_causal_lm_and_get_tokenizer_return_the_same_object_twice(
    tiny_cfg: ModelConfig,
) -> None:
    # Execute
    model_a, model_b = get_causal_lm(tiny_cfg), get_causal_lm(tiny_cfg)
    tok_a, tok_b = get_tokenizer(tiny_cfg), get_tokenizer(tiny_cfg)

    # Assert
    assert model_a is model_b
    assert tok_a is tok_b
    assert load_causal_lm(tiny_cfg) is not model_a


def test_tokenizer_has_pad_token_and_pads_on_the_right(tiny_cfg: ModelConfig) -> None:
    # Execute
    tokenizer = load_tokenizer(tiny_cfg)
    batch = tokenizer(["a", "a b c d"], padding=True)

    # Assert
    assert tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "right"
    assert batch["attention_mask"][0][0] == 1 and batch["attention_mask"][0][-1] == 0


# ------------------------------------------------------------ bundled models


def test_smollm2_cached_copy_reloads_fast_as_a_plain_tied_model(
    smollm2_cfg: ModelConfig,
) -> None:
    # Prepare
    load_causal_lm(smollm2_cfg)  # converts from GGUF once per machine/cache
    start = time.perf_counter()

    # Execute
    model = load_causal_lm(smollm2_cfg)
    elapsed = time.perf_counter() - start

    # Assert
    assert elapsed < 5.0
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)


def test_smollm2_prefers_a_real_sentence_over_shuffled_words(smollm2_cfg: ModelConfig) -> None:
    # Prepare
    model, tokenizer = get_causal_lm(smollm2_cfg), get_tokenizer(smollm2_cfg)

    # Execute
    real = _sentence_loss(model, tokenizer, "Paris is the capital of France.")
    shuffled = _sentence_loss(model, tokenizer, "France capital the Paris of is.")

    # Assert
    assert real < 4.0
    assert shuffled > real + 3.0


def test_minilm_encoder_loads_from_the_wheel() -> None:
    # Prepare
    cfg = ModelConfig(name="minilm-l6")

    # Execute
    encoder, tokenizer = load_encoder(cfg), load_tokenizer(cfg)
    with torch.inference_mode():
        out = encoder(**tokenizer(["federated learning"], return_tensors="pt"))

    # Assert
    assert out.last_hidden_state.shape[-1] == 384
    assert not any(p.requires_grad for p in encoder.parameters())


# ------------------------------------------------------------ cache directory


def test_cached_dir_builds_once_and_replaces_a_stale_copy(tmp_path: Path) -> None:
    # Prepare
    target = tmp_path / "models" / "thing"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("stale, no marker")
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights.bin").write_text("new")

    stamp = {"format": 1, "source": "x"}

    # Execute
    first = models._cached_dir(target, stamp, build)
    second = models._cached_dir(target, stamp, build)

    # Assert
    assert first == second == target
    assert len(calls) == 1
    assert sorted(p.name for p in target.iterdir()) == [models._MARKER, "weights.bin"]
    assert json.loads((target / models._MARKER).read_text()) == stamp
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == ["thing"]


def test_cache_root_prefers_config_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path / "env"))

    # Execute
    from_env = models.cache_root(ModelConfig())
    from_cfg = models.cache_root(ModelConfig(cache_dir=str(tmp_path / "cfg")))

    # Assert
    assert from_env == tmp_path / "env"
    assert from_cfg == tmp_path / "cfg"


# ------------------------------------------------------------ errors


def test_missing_local_path_raises_model_not_found_listing_bundled_names(
    tmp_path: Path,
) -> None:
    # Prepare
    cfg = ModelConfig(name=str(tmp_path / "no-such-model"))

    # Execute
    with pytest.raises(ModelNotFoundError) as info:
        load_causal_lm(cfg)

    # Assert
    assert "no such directory" in str(info.value)
    assert all(name in str(info.value) for name in BUNDLED_MODELS)


def test_unknown_hub_name_raises_model_not_found_mentioning_offline_mode() -> None:
    # Prepare
    cfg = ModelConfig(name="no-such-org/no-such-model")

    # Execute
    with pytest.raises(ModelNotFoundError) as info:
        load_tokenizer(cfg)

    # Assert
    message = str(info.value)
    assert "no-such-org/no-such-model" in message
    assert "HF_HUB_OFFLINE" in message
    assert all(name in message for name in BUNDLED_MODELS)


def test_bad_dtype_raises_config_error_listing_choices() -> None:
    # Execute
    with pytest.raises(ConfigError) as info:
        build(ModelConfig, {"name": "tiny-llama", "dtype": "float8"}, "model")

    # Assert
    assert "float8" in str(info.value)
    assert all(d in str(info.value) for d in ("float32", "bfloat16", "float16"))


def test_tiny_shape_whose_heads_do_not_divide_raises_config_error() -> None:
    # Execute
    with pytest.raises(ConfigError, match="num_attention_heads"):
        build(ModelConfig, {"tiny": {"hidden_size": 30, "num_attention_heads": 4}}, "model")
