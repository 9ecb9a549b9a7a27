"""Shared test fixtures: offline hub, one model cache per session, small model configs.

The bundled SmolLM2 is converted from GGUF once per machine into the fedpeft cache
(``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``); every test in a session uses that same
directory, so the ~30-40 s conversion happens at most once per session (and normally
never again on the same machine).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # a stray hub call fails fast instead of hanging

from fedpeft.models import ModelConfig, TinyModelConfig, cache_root


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """The fedpeft model cache shared by the whole session (the user's default cache)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def tiny_cfg(model_cache_dir: Path) -> ModelConfig:
    """Random 2-layer Llama with the SmolLM2 tokenizer (fast, for unit tests)."""
    return ModelConfig(name="tiny-llama", cache_dir=str(model_cache_dir), tiny=TinyModelConfig())


@pytest.fixture(scope="session")
def smollm2_cfg(model_cache_dir: Path) -> ModelConfig:
    """The bundled pretrained SmolLM2-135M-Instruct (converted once, then cached)."""
    return ModelConfig(name="smollm2-135m", cache_dir=str(model_cache_dir))
