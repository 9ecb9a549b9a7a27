"""Client training methods: the ABC, its registry and the per-process model cache.

A method owns three things: how trainable parameters are attached to a frozen base
model, how the global state is read/written, and one round of local training that
returns a :class:`~fedpeft.types.TrainResult`. Methods register by name in ``METHODS``
with a frozen config dataclass (``config_cls``) that the config loader validates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedpeft import models
from fedpeft.data import DataConfig, collate, template_prompt
from fedpeft.errors import ConfigError
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
    privacy: Any = None  # the client-side privacy mechanism's config (None: not private)
    num_rounds: int = 0  # planned rounds (for a privacy target over the whole run)


class ClientMethod(ABC):
    """One way of training a model locally and describing the result as an update.

    Class attributes:
        name: registry name (``method.name`` in config).
        config_cls: frozen dataclass holding this method's options.
        update_kind: what ``train`` returns on the wire (``dense``: tensor deltas);
            strategies declare which kinds they aggregate.
        first_order: local training takes gradient steps (so DP-SGD can clip
            per-example gradients); zeroth-order methods set False.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    update_kind: ClassVar[str] = "dense"
    first_order: ClassVar[bool] = True
    needs_task: ClassVar[bool] = False  # bind_task must run (it reads the prompt template)

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

    def bind_task(self, model: nn.Module, template_prompt: list[int]) -> None:
        """Tell ``model`` the task's prompt template with an empty text (token ids);
        only methods with ``needs_task`` use it."""
        del model, template_prompt  # the default method needs neither

    def tuned(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The tensors this method trains: float32 whatever the base precision."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

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


def build_model(method: ClientMethod, model_cfg: models.ModelConfig, *, seed: int,
                data_cfg: DataConfig | None = None) -> nn.Module:
    """A fresh base model with ``method`` attached, on ``model.device`` in ``model.dtype``
    (trainable tensors float32): what every client, the server and the benches train on.
    Methods with ``needs_task`` (``ssf_pool``) also need the task's ``data_cfg``."""
    model = method.attach(models.load_causal_lm(model_cfg), seed=seed)
    model = models.place(model, method.tuned(model).values(), model_cfg)
    if method.needs_task:
        if data_cfg is None:
            raise ConfigError(f"method {method.name!r} needs the task: pass data_cfg to "
                              "build_model")
        method.bind_task(model, template_prompt(models.get_tokenizer(model_cfg), data_cfg))
    return model


_MODEL_CACHE: dict[tuple[Any, ...], nn.Module] = {}


def cached_model(key: tuple[Any, ...], factory: Any) -> nn.Module:
    """Process-wide cache of attached models: a worker loads a base model once and
    reuses it for every client it serves (state is swapped with ``set_state``)."""
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = factory()
    return _MODEL_CACHE[key]


@contextmanager
def seeded_training(model: nn.Module, ctx: TrainContext) -> Iterator[np.random.Generator]:
    """Train mode plus a generator for batch draws, both seeded per (run, round, client).

    Dropout draws from torch's RNG, so it is seeded inside a fork: local training is
    reproducible and the caller's RNG state is left untouched.
    """
    gen = np.random.default_rng([ctx.seed, ctx.server_round, ctx.partition_id])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(gen.integers(2**63 - 1)))
        model.train()
        try:
            yield gen
        finally:
            model.eval()


def draw_batch(gen: np.random.Generator, examples: Sequence[Any], size: int,
               pad_token_id: int) -> dict[str, torch.Tensor]:
    """A collated batch of ``size`` distinct examples (fewer if the partition is small)."""
    idx = gen.choice(len(examples), size=min(size, len(examples)), replace=False)
    return collate([examples[i] for i in idx], pad_token_id)
