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
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from torch import nn

from fedpeft.data import Encoded
from fedpeft.errors import ConfigError
from fedpeft.methods.base import METHODS, ClientMethod, TrainContext, draw_batch, seeded_training
from fedpeft.privacy.dpsgd import DPSGDConfig, private_steps
from fedpeft.types import ArrayDict, DenseUpdate, TrainResult

_DEFAULT_ADAPTER: dict[str, Any] = {
    "peft_type": "lora",
    "r": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
_ALIASES = {"dora": ("LORA", {"use_dora": True})}
_OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}  # plain SGD: no momentum


@dataclass(frozen=True)
class LoraConfig:
    """Options of the ``lora`` method. ``adapter`` is passed to ``peft`` as-is
    (plus ``peft_type``: lora, dora, ia3, loha, lokr, adalora, vera, ...)."""

    name: str = "lora"
    adapter: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_ADAPTER))
    local_steps: int = 5
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"

    def validate(self) -> None:
        """Fail early on bad numbers or an adapter spec ``peft`` would reject."""
        for key in ("local_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, found {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"method.lr must be > 0, found {self.lr}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError.unknown("method.optimizer", self.optimizer, sorted(_OPTIMIZERS))
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
class LoraMethod(ClientMethod):
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

    def train(
        self, model: nn.Module, examples: Sequence[Encoded], ctx: TrainContext
    ) -> TrainResult:
        """``local_steps`` optimizer steps on batches drawn with a per-(round, client) seed."""
        if not examples:
            raise ConfigError(f"partition {ctx.partition_id} has no training examples")
        start, t0 = self.get_state(model), time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        with seeded_training(model, ctx) as gen:
            if isinstance(ctx.privacy, DPSGDConfig):
                metrics = private_steps(
                    model, params, examples, steps=self.cfg.local_steps,
                    batch_size=self.cfg.batch_size, make_optimizer=self._optimizer,
                    cfg=ctx.privacy, pad_token_id=ctx.pad_token_id, num_rounds=ctx.num_rounds)
            else:
                metrics = self._steps(model, params, examples, ctx, gen)
        end = self.get_state(model)
        update = DenseUpdate({k: end[k] - start[k] for k in start})
        metrics["train_time_s"] = time.perf_counter() - t0
        return TrainResult(update=update, num_examples=len(examples), metrics=metrics)

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cls = _OPTIMIZERS[self.cfg.optimizer]
        return cls(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _steps(self, model: nn.Module, params: list[nn.Parameter],
               examples: Sequence[Encoded], ctx: TrainContext,
               gen: np.random.Generator) -> dict[str, float]:
        """The non-private local round; returns the mean finite training loss."""
        anchor = [p.detach().clone() for p in params] if ctx.proximal_mu > 0 else None
        opt, losses = self._optimizer(params), []
        for _ in range(self.cfg.local_steps):
            batch = draw_batch(gen, examples, self.cfg.batch_size, ctx.pad_token_id)
            losses.append(self._step(model, opt, params, batch, anchor, ctx.proximal_mu))
        finite = [x for x in losses if math.isfinite(x)]
        return {"train_loss": float(np.mean(finite)) if finite else float("nan")}

    def _step(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        params: list[nn.Parameter],
        batch: dict[str, torch.Tensor],
        anchor: list[torch.Tensor] | None,
        mu: float,
    ) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        total = loss
        if anchor is not None:  # FedProx proximal term, mu/2 * ||w - w_global||^2
            sq = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            total = loss + 0.5 * mu * sq
        if not torch.isfinite(total):
            return float("nan")  # skip a non-finite step instead of corrupting weights
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        opt.step()
        return float(loss.detach())

    def save(self, model: nn.Module, path: Path) -> None:
        """Checkpoint in ``peft`` format (``PeftModel.from_pretrained`` loads it)."""
        model.save_pretrained(str(path))

    def load(self, model: nn.Module, path: Path) -> None:
        weights = load_peft_weights(str(path))
        self.set_state(model, {k: v.float().numpy() for k, v in weights.items()})
