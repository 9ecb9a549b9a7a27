"""Client-level DP: each client's whole round is one record (DP-FedAvg).

Paper: McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018, arXiv 1710.06963.

Each client clips its update (all tensors together) to L2 norm ``clip`` before sending
it, so the bound holds whatever aggregates the sum later (secure aggregation included);
the server clips again (a no-op for honest clients). The server samples clients itself,
each independently with probability ``sample_rate`` (Poisson, as the accountant
assumes; Flower's own sampling draws a fixed number), averages with equal weights over
the *expected* number of clients q·N, and adds Gaussian noise of std σ·C/(q·N) from a
cryptographically seeded generator. Every round is one event (σ, q, 1) for every client
of the federation, sampled or not.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedpeft.errors import ConfigError, IncompatibleComponentsError
from fedpeft.privacy.accounting import PrivacyEvent, noise_for_target
from fedpeft.privacy.base import PRIVACY, BudgetConfig, PrivacyMechanism

# Strategies whose aggregate is the (equal-weight) mean of the updates, possibly followed
# by a server optimiser: post-processing of the noisy mean keeps the guarantee.
MEAN_STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
LEDGER_KEY = "clients"  # one history holds for every client of the federation


@dataclass(frozen=True)
class ClientDPConfig(BudgetConfig):
    """``privacy=client`` options: clip C, noise multiplier σ, Poisson rate q."""

    name: str = "client"
    clip: float = 1.0
    noise_multiplier: float = 1.0
    sample_rate: float = 0.5
    target_epsilon: float | None = None  # set: σ is chosen to reach it after all rounds

    def validate(self) -> None:
        """C > 0, σ >= 0, q in (0, 1], a positive target, plus δ and the budget."""
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"privacy.target_epsilon must be > 0 (or null), found "
                              f"{self.target_epsilon!r}")
        if not self.clip > 0:
            raise ConfigError(f"privacy.clip must be > 0, found {self.clip!r}")
        if not self.noise_multiplier >= 0:
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, found "
                              f"{self.noise_multiplier!r}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"privacy.sample_rate must be in (0, 1], found "
                              f"{self.sample_rate!r}")
        self.check_budget("privacy")

    def event(self) -> PrivacyEvent:
        """What one round releases, for every client."""
        return PrivacyEvent(self.noise_multiplier, self.sample_rate, 1, "client")


@PRIVACY.register("client")
class ClientLevelDP(PrivacyMechanism):
    """Client-level DP with server-side Poisson sampling and noise (see module docstring)."""

    name = "client"
    config_cls = ClientDPConfig
    level = "client"
    update_kinds: ClassVar[tuple[str, ...]] = ("dense",)
    remedy = ("Seed-based methods send scalars per seed or basis, not a clippable tensor "
              "update: use privacy=dpzo (fedkseed) or privacy=dpsgd (ferret).")

    def check(self, method: type, strategy: str, params: dict[str, Any],
              method_cfg: Any = None) -> None:
        super().check(method, strategy, params, method_cfg)
        if strategy not in MEAN_STRATEGIES:
            raise IncompatibleComponentsError(
                f"privacy=client cannot run with strategy={strategy}: its sensitivity bound "
                "needs the equal-weight mean of clipped updates, and this strategy weights "
                "or selects updates by their values. Strategies that fit: "
                + ", ".join(MEAN_STRATEGIES))


    def first_round(self, method_cfg: Any, run: Any, smallest: int) -> PrivacyEvent:
        return self.cfg.event()

    def resolve(self, run: Any) -> ClientDPConfig:
        """With ``target_epsilon``: σ from Opacus's search for q and ``run.num_rounds``
        rounds (RDP, the conservative accountant), replacing ``noise_multiplier``."""
        cfg = self.cfg
        if cfg.target_epsilon is None:
            return cfg
        sigma = noise_for_target(cfg.target_epsilon, cfg.delta, cfg.sample_rate,
                                 run.num_rounds, "rdp")
        return dataclasses.replace(cfg, noise_multiplier=sigma)


def secure_rng() -> np.random.Generator:
    """A numpy generator seeded from the OS's CSPRNG: noise the server cannot replay."""
    return np.random.default_rng(secrets.randbits(128))


def poisson_sample(nodes: list[int], rate: float) -> list[int]:
    """Each node independently with probability ``rate``, from the OS's CSPRNG."""
    draw = secrets.SystemRandom()
    return [n for n in nodes if draw.random() < rate]


def noisy_mean(deltas: list[dict[str, np.ndarray]], cfg: ClientDPConfig, expected: float,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(Σ clipped deltas + N(0, σ²C²)) / expected, per tensor, in float32.

    Noise is drawn in float64 from ``rng`` (numpy's PCG64, CSPRNG-seeded) and added
    before the division, which is written by hand because Flower's helper draws from
    numpy's global, unseeded-by-default generator."""
    if not expected > 0:
        raise ValueError(f"expected number of clients must be > 0, found {expected}")
    names = sorted(deltas[0]) if deltas else []
    std = cfg.noise_multiplier * cfg.clip
    out = {}
    for name in names:
        total = np.sum([d[name].astype(np.float64) for d in deltas], axis=0)
        total += rng.normal(0.0, std, size=total.shape) if std > 0 else 0.0
        out[name] = (total / expected).astype(np.float32)
    return out
