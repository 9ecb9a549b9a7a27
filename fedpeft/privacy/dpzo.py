"""DP-ZO: differentially private zeroth-order steps for the seed-based method (FedKSeed).

Paper: Tang et al., "Private Fine-tuning of Large Language Models with Zeroth-order
Optimization", arXiv 2401.04343.

Why: a FedKSeed client releases only scalars, one per step (the directional derivative of
its loss along z(s)); the direction z(s) comes from public seeds. Privatising that scalar
privatises the whole update, at the cost of one clipped, noised scalar per step instead of
a d-dimensional gradient as in DP-SGD.

What, per local step t (``mcfg`` is the method config, N the client's number of examples):

1. Poisson-sample the batch: every example is in it independently with probability
   q = min(1, mcfg.batch_size / N). With ``sampling: secret`` (default) the draws come
   from a generator seeded by :mod:`secrets`, so nobody else can recompute the batches;
   that secrecy is what the subsampling amplification in the accounted ε assumes.
   ``sampling: seeded`` draws from the per-(run, round, client) generator instead
   (reproducible), and the client then reports q = 1: the server knows the run seed, so
   it knows every batch and only the un-amplified Gaussian bound holds. The step's seed
   index is drawn from the per-(run, round, client) generator either way: it is public
   and independent of the data, as in the non-private path.
2. One forward per sign over the realised batch gives per-sequence losses L_i(w ± eps z)
   (mean token loss, labels -100 masked); g_i = (L_i(+) - L_i(-)) / (2 eps).
3. g_i is clipped to [-C, C] (a non-finite g_i counts as 0), then
   ĝ = (Σ_i clip(g_i) + N(0, sigma² C²)) / (q N). Dividing by the *expected* batch size
   q N (= mcfg.batch_size when q < 1; as Opacus does) keeps the noise scale independent
   of the secret realised batch.
4. w ← w - lr ĝ z(s); ĝ is accumulated per seed exactly as in the non-private path. The
   noisy ĝ is what travels, so server replay and client catch-up stay bit-identical.

An empty batch still takes a step (ĝ is noise only) and counts as one: skipping it would
reveal that the batch was empty. The noise is drawn from a :mod:`secrets`-seeded
generator, never from the run seed, so the server cannot subtract it. No unnoised
data-dependent value leaves the client: the private path reports no ``train_loss``.
The client reports ``PrivacyEvent(sigma, q, local_steps)`` (sample level; add/remove
adjacency with the dataset size N treated as public, as in Opacus).
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from fedpeft.errors import ConfigError
from fedpeft.privacy.base import PRIVACY, BudgetConfig, PrivacyMechanism, sample_level_round
from fedpeft.seeding import perturb_

if TYPE_CHECKING:  # the method imports this module: no runtime import back
    from fedpeft.methods.fedkseed import FedKSeedConfig

SAMPLING = ("secret", "seeded")


def _positive(key: str, value: Any, minimum_ok: bool = False) -> None:
    """``privacy.<key>`` must be a finite number > 0 (>= 0 with ``minimum_ok``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(
        value) and (value >= 0 if minimum_ok else value > 0)
    if not ok:
        bound = ">= 0" if minimum_ok else "> 0"
        raise ConfigError(f"privacy.{key}: expected a finite number {bound}, found {value!r}")


@dataclass(frozen=True)
class DPZOConfig(BudgetConfig):
    """``privacy=dpzo``: clip C on each per-example scalar, noise multiplier sigma.

    ``target_epsilon`` is only validated here: whoever wants sigma derived from a target
    resolves it (e.g. ``accounting.noise_for_target``) and passes a config with that sigma.
    """

    name: str = "dpzo"
    clip: float = 1.0
    noise_multiplier: float = 1.0
    target_epsilon: float | None = None
    sampling: str = "secret"  # "secret" (amplification holds) or "seeded" (reproducible)

    def validate(self) -> None:
        """Each value in range, the error naming its key, what was found and what fits."""
        self.check_budget("privacy")
        _positive("clip", self.clip)
        _positive("noise_multiplier", self.noise_multiplier, minimum_ok=True)
        if self.target_epsilon is not None:
            _positive("target_epsilon", self.target_epsilon)
            if self.max_epsilon is not None and self.target_epsilon > self.max_epsilon:
                raise ConfigError(f"privacy.target_epsilon: expected <= privacy.max_epsilon "
                                  f"({self.max_epsilon}), found {self.target_epsilon}")
        if self.sampling not in SAMPLING:
            raise ConfigError.unknown("privacy.sampling", str(self.sampling), SAMPLING)


@PRIVACY.register("dpzo")
class DPZO(PrivacyMechanism):
    """Per-example clipping and Gaussian noise on FedKSeed's scalar directional derivatives.

    Paper: Tang et al., arXiv 2401.04343.
    """

    name = "dpzo"
    config_cls = DPZOConfig
    level = "sample"
    update_kinds = ("seeds",)
    remedy = ("For methods that send dense updates or take first-order steps (lora, dora, "
              "ia3, ferret) use privacy=dpsgd, which clips per-example gradients.")

    def first_round(self, method_cfg: Any, run: Any, smallest: int) -> Any:
        return sample_level_round(self.cfg, method_cfg.batch_size, smallest,
                                  method_cfg.local_steps, run.num_rounds,
                                  seeded=self.cfg.sampling == "seeded")

    def _needs(self) -> str:
        return ("clips and noises the per-example scalar derivatives of zeroth-order "
                "seed-based steps (update kind 'seeds', i.e. method=fedkseed)")


def secure_generator() -> np.random.Generator:
    """A generator seeded from the OS's CSPRNG: its draws cannot be recomputed from any
    run seed, so the server cannot predict (and subtract) the noise."""
    return np.random.default_rng(secrets.randbits(128))


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson rate q = min(1, batch_size / N); q·N is the expected batch size."""
    return min(1.0, batch_size / num_examples)


def poisson_batch(rng: np.random.Generator, num_examples: int, q: float) -> np.ndarray:
    """Indices of the examples drawn, each independently with probability ``q``."""
    return np.flatnonzero(rng.random(num_examples) < q)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) float32 mean next-token loss per sequence, labels -100 masked (a sequence
    without labelled tokens has loss 0, so it contributes g = 0)."""
    targets = labels[:, 1:]  # (B, T-1)
    flat = logits[:, :-1].float().reshape(-1, logits.size(-1))  # (B·(T-1), V), contiguous
    tok = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-100,
                          reduction="none").view(targets.shape)
    count = (targets != -100).sum(dim=1).clamp(min=1)
    return tok.sum(dim=1) / count


def clip_scalars(g: np.ndarray, clip: float) -> np.ndarray:
    """Each g_i clipped to [-clip, clip]; non-finite entries count as 0 (bounded too)."""
    g = np.where(np.isfinite(g), g, 0.0)
    return np.clip(g, -clip, clip)


def noisy_estimate(g: np.ndarray, cfg: DPZOConfig, expected_batch: float,
                   noise_rng: np.random.Generator) -> float:
    """ĝ = (Σ clip(g_i) + N(0, sigma² C²)) / expected_batch: one Gaussian release."""
    noise = noise_rng.normal(0.0, cfg.noise_multiplier * cfg.clip)
    return float((clip_scalars(g, cfg.clip).sum() + noise) / expected_batch)


@torch.no_grad()
def per_example_derivatives(params: Mapping[str, torch.Tensor], seed: int,
                            losses: Callable[[], torch.Tensor], eps: float) -> np.ndarray:
    """g_i = (L_i(w + eps z) - L_i(w - eps z)) / 2eps for each example of the batch,
    perturbing in place (memory = inference) and restoring w as the non-private path does."""
    perturb_(params, seed, eps)
    plus = losses().double()
    perturb_(params, seed, -2 * eps)
    minus = losses().double()
    perturb_(params, seed, eps)
    return ((plus - minus) / (2 * eps)).cpu().numpy()


@dataclass(frozen=True)
class DPZOResult:
    """Accumulated noisy per-seed scalars of one private local round."""

    indices: np.ndarray  # (n,) int32, ascending, unique
    values: np.ndarray  # (n,) float32, Σ of that seed's noisy ĝ over the round
    steps: int
    empty_steps: int
    sample_rate: float  # the q to account with (1.0 for seeded sampling)


BatchLosses = Callable[[np.ndarray], torch.Tensor]  # example indices -> (B,) losses


@torch.no_grad()
def dpzo_train(
    params: Mapping[str, torch.Tensor], batch_losses: BatchLosses, num_examples: int,
    seeds: Sequence[int], pick: Callable[[], int], mcfg: FedKSeedConfig, cfg: DPZOConfig,
    rng: np.random.Generator, noise_rng: np.random.Generator | None = None,
) -> DPZOResult:
    """``mcfg.local_steps`` private ZO steps (module docstring); ``pick()`` draws the
    step's seed index from the public generator, as the non-private path does."""
    noise_rng = noise_rng if noise_rng is not None else secure_generator()
    sampler = rng if cfg.sampling == "seeded" else noise_rng
    q = sample_rate(mcfg.batch_size, num_examples)
    acc: dict[int, float] = {}
    empty = 0
    for _ in range(mcfg.local_steps):
        k = pick()
        batch = poisson_batch(sampler, num_examples, q)
        empty += batch.size == 0
        g = _derivatives(params, seeds[k], batch, batch_losses, mcfg.eps)
        g_hat = noisy_estimate(g, cfg, q * num_examples, noise_rng)
        perturb_(params, seeds[k], -mcfg.lr * g_hat)
        acc[k] = acc.get(k, 0.0) + g_hat
    idx = np.array(sorted(acc), dtype=np.int32)
    vals = np.array([acc[int(i)] for i in idx], dtype=np.float32)
    rate = 1.0 if cfg.sampling == "seeded" else q
    return DPZOResult(idx, vals, mcfg.local_steps, int(empty), rate)


def _derivatives(params: Mapping[str, torch.Tensor], seed: int, batch: np.ndarray,
                 batch_losses: BatchLosses, eps: float) -> np.ndarray:
    """Per-example g_i of a realised batch; no forward pass for an empty one."""
    if batch.size == 0:
        return np.zeros(0)
    return per_example_derivatives(params, seed, lambda: batch_losses(batch), eps)


def result_metrics(res: DPZOResult, cfg: DPZOConfig) -> dict[str, float]:
    """Reply metrics: the privacy event (sigma, q, steps) and the number of empty batches."""
    from fedpeft.privacy.accounting import PrivacyEvent, event_metrics  # imports Opacus

    event = PrivacyEvent(cfg.noise_multiplier, res.sample_rate, res.steps)
    return {**event_metrics(event), "dp_empty_steps": float(res.empty_steps)}
