"""Client training methods: the ABC, its registry and the per-process model cache.

A method owns three things: how trainable parameters are attached to a frozen base
model, how the global state is read/written, and one round of local training that
returns a :class:`~fedpeft.types.TrainResult`. Methods register by name in ``METHODS``
with a frozen config dataclass (``config_cls``) that the config loader validates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from fedpeft.registry import Registry
from fedpeft.types import ArrayDict, TrainResult

METHODS: Registry[type[ClientMethod]] = Registry("method")


@dataclass(frozen=True)
class TrainContext:
    """Per-round facts a method needs besides its data."""

    server_round: int
    partition_id: int
    seed: int
    pad_token_id: int
    proximal_mu: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)  # method-specific inputs


class ClientMethod(ABC):
    """One way of training a model locally and describing the result as an update.

    Class attributes:
        name: registry name (``method.name`` in config).
        config_cls: frozen dataclass holding this method's options.
        update_kind: what ``train`` returns on the wire (``dense``: tensor deltas);
            strategies declare which kinds they aggregate.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    update_kind: ClassVar[str] = "dense"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def attach(self, base_model: nn.Module, *, seed: int) -> nn.Module:
        """Return the trainable model built on ``base_model`` (called once per process)."""

    @abstractmethod
    def get_state(self, model: nn.Module) -> dict[str, Any]:
        """Global state as named float32 numpy arrays, sorted by name."""

    @abstractmethod
    def set_state(self, model: nn.Module, state: ArrayDict) -> None:
        """Overwrite the trainable state of ``model`` with ``state``."""

    @abstractmethod
    def train(self, model: nn.Module, examples: Sequence[Any], ctx: TrainContext) -> TrainResult:
        """Run one round of local training from the current state; return the update."""

    def initial_global(self, model: nn.Module) -> dict[str, Any]:
        """What the server broadcasts before round 1 (dense methods: the full state)."""
        return self.get_state(model)

    def apply_global(self, model: nn.Module, arrays: ArrayDict) -> None:
        """Bring the server's model to the state a round's aggregate describes."""
        self.set_state(model, arrays)

    def save(self, model: nn.Module, path: Path) -> None:
        """Write a checkpoint of the trainable state (override for library formats)."""
        raise NotImplementedError(f"method {self.name!r} cannot write checkpoints")

    def load(self, model: nn.Module, path: Path) -> None:
        """Read a checkpoint written by :meth:`save` into ``model``."""
        raise NotImplementedError(f"method {self.name!r} cannot read checkpoints")


def build_method(name: str, cfg: Any) -> ClientMethod:
    """Instantiate the registered method ``name`` with its validated config."""
    return METHODS.get(name)(cfg)


_MODEL_CACHE: dict[tuple[Any, ...], nn.Module] = {}


def cached_model(key: tuple[Any, ...], factory: Any) -> nn.Module:
    """Process-wide cache of attached models: a worker loads a base model once and
    reuses it for every client it serves (state is swapped with ``set_state``)."""
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = factory()
    return _MODEL_CACHE[key]
