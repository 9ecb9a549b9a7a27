"""Federated adapters with any ``peft`` tuner (LoRA by default; DoRA, IA3, LoHa, ...).

Paper: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
arXiv 2106.09685; federated instruction tuning as in FedIT (Zhang et al., arXiv 2305.05644).

The client trains only the adapter tensors for ``local_steps`` optimizer steps (AdamW by
default; ``optimizer: sgd`` with ``local_steps: 1`` is FedSGD: the upload is exactly
``-lr`` times the clipped gradient) and uploads their delta; the frozen base model
never leaves the process. ``peft`` does the tuning (no hand-written adapters): this
module maps config to a ``PeftConfig`` and moves adapter state in and out of the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.methods.base import METHODS
from fedpeft.methods.local import LocalStepsMethod, StepConfig
from fedpeft.types import ArrayDict

_DEFAULT_ADAPTER: dict[str, Any] = {
    "peft_type": "lora",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
_ALIASES = {"dora": ("LORA", {"use_dora": True})}


@dataclass(frozen=True)
class LoraConfig(StepConfig):
    """Options of the ``lora`` method. ``adapter`` is passed to ``peft`` as-is
    (plus ``peft_type``: lora, dora, ia3, loha, lokr, adalora, vera, ...)."""

    name: str = "lora"
    adapter: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_ADAPTER))

    def validate(self) -> None:
        """Fail early on bad numbers or an adapter spec ``peft`` would reject."""
        super().validate()
        peft_config(self.adapter)


def peft_types() -> list[str]:
    """Adapter types accepted in ``method.adapter.peft_type``."""
    return sorted([t.value.lower() for t in peft.PeftType] + list(_ALIASES))


def peft_config(adapter: dict[str, Any]) -> peft.PeftConfig:
    """Turn ``method.adapter`` into a ``peft`` config, naming valid types/fields on error."""
    spec = dict(adapter)
    kind = str(spec.pop("peft_type", "lora")).lower()
    type_name, extra = _ALIASES.get(kind, (kind.upper(), {}))
    if type_name not in peft.PeftType.__members__:
        raise ConfigError.unknown("method.adapter.peft_type", kind, peft_types())
    cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType[type_name]]
    valid = {f.name for f in dataclasses.fields(cls) if f.init} - {"peft_type", "task_type"}
    unknown = sorted(set(spec) - valid)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} for method.adapter (peft_type={kind}); "
            f"valid keys: {', '.join(sorted(valid))}"
        )
    _check_adapter_numbers(spec, kind)
    try:
        return cls(task_type="CAUSAL_LM", **spec, **extra)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid method.adapter for peft_type={kind}: {exc}") from None


# Ranges peft does not enforce itself (it accepts r=0 and builds an empty adapter).
_ADAPTER_RANGES = {"r": (1, None), "lora_alpha": (0, None), "alpha": (0, None),
                   "lora_dropout": (0, 1), "module_dropout": (0, 1), "rank_dropout": (0, 1)}


def _check_adapter_numbers(spec: dict[str, Any], kind: str) -> None:
    for key, (low, high) in _ADAPTER_RANGES.items():
        value = spec.get(key)
        if value is None:
            continue
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value < low
        if bad or (high is not None and value >= high) or (key == "r" and value != int(value)):
            want = f"an integer >= {low}" if key == "r" else (
                f"in [{low}, {high})" if high is not None else f">= {low}")
            raise ConfigError(f"method.adapter.{key} (peft_type={kind}) must be {want}, "
                              f"found {value!r}")


@METHODS.register("lora")
class LoraMethod(LocalStepsMethod):
    """Local adapter training; the update is the delta of adapter tensors only."""

    name = "lora"
    config_cls = LoraConfig

    def attach(self, base_model: nn.Module, *, seed: int) -> nn.Module:
        """Wrap ``base_model`` with the adapter; init is seeded without touching global RNG."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(base_model, peft_config(self.cfg.adapter))
        return model

    def get_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        state = get_peft_model_state_dict(model)
        # copy=True: numpy views would alias the live parameters and change with training
        return {k: state[k].detach().to(torch.float32, copy=True).cpu().numpy()
                for k in sorted(state)}

    def set_state(self, model: nn.Module, state: ArrayDict) -> None:
        ref = get_peft_model_state_dict(model)
        tensors = {k: torch.as_tensor(np.asarray(state[k])).to(ref[k].dtype) for k in state}
        result = set_peft_model_state_dict(model, tensors)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"adapter state has unexpected keys {result.unexpected_keys[:3]}")

    def save(self, model: nn.Module, path: Path) -> None:
        """Checkpoint in ``peft`` format (``PeftModel.from_pretrained`` loads it)."""
        model.save_pretrained(str(path))

    def load(self, model: nn.Module, path: Path) -> None:
        weights = load_peft_weights(str(path))
        self.set_state(model, {k: v.float().numpy() for k, v in weights.items()})
