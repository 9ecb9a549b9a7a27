"""FedKSeed: zeroth-order federated full-parameter tuning over K shared seeds.

Paper: Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes", ICML 2024, arXiv 2312.06353.

Each local step picks a seed s (uniformly, or with FedKSeed-Pro probabilities p), perturbs
the trainable weights in place by ±eps·z(s) to estimate the directional derivative
g = (L(w+eps z) - L(w-eps z)) / 2eps, and moves w ← w - lr·g·z(s). Only the pairs
(seed index, Σg) travel. The global model is *defined* by replaying every round's aggregated
scalars in ascending seed order (:func:`apply_round`), which server and clients execute
with the same inputs, hence bit-identical weights (``fedpeft.seeding`` regenerates z(s)
with the same bits on every device).

This module holds the algorithm (pure functions + the client method's local training);
the Flower protocol (accumulator, per-client catch-up, Pro probabilities) is
``strategies/fedkseed.py``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.data import collate
from fedpeft.errors import ConfigError
from fedpeft.methods.base import METHODS, TrainContext
from fedpeft.methods.replay import ReplayMethod, check_trainable
from fedpeft.privacy.base import with_target_sigma
from fedpeft.privacy.dpzo import (
    DPZOConfig,
    dpzo_train,
    result_metrics,
    sample_rate,
    sequence_losses,
)
from fedpeft.seeding import derive_seed, perturb_
from fedpeft.types import SeedUpdate, TrainResult


@dataclass(frozen=True)
class FedKSeedConfig:
    """FedKSeed defaults from the paper (K=4096, tau=200, batch 1, eps=5e-4, lr=3e-7)."""

    name: str = "fedkseed"
    num_seeds: int = 4096
    local_steps: int = 200
    batch_size: int = 1
    eps: float = 5e-4
    lr: float = 3e-7
    trainable: str = "all"  # "all" or a regex over parameter names
    adapter: dict[str, Any] | None = None  # a peft spec: tune only its parameters
    pro: bool = False
    pro_clip: float = 1000.0
    pro_temperature: float = 1.0

    def validate(self) -> None:
        if self.num_seeds < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ConfigError("method.num_seeds, local_steps and batch_size must be >= 1")
        if not (self.eps > 0 and self.lr > 0 and self.pro_temperature > 0):
            raise ConfigError("method.eps, method.lr and method.pro_temperature must be > 0")
        check_trainable(self.trainable, self.adapter)


def candidate_seeds(run_seed: int, k: int) -> list[int]:
    """The K shared seeds, derived once from the run seed (same on every party)."""
    return [derive_seed(run_seed, "fedkseed", i) for i in range(k)]


@torch.no_grad()
def apply_round(
    params: Mapping[str, torch.Tensor], seeds: Sequence[int], indices: np.ndarray,
    values: np.ndarray, lr: float,
) -> None:
    """w ← w - lr · Σ_s ΔA[s] · z(s), seed indices in ascending order (the canonical
    replay: one regeneration per touched seed, however many clients used it)."""
    order = np.argsort(indices, kind="stable")
    for i in order:
        perturb_(params, seeds[int(indices[i])], -lr * float(values[i]))


def pro_probabilities(
    abs_clipped_sum: np.ndarray, counts: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """FedKSeed-Pro: ψ_s = mean |clip(H_s)|, min-max normalised, softmax(ψ̃ / T)."""
    psi = np.divide(abs_clipped_sum, counts, out=np.zeros_like(abs_clipped_sum, float),
                    where=counts > 0)
    span = psi.max() - psi.min()
    norm = (psi - psi.min()) / span if span > 0 else np.zeros_like(psi)
    logits = norm / temperature
    e = np.exp(logits - logits.max())
    return e / e.sum()


Round = tuple[int, np.ndarray, np.ndarray]  # (round, ascending seed indices, ΔA values)


def _index_dtype(num_seeds: int) -> type:
    return np.uint16 if num_seeds <= 1 << 16 else np.int32


def encode_history(rounds: Sequence[Round], num_seeds: int) -> dict[str, np.ndarray]:
    """Wire form of several rounds' ΔA, each round in its smaller encoding.

    Sparse rounds travel as ``hist_idx`` (uint16 when K <= 65536) and ``hist_val`` (float32),
    concatenated, with one ``hist_round``/``hist_size`` pair per round: 6 bytes per touched
    seed. A round whose sparse form would exceed a dense K-vector (4 bytes per seed) travels
    as a row of ``dense_val`` with its number in ``dense_round``. Zero entries are never
    sent, so both forms decode to the same (indices, values). Empty groups are omitted.
    """
    idx_dtype = _index_dtype(num_seeds)
    per_seed = np.dtype(idx_dtype).itemsize + 4
    sparse = [r for r in rounds if r[1].size and r[1].size * per_seed <= 4 * num_seeds]
    dense = [r for r in rounds if r[1].size * per_seed > 4 * num_seeds]
    out: dict[str, np.ndarray] = {}
    if sparse:
        out["hist_round"] = np.array([r for r, _, _ in sparse], np.int32)
        out["hist_size"] = np.array([i.size for _, i, _ in sparse], np.int32)
        out["hist_idx"] = np.concatenate([i.astype(idx_dtype) for _, i, _ in sparse])
        out["hist_val"] = np.concatenate([v.astype(np.float32) for _, _, v in sparse])
    if dense:
        rows = np.zeros((len(dense), num_seeds), np.float32)
        for row, (_, i, v) in zip(rows, dense, strict=True):
            row[i] = v
        out["dense_round"] = np.array([r for r, _, _ in dense], np.int32)
        out["dense_val"] = rows
    return out


def decode_history(arrays: Mapping[str, np.ndarray]) -> list[Round]:
    """Inverse of :func:`encode_history`: per-round (round, indices, values), ascending."""
    rounds: list[Round] = []
    if "hist_round" in arrays:
        ends = np.cumsum(arrays["hist_size"])
        for r, end, size in zip(arrays["hist_round"], ends, arrays["hist_size"], strict=True):
            idx = arrays["hist_idx"][end - size:end].astype(np.int32)
            rounds.append((int(r), idx, arrays["hist_val"][end - size:end]))
    if "dense_round" in arrays:
        for r, row in zip(arrays["dense_round"], arrays["dense_val"], strict=True):
            idx = np.flatnonzero(row).astype(np.int32)
            rounds.append((int(r), idx, row[idx]))
    return sorted(rounds, key=lambda x: x[0])


@dataclass(frozen=True)
class ZOResult:
    """Accumulated per-seed scalars of one client's local round."""

    indices: np.ndarray  # (n,) int32, ascending, unique
    values: np.ndarray  # (n,) float32, Σ of that seed's g over the round
    losses: list[float]
    skipped: int


@torch.no_grad()
def zo_train(
    params: Mapping[str, torch.Tensor],
    loss_fn: Callable[[int], float],
    seeds: Sequence[int],
    cfg: FedKSeedConfig,
    rng: np.random.Generator,
    probs: np.ndarray | None = None,
) -> ZOResult:
    """``cfg.local_steps`` in-place two-point ZO steps (memory = inference).

    ``loss_fn(step)`` evaluates the current weights on that step's batch (the same batch
    for both evaluations of a step). Steps with a non-finite loss are skipped.
    """
    acc: dict[int, float] = {}
    losses, skipped = [], 0
    for step in range(cfg.local_steps):
        k = _pick_seed(rng, len(seeds), probs)
        g = _two_point(params, seeds[k], functools.partial(loss_fn, step), cfg.eps, losses)
        if g is None:
            skipped += 1
            continue
        perturb_(params, seeds[k], -cfg.lr * g)
        acc[k] = acc.get(k, 0.0) + g
    idx = np.array(sorted(acc), dtype=np.int32)
    vals = np.array([acc[int(i)] for i in idx], dtype=np.float32)
    return ZOResult(indices=idx, values=vals, losses=losses, skipped=skipped)


def _two_point(
    params: Mapping[str, torch.Tensor], seed: int, loss: Callable[[], float], eps: float,
    losses: list[float],
) -> float | None:
    perturb_(params, seed, eps)
    plus = loss()
    perturb_(params, seed, -2 * eps)
    minus = loss()
    perturb_(params, seed, eps)
    if not (math.isfinite(plus) and math.isfinite(minus)):
        return None
    losses.append(0.5 * (plus + minus))
    return (plus - minus) / (2 * eps)


@METHODS.register("fedkseed")
class FedKSeedMethod(ReplayMethod):
    """Client side of FedKSeed (+Pro): ZO local steps; the update is per-seed scalars."""

    name = "fedkseed"
    config_cls = FedKSeedConfig
    update_kind = "seeds"
    first_order = False

    def attach(self, base_model: nn.Module, *, seed: int) -> nn.Module:
        self._seeds = candidate_seeds(seed, self.cfg.num_seeds)
        return self.attach_adapter(base_model, seed)  # tuned in place: no grads, no optimizer

    def apply_global(self, model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
        """Server replay of one round's aggregate ``{'idx', 'vals'}`` (empty at round 0)."""
        if arrays:
            self.replay(model, arrays["idx"], arrays["vals"])

    def replay(self, model: nn.Module, indices: np.ndarray, values: np.ndarray) -> None:
        """Apply one round's aggregate (client catch-up; same function as the server)."""
        apply_round(self.params(model), self._seeds, indices, values, self.cfg.lr)

    def catch_up(self, model: nn.Module, arrays: Mapping[str, np.ndarray], after: int,
                 upto: int) -> None:
        for rnd, idx, vals in decode_history(arrays):
            if after < rnd <= upto:
                self.replay(model, idx, vals)

    def train(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext) -> TrainResult:
        """tau ZO steps on batches drawn with a per-(round, client) seed (DP-ZO steps when
        ``ctx.privacy`` is a :class:`DPZOConfig`)."""
        if isinstance(ctx.privacy, DPZOConfig):
            return self._train_private(model, examples, ctx, ctx.privacy)
        rng = np.random.default_rng([ctx.seed, ctx.server_round, ctx.partition_id])
        size = min(self.cfg.batch_size, len(examples))
        batches = [collate([examples[i] for i in rng.choice(len(examples), size, replace=False)],
                           ctx.pad_token_id) for _ in range(self.cfg.local_steps)]
        probs = ctx.extra.get("probs") if self.cfg.pro else None
        t0 = time.perf_counter()
        res = zo_train(self.params(model), lambda step: float(model(**batches[step]).loss),
                       self._seeds, self.cfg, rng, probs)
        metrics = {"train_loss": float(np.mean(res.losses)) if res.losses else float("nan"),
                   "train_time_s": time.perf_counter() - t0, "skipped_steps": res.skipped}
        return TrainResult(update=SeedUpdate(res.indices, res.values),
                           num_examples=len(examples), metrics=metrics)

    def _train_private(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext,
                       dp: DPZOConfig) -> TrainResult:
        """tau DP-ZO steps (``fedpeft.privacy.dpzo``); seed choice as in :meth:`train`.
        No ``train_loss`` is reported: it would be an unnoised function of the data."""
        rng = np.random.default_rng([ctx.seed, ctx.server_round, ctx.partition_id])
        probs = ctx.extra.get("probs") if self.cfg.pro else None
        q = 1.0 if dp.sampling == "seeded" else sample_rate(self.cfg.batch_size, len(examples))
        dp = with_target_sigma(dp, q, self.cfg.local_steps * ctx.num_rounds)
        t0 = time.perf_counter()
        res = dpzo_train(self.params(model), _batch_losses(model, examples, ctx.pad_token_id),
                         len(examples), self._seeds, functools.partial(
                             _pick_seed, rng, len(self._seeds), probs), self.cfg, dp, rng)
        metrics = {"train_time_s": time.perf_counter() - t0, "skipped_steps": 0,
                   **result_metrics(res, dp)}
        return TrainResult(update=SeedUpdate(res.indices, res.values),
                           num_examples=len(examples), metrics=metrics)


def _pick_seed(rng: np.random.Generator, k: int, probs: np.ndarray | None) -> int:
    """One step's seed index: uniform, or with FedKSeed-Pro probabilities."""
    return int(rng.choice(k, p=probs)) if probs is not None else int(rng.integers(k))


def _batch_losses(model: nn.Module, examples: Sequence[Any],
                  pad_token_id: int) -> Callable[[np.ndarray], torch.Tensor]:
    """Per-sequence losses of the examples at given indices: one forward for the batch
    (labels are kept out of the forward so the model does not compute the mean loss)."""

    def losses(idx: np.ndarray) -> torch.Tensor:
        batch = collate([examples[int(i)] for i in idx], pad_token_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits  # placed models move inputs to their device
        return sequence_losses(logits, labels.to(logits.device))

    return losses
