"""Shared base of the seed-based methods (FedKSeed, Ferret): the global model is a replay.

Neither method ever ships weights. The global model is *defined* as the base weights
plus every round's aggregate replayed in order, and every party (server, each client)
executes the same replay, so all hold bit-identical weights. A client that missed rounds
receives the aggregates of exactly those rounds (``catch_up``); see ``client/seed_sync.py``
for the per-node snapshot that makes this work with stateless ClientApps.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.methods.base import ClientMethod


def trainable_params(model: nn.Module, pattern: str) -> dict[str, torch.Tensor]:
    """Name -> parameter for the tuned subset (sorted names define the flat layout)."""
    named = dict(model.named_parameters())
    if pattern != "all":
        rx = re.compile(pattern)
        named = {n: p for n, p in named.items() if rx.search(n)}
    if not named:
        raise ConfigError(f"method.trainable={pattern!r} matches no parameter")
    return {n: named[n] for n in sorted(named)}


def check_trainable(pattern: str, adapter: Mapping[str, Any] | None = None) -> None:
    """``method.trainable`` must be ``all`` or a valid regex; ``method.adapter`` (optional)
    must be a valid ``peft`` spec."""
    if pattern != "all":
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"method.trainable is not a valid regex: {exc}") from None
    if adapter is not None:
        from fedpeft.methods.lora import peft_config

        peft_config(dict(adapter))


class ReplayMethod(ClientMethod):
    """A method whose global state is the replay of per-round aggregates over base weights.

    Subclasses define ``apply_global`` (one round's aggregate, as the strategy returns it)
    and ``catch_up`` (the history arrays the strategy sends a client).
    """

    replays: ClassVar[bool] = True

    def attach_adapter(self, base_model: nn.Module, seed: int) -> nn.Module:
        """With ``method.adapter`` set, wrap the model in that ``peft`` adapter (seeded init,
        identical on every party) and tune only the adapter's parameters, e.g. FedKSeed or
        Ferret over LoRA; otherwise tune the model's own parameters."""
        if self.cfg.adapter is None:
            self._adapter_names: frozenset[str] | None = None
            return base_model
        from peft import get_peft_model

        from fedpeft.methods.lora import peft_config

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(base_model, peft_config(dict(self.cfg.adapter)))
        self._adapter_names = frozenset(n for n, p in model.named_parameters()
                                        if p.requires_grad)
        return model

    def params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        named = trainable_params(model, self.cfg.trainable)
        if getattr(self, "_adapter_names", None) is not None:
            named = {n: p for n, p in named.items() if n in self._adapter_names}
            if not named:
                raise ConfigError(f"method.trainable={self.cfg.trainable!r} matches no "
                                  "adapter parameter")
        return named

    def tuned(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.params(model)

    def get_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        return {k: v.detach().to(torch.float32, copy=True).cpu().numpy()
                for k, v in self.params(model).items()}

    @torch.no_grad()
    def set_state(self, model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
        for k, p in self.params(model).items():
            p.copy_(torch.as_tensor(np.asarray(state[k])))

    def initial_global(self, model: nn.Module) -> dict[str, np.ndarray]:
        return {}  # every party starts from the same base weights

    @abstractmethod
    def catch_up(self, model: nn.Module, arrays: Mapping[str, np.ndarray], after: int,
                 upto: int) -> None:
        """Replay the rounds ``after+1 .. upto`` contained in the history ``arrays``."""

    def save(self, model: nn.Module, path: Path) -> None:
        """The tuned tensors as safetensors (loadable into the base model by name)."""
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.params(model).items()},
                  str(path / "trainable.safetensors"))

    def load(self, model: nn.Module, path: Path) -> None:
        from safetensors.torch import load_file

        self.set_state(model, {k: v.numpy() for k, v in
                               load_file(str(path / "trainable.safetensors")).items()})
