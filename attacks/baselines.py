"""Baselines in the audit's harness, so the ReCIT numbers have something to beat.

``memorize``: the distributed (possibly boosted) model prompted exactly like the
clients' data, without looking at the update: what the attacker gets from memorisation
alone. Paper: Carlini et al., "Extracting Training Data from Large Language Models",
USENIX Security 2021, arXiv 2012.07805 (extraction by prompting).
"""

from __future__ import annotations

from dataclasses import dataclass

from attacks.base import ATTACKS, Attack, Observation, Reconstruction
from attacks.recit import generate
from fedpeft.errors import ConfigError


@dataclass(frozen=True)
class MemorizeConfig:
    """Options of the ``memorize`` baseline (beam width, reconstruction length)."""

    name: str = "memorize"
    beams: int = 4
    max_new_tokens: int = 48

    def validate(self) -> None:
        for key in ("beams", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"attack.{key} must be >= 1, found {getattr(self, key)}")


@ATTACKS.register("memorize")
class MemorizeAttack(Attack):
    """Generation from the global state the server sent, ignoring the update."""

    name = "memorize"
    config_cls = MemorizeConfig
    kinds = ("dense", "compressed", "seed", "projected")

    def reconstruct(self, obs: Observation, batch_size: int) -> list[Reconstruction]:
        if obs.kind in ("dense", "compressed"):
            self.ctx.method.set_state(self.ctx.model, dict(obs.sent_global))
        return generate(self.ctx, batch_size, self.cfg.beams, self.cfg.max_new_tokens)
