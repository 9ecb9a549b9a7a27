"""Ferret: first-order local steps, updates projected onto shared random bases.

Paper: Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language
Models", ICML 2025, arXiv 2409.06277.

A client runs T plain SGD steps from the global weights w and forms Δ = w - w_T. The
trainable tensors (sorted names) form one flat vector cut into fixed-size blocks. Block l
(size d_l) gets K_l ∝ ‖Δ_l‖ bases (at least 2, Σ K_l ≈ K), each a vector of N(0,1) values
truncated to [-1/√d_l, 1/√d_l] regenerated from ``derive_seed(client_seed, "ferret-basis",
l, k)`` — a distinct seed for every (client round, block, basis), so two equal-size blocks
never share a basis. With ρ_l = Var of that truncated normal, E[v vᵀ] = ρ_l I, so
γ_l = V_lᵀ Δ_l / (ρ_l K_l) and Δ̂_l = V_l γ_l is an unbiased reconstruction. The client
uploads its seed, the counts K_l and all γ. The server's global step is
w ← w - Σ_j c_j Δ̂_j with c_j = η_g · ω_j (ω: normalised client weights); the round's
(seed, c, counts, γ) list is what clients receive to rebuild the same step.

Exactness: :func:`apply_contributions` accumulates Σ_j Σ_k (-c_j γ_jk) v_jk per block in a
float64 buffer with ``seeding.add_truncated_`` (each product exact, each add one IEEE
rounding, fixed order: contributions by ascending seed, bases by k) and rounds into the
float32 weights once, so server and clients get the same bits on any device.

Design choice: blocks are fixed-size slices of the flat vector (small tensors packed,
large ones split) rather than whole tensors, so the cost of a projection or a
reconstruction is Σ_l K_l d_l = K · block_size, independent of how tensor sizes vary.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.methods.base import METHODS, TrainContext, draw_batch, seeded_training
from fedpeft.methods.replay import ReplayMethod, check_trainable
from fedpeft.privacy.dpsgd import DPSGDConfig, private_steps
from fedpeft.seeding import (
    add_truncated_,
    derive_seed,
    truncated_normal_,
    truncated_normal_variance,
)
from fedpeft.types import ProjectedUpdate, TrainResult, compact_counts

MIN_BLOCK = 1 << 16  # automatic block size floor (keeps per-basis work vectorised)


@dataclass(frozen=True)
class FerretConfig:
    """Ferret defaults (paper: SGD lr 1e-4, T=10 steps of 4 samples, K ~ 8k numbers)."""

    name: str = "ferret"
    num_bases: int = 8192  # K: total projection coordinates per client per round
    local_steps: int = 10
    batch_size: int = 4
    lr: float = 1e-4
    max_grad_norm: float = 1.0  # 0 disables clipping
    block_size: int = 0  # elements per block; 0 = auto: max(65536, ceil(4·D / K))
    min_bases: int = 2  # per block
    trainable: str = "all"  # or a regex over parameter names
    adapter: dict[str, Any] | None = None  # a peft spec: tune only its parameters

    def validate(self) -> None:
        if min(self.num_bases, self.local_steps, self.batch_size, self.min_bases) < 1:
            raise ConfigError("method.num_bases, local_steps, batch_size and min_bases "
                              "must be >= 1")
        if not self.lr > 0 or self.max_grad_norm < 0 or self.block_size < 0:
            raise ConfigError("method.lr must be > 0; max_grad_norm and block_size >= 0")
        check_trainable(self.trainable, self.adapter)


@dataclass(frozen=True)
class BlockLayout:
    """The flat vector of the trainable tensors (sorted names) cut into blocks."""

    names: tuple[str, ...]
    numels: tuple[int, ...]
    block_size: int

    @property
    def total(self) -> int:
        return sum(self.numels)

    @property
    def num_blocks(self) -> int:
        return -(-self.total // self.block_size)

    def bounds(self, block: int) -> tuple[int, int]:
        start = block * self.block_size
        return start, min(start + self.block_size, self.total)

    def pieces(self, block: int) -> list[tuple[str, int, int, int]]:
        """(tensor name, start in tensor, length, start in block) covering ``block``."""
        lo, hi = self.bounds(block)
        out, offset = [], 0
        for name, n in zip(self.names, self.numels, strict=True):
            a, b = max(lo, offset), min(hi, offset + n)
            if a < b:
                out.append((name, a - offset, b - a, a - lo))
            offset += n
        return out


def make_layout(params: Mapping[str, torch.Tensor], cfg: FerretConfig) -> BlockLayout:
    """Blocks of ``cfg.block_size`` (or the automatic size) over ``params``."""
    names = tuple(sorted(params))
    numels = tuple(params[n].numel() for n in names)
    total = sum(numels)
    size = cfg.block_size or max(MIN_BLOCK, -(-4 * total // cfg.num_bases))
    layout = BlockLayout(names, numels, min(size, total))
    if layout.num_blocks * cfg.min_bases > cfg.num_bases:
        raise ConfigError(
            f"method.num_bases={cfg.num_bases} cannot give {layout.num_blocks} blocks "
            f"{cfg.min_bases} bases each ({total} parameters / block_size {layout.block_size}); "
            "raise num_bases or block_size (block_size: 0 picks one)")
    return layout


def allocate(norms: np.ndarray, num_bases: int, minimum: int) -> np.ndarray:
    """K_l ∝ ‖Δ_l‖ with K_l >= minimum and Σ K_l ≈ num_bases (uniform if Δ = 0)."""
    norms = np.nan_to_num(np.asarray(norms, np.float64), nan=0.0, posinf=0.0)
    share = norms / norms.sum() if norms.sum() > 0 else np.full(norms.size, 1 / norms.size)
    spare = max(num_bases - minimum * norms.size, 0)
    return (minimum + np.floor(share * spare)).astype(np.int32)


def basis_seed(client_seed: int, block: int, k: int) -> int:
    """Seed of basis k of block ``block`` for one client round (never reused)."""
    return derive_seed(client_seed, "ferret-basis", block, k)


@lru_cache(maxsize=256)
def block_rho(d: int) -> float:
    """ρ for a block of d elements: Var of N(0,1) truncated to ±1/√d (≈ 1/(3d))."""
    return truncated_normal_variance(1 / math.sqrt(d))


def _bound(d: int) -> float:
    return 1 / math.sqrt(d)


@torch.no_grad()
def project(delta: torch.Tensor, layout: BlockLayout, client_seed: int,
            counts: np.ndarray) -> np.ndarray:
    """γ for every block: γ_lk = v_lkᵀ Δ_l / (ρ_l K_l); ``delta`` is the flat Δ."""
    gammas = []
    full = torch.empty(layout.block_size, dtype=delta.dtype, device=delta.device)
    for block, k_l in enumerate(counts):
        lo, hi = layout.bounds(block)
        d, part, buf = hi - lo, delta[lo:hi], full[:hi - lo]
        scale = 1.0 / (block_rho(d) * int(k_l))
        for k in range(int(k_l)):
            truncated_normal_(buf, basis_seed(client_seed, block, k), _bound(d))
            gammas.append(float(torch.dot(buf, part)) * scale)
    return np.asarray(gammas, dtype=np.float32)


@dataclass(frozen=True)
class Contribution:
    """One client's share of a round: its seed, step coefficient c_j, counts and γ."""

    seed: int
    coef: float
    counts: np.ndarray
    gammas: np.ndarray


@torch.no_grad()
def apply_contributions(params: Mapping[str, torch.Tensor], layout: BlockLayout,
                        contributions: Sequence[Contribution]) -> None:
    """w ← w - Σ_j c_j Δ̂_j, block by block, exactly (see the module docstring)."""
    ordered = sorted(contributions, key=lambda c: c.seed)
    starts = [np.concatenate([[0], np.cumsum(c.counts)[:-1]]).astype(np.int64) for c in ordered]
    device = next(iter(params.values())).device
    for block in range(layout.num_blocks):
        lo, hi = layout.bounds(block)
        acc = torch.zeros(hi - lo, dtype=torch.float64, device=device)
        for c, first in zip(ordered, starts, strict=True):
            for k in range(int(c.counts[block])):
                gamma = float(c.gammas[first[block] + k])
                add_truncated_(acc, basis_seed(c.seed, block, k), _bound(hi - lo),
                               -c.coef * gamma)
        for name, start, length, at in layout.pieces(block):
            flat = params[name].view(-1)[start:start + length]
            flat.copy_((flat.to(torch.float64) + acc[at:at + length]).to(flat.dtype))


def client_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed a client uses for its bases in one round."""
    return derive_seed(run_seed, "ferret-client", server_round, partition_id)


def encode_round(contributions: Sequence[Contribution], rnd: int | None = None,
                 ) -> dict[str, np.ndarray]:
    """Wire arrays of contributions (``rnd`` tags them for a multi-round history)."""
    out = {
        "seed": np.array([c.seed for c in contributions], np.int64),
        "coef": np.array([c.coef for c in contributions], np.float64),
        "counts": compact_counts(np.stack([c.counts for c in contributions])),
        "gamma": np.concatenate([c.gammas.astype(np.float32) for c in contributions]),
    }
    if rnd is not None:
        out["round"] = np.full(len(contributions), rnd, np.int32)
    return out


def decode_round(arrays: Mapping[str, np.ndarray]) -> list[tuple[int, Contribution]]:
    """Inverse of (concatenated) :func:`encode_round`: (round, contribution) pairs."""
    counts = np.asarray(arrays["counts"]).astype(np.int64)
    ends = np.cumsum(counts.sum(axis=1))
    out = []
    for i in range(counts.shape[0]):
        first = int(ends[i - 1]) if i else 0
        rnd = int(arrays["round"][i]) if "round" in arrays else 0
        out.append((rnd, Contribution(int(arrays["seed"][i]), float(arrays["coef"][i]),
                                      counts[i], arrays["gamma"][first:int(ends[i])])))
    return out


@METHODS.register("ferret")
class FerretMethod(ReplayMethod):
    """Client side of Ferret: SGD steps, then block-wise projection of Δ to K coordinates."""

    name = "ferret"
    config_cls = FerretConfig
    update_kind = "projections"

    def attach(self, base_model: nn.Module, *, seed: int) -> nn.Module:
        model = self.attach_adapter(base_model, seed)
        for p in model.parameters():
            p.requires_grad_(False)
        params = self.params(model)
        for p in params.values():
            p.requires_grad_(True)
        self.layout = make_layout(params, self.cfg)
        return model

    def apply_global(self, model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
        """Server replay of one round's contributions (empty at round 0)."""
        if arrays:
            apply_contributions(self.params(model), self.layout,
                                [c for _, c in decode_round(arrays)])

    def catch_up(self, model: nn.Module, arrays: Mapping[str, np.ndarray], after: int,
                 upto: int) -> None:
        if "counts" not in arrays:
            return
        by_round: dict[int, list[Contribution]] = {}
        for rnd, c in decode_round(arrays):
            by_round.setdefault(rnd, []).append(c)
        for rnd in sorted(r for r in by_round if after < r <= upto):
            apply_contributions(self.params(model), self.layout, by_round[rnd])

    def train(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext) -> TrainResult:
        """T SGD steps, Δ = w - w_T, K_l ∝ ‖Δ_l‖, γ = projection of Δ onto seeded bases."""
        if not examples:
            raise ConfigError(f"partition {ctx.partition_id} has no training examples")
        params = self.params(model)
        start = torch.cat([p.detach().reshape(-1).float() for p in params.values()])
        t0 = time.perf_counter()
        if isinstance(ctx.privacy, DPSGDConfig):
            with seeded_training(model, ctx):
                dp = private_steps(model, list(params.values()), examples,
                                   steps=self.cfg.local_steps, batch_size=self.cfg.batch_size,
                                   make_optimizer=self._optimizer, cfg=ctx.privacy,
                                   pad_token_id=ctx.pad_token_id, num_rounds=ctx.num_rounds)
            losses: list[float] = []
        else:
            dp, losses = {}, self._sgd(model, list(params.values()), examples, ctx)
        t1 = time.perf_counter()
        delta = start - torch.cat([p.detach().reshape(-1).float() for p in params.values()])
        seed = client_seed(ctx.seed, ctx.server_round, ctx.partition_id)
        norms = np.array([float(delta[slice(*self.layout.bounds(b))].norm())
                          for b in range(self.layout.num_blocks)])
        counts = allocate(norms, self.cfg.num_bases, self.cfg.min_bases)
        gammas = project(delta, self.layout, seed, counts)
        finite = [x for x in losses if math.isfinite(x)]
        metrics = {"train_time_s": t1 - t0, "project_time_s": time.perf_counter() - t1,
                   "delta_norm": float(delta.norm()), **dp}  # Δ is private: post-processing
        if not dp:  # the training loss is an unnoised function of the data
            metrics["train_loss"] = float(np.mean(finite)) if finite else float("nan")
        return TrainResult(update=ProjectedUpdate(seed, counts, gammas),
                           num_examples=len(examples), metrics=metrics)

    def _optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.cfg.lr)

    def _sgd(self, model: nn.Module, params: list[torch.Tensor], examples: Sequence[Any],
             ctx: TrainContext) -> list[float]:
        opt = self._optimizer(params)
        losses = []
        with seeded_training(model, ctx) as gen:
            for _ in range(self.cfg.local_steps):
                batch = draw_batch(gen, examples, self.cfg.batch_size, ctx.pad_token_id)
                opt.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                losses.append(float(loss.detach()))
                if not torch.isfinite(loss):
                    continue  # skip a non-finite step instead of corrupting weights
                loss.backward()
                if self.cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
                opt.step()
        opt.zero_grad(set_to_none=True)  # free the gradients
        return losses
