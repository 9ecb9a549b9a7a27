"""What an attacking server sees, and the interface every attack implements.

An :class:`Observation` holds only what a fedpeft server observes of one client in one
round (the decoded update, the global state it sent, the configured hyperparameters);
:class:`AttackContext` holds the public model the server distributed and the attacker's
own artefacts. Ground truth (the client's records) never enters either: only the scorer
(:mod:`attacks.metrics`) sees it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from attacks.metrics import Reconstruction
from fedpeft.registry import Registry

UPDATE_KINDS = ("dense", "compressed", "seed", "projected")
__all__ = ["ATTACKS", "Attack", "AttackContext", "Observation", "Reconstruction"]


@dataclass(frozen=True)
class Observation:
    """One client's upload in one round, as the server holds it after decoding.

    ``update``: delta tensors (dense and compressed kinds, after the codec) or the wire
    arrays of a seed/projected update; ``sent_global``: the global arrays the server sent
    for that round; ``hparams``: what the server configured (method options, prompt
    template, codec, privacy), never anything the client alone knows.
    """

    round: int
    partition: int
    kind: str
    update: Mapping[str, np.ndarray]
    sent_global: Mapping[str, np.ndarray]
    num_examples: int
    hparams: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise ValueError(f"observation kind must be one of {UPDATE_KINDS}, "
                             f"found {self.kind!r}")


@dataclass
class AttackContext:
    """The public side of an attack: the model and tokenizer the server distributed
    (after any malicious pre-training), the client method (to load adapter states), the
    prompt the server configured, and the attacker's artefacts."""

    model: Any
    tokenizer: Any
    method: Any
    prompt: str
    artefacts: dict[str, Any] = field(default_factory=dict)


class Attack(ABC):
    """A reconstruction attack on one observation.

    Class attributes: ``name`` (registry name, ``configs/attack/<name>.yaml``),
    ``config_cls`` (frozen dataclass of options), ``kinds`` (update kinds it can use;
    on any other kind it recovers nothing, which the audit reports as measured),
    ``max_observations`` (the audit attacks at most this many observations per run).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    kinds: ClassVar[tuple[str, ...]] = ("dense", "compressed")
    max_observations: ClassVar[int | None] = None  # slow attacks: the audit runs a few

    def __init__(self, cfg: Any, ctx: AttackContext) -> None:
        self.cfg, self.ctx = cfg, ctx

    def run(self, obs: Observation, batch_size: int) -> list[Reconstruction]:
        """``batch_size`` reconstructions, or none for a kind this attack cannot use."""
        if obs.kind not in self.kinds:
            return []
        return self.reconstruct(obs, batch_size)

    @abstractmethod
    def reconstruct(self, obs: Observation, batch_size: int) -> list[Reconstruction]:
        """Recover the ``batch_size`` sequences of the batch behind ``obs``."""


ATTACKS: Registry[type[Attack]] = Registry("attack")
