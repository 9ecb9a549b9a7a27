"""Local gradient steps shared by the methods that train tensors with an optimizer
(``lora``, ``ssf``, ``ssf_pool``): the options, one round of local training (plain, with
FedProx's proximal term, or under DP-SGD) and the dense update it returns.

A subclass provides how tensors are attached and read (``attach``, ``get_state``,
``set_state``); the model's forward must accept ``labels`` and return ``.loss``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedpeft.data import Encoded
from fedpeft.errors import ConfigError
from fedpeft.methods.base import ClientMethod, TrainContext, draw_batch, seeded_training
from fedpeft.privacy.dpsgd import DPSGDConfig, private_steps
from fedpeft.types import DenseUpdate, TrainResult

OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}  # plain SGD: no momentum


@dataclass(frozen=True)
class StepConfig:
    """Optimizer options of a local round: ``local_steps`` steps on batches of
    ``batch_size``; ``optimizer: sgd`` with one step is FedSGD (upload = -lr x gradient)."""

    local_steps: int = 5
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"

    def validate(self) -> None:
        """Fail early on bad numbers or an unknown optimizer."""
        for key in ("local_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1, found {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"method.lr must be > 0, found {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError.unknown("method.optimizer", self.optimizer, sorted(OPTIMIZERS))


class LocalStepsMethod(ClientMethod):
    """A method whose round is ``local_steps`` optimizer steps; the update is the delta."""

    def train(
        self, model: nn.Module, examples: Sequence[Encoded], ctx: TrainContext
    ) -> TrainResult:
        """``local_steps`` optimizer steps on batches drawn with a per-(round, client) seed."""
        if not examples:
            raise ConfigError(f"partition {ctx.partition_id} has no training examples")
        start, t0 = self.get_state(model), time.perf_counter()
        params = list(self.tuned(model).values())
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
        cls = OPTIMIZERS[self.cfg.optimizer]
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
