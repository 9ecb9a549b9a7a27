"""Privacy mechanisms: the ABC, its registry, and which combinations can be made private.

A mechanism is chosen with ``privacy=<name>`` (one YAML each under ``configs/privacy/``)
and says at which level ε is meant: ``sample`` (one training example of a client, e.g.
DP-SGD) or ``client`` (a client's whole contribution in a round). Client-side mechanisms
receive their config in ``TrainContext.privacy``; each describes what it did as
:class:`~fedpeft.privacy.accounting.PrivacyEvent` values, which the server's ledger
composes per client across rounds.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC
from dataclasses import dataclass
from typing import Any, ClassVar

from fedpeft.errors import ConfigError, IncompatibleComponentsError
from fedpeft.registry import Registry

PRIVACY: Registry[type[PrivacyMechanism]] = Registry("privacy")
LEVELS = ("none", "sample", "client")


@dataclass(frozen=True)
class BudgetConfig:
    """Options every mechanism shares: δ, and an optional ε budget per client."""

    delta: float = 1e-5
    max_epsilon: float | None = None  # stop sampling a client whose next round exceeds it

    def check_budget(self, prefix: str) -> None:
        """δ in (0, 1) and a positive budget, named by their keys."""
        if not 0 < self.delta < 1:
            raise ConfigError(f"{prefix}.delta must be in (0, 1), found {self.delta!r}")
        if self.max_epsilon is not None and not self.max_epsilon > 0:
            raise ConfigError(f"{prefix}.max_epsilon must be > 0 (or null for no budget), "
                              f"found {self.max_epsilon!r}")


class PrivacyMechanism(ABC):
    """One way of making a run differentially private.

    Class attributes:
        name: registry name (``privacy.name``).
        config_cls: frozen dataclass of its options.
        level: what one unit of privacy protects (see :data:`LEVELS`).
        update_kinds: method update kinds it can protect (``dense``, ``seeds``,
            ``projections``); ``first_order``: it needs methods that take gradient steps.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    level: ClassVar[str] = "none"
    update_kinds: ClassVar[tuple[str, ...]] = ("dense", "seeds", "projections")
    first_order: ClassVar[bool] = False
    remedy: ClassVar[str] = ""  # what to use instead when a method does not fit

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def check(self, method: type, strategy: str, params: dict[str, Any],
              method_cfg: Any = None) -> None:
        """Fail, saying why, when this mechanism cannot protect ``method`` (configured by
        ``method_cfg``) under ``strategy`` (override to add more rules)."""
        kind = getattr(method, "update_kind", "dense")
        if kind not in self.update_kinds or (self.first_order and not _first_order(method)):
            raise IncompatibleComponentsError(
                f"privacy={self.name} cannot protect method={method.name}: it "
                f"{self._needs()}, and {method.name} {_describe(method)}. {self.remedy}".strip())

    def resolve(self, run: Any) -> Any:
        """This mechanism's config with anything derived from the run filled in (e.g. σ
        for a target ε over ``run.num_rounds``); the default changes nothing."""
        return self.cfg

    def first_round(self, method_cfg: Any, run: Any, smallest: int) -> Any:
        """The :class:`~fedpeft.privacy.accounting.PrivacyEvent` of one round of the client
        with the fewest examples (``smallest``; the largest sampling rate), or None when
        the mechanism spends no budget; the preflight checks it against ``max_epsilon``,
        because a client's first round is admitted before anything is known of it."""
        return None

    def _needs(self) -> str:
        if self.first_order:
            return "clips per-example gradients of local gradient steps"
        return f"protects {'/'.join(self.update_kinds)} updates"


def _first_order(method: type) -> bool:
    return bool(getattr(method, "first_order", False))


def _describe(method: type) -> str:
    kind = getattr(method, "update_kind", "dense")
    if not _first_order(method):
        return f"takes zeroth-order steps (no per-example gradients; update kind {kind!r})"
    return f"sends {kind!r} updates"


def with_target_sigma(cfg: Any, sample_rate: float, total_steps: int) -> Any:
    """``cfg`` with σ chosen for its ``target_epsilon`` (sample-level mechanisms, on the
    client, which alone knows its q): Opacus's search over ``total_steps`` steps at rate q,
    i.e. the client's ε reaches the target if it takes part in every planned round.
    Without a target ``cfg`` is returned unchanged."""
    target = getattr(cfg, "target_epsilon", None)
    if target is None:
        return cfg
    if total_steps < 1:
        raise ConfigError(f"privacy.target_epsilon needs the planned number of steps, "
                          f"found {total_steps} (run.num_rounds x method.local_steps)")
    sigma = _sigma_for(float(target), float(cfg.delta), float(sample_rate), int(total_steps))
    return dataclasses.replace(cfg, noise_multiplier=sigma)


@functools.lru_cache(maxsize=256)
def _sigma_for(target: float, delta: float, sample_rate: float, steps: int) -> float:
    from fedpeft.privacy.accounting import noise_for_target  # imports Opacus

    return noise_for_target(target, delta, sample_rate, steps, "rdp")


def sample_level_round(cfg: Any, batch_size: int, smallest: int, local_steps: int,
                       num_rounds: int, seeded: bool = False) -> Any:
    """One round of a sample-level mechanism on a client of ``smallest`` examples: q =
    batch/N (1 when batches are not secret), σ as that client would choose it."""
    from fedpeft.privacy.accounting import PrivacyEvent

    q = 1.0 if seeded else min(1.0, batch_size / max(1, smallest))
    sigma = with_target_sigma(cfg, q, local_steps * num_rounds).noise_multiplier
    return PrivacyEvent(sigma, q, local_steps)


def build_privacy(cfg: Any) -> PrivacyMechanism:
    """The mechanism ``cfg.name`` with its validated config."""
    return PRIVACY.get(cfg.name)(cfg)


@dataclass(frozen=True)
class NoPrivacyConfig:
    """``privacy=none``: no mechanism, no ε (the run reports itself as non-private)."""

    name: str = "none"


@PRIVACY.register("none")
class NoPrivacy(PrivacyMechanism):
    """No differential privacy.

    Paper: none (the non-private baseline every private run is compared against).
    """

    name = "none"
    config_cls = NoPrivacyConfig
