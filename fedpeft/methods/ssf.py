"""Scale-and-shift methods: ``ssf`` (one set of γ, β per site, mergeable) and
``ssf_pool`` (FedIns: a pool of entries per site, selected per instance).

Paper: Lian et al., "Scaling & Shifting Your Features", NeurIPS 2022, arXiv 2210.08823;
Feng et al., "FedIns: Learning Instance-Adaptive ...", ICCV 2023, arXiv 2308.06051.

Both send dense deltas of their tensors, so every dense strategy, codec and DP-SGD
applies. Aggregation is FedAvg over every pool tensor and key, weighted by examples
(the paper's choice, and ours): entry p is the same entry on every client, because all
start the round from the same global pool and keys and select by the same keys. A
client that never selects p sends a zero delta for it, so averaging scales p's update
by the share of data that used it — a slower step for a rarely used entry, never a mix
of unrelated entries. The modules and selection live in :mod:`fedpeft.ssf`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedpeft.errors import ConfigError
from fedpeft.methods.base import METHODS
from fedpeft.methods.local import LocalStepsMethod, StepConfig
from fedpeft.ssf import SSF, PoolOptions, SSFPoolModel, attach_sites, default_sites
from fedpeft.types import ArrayDict

_FILE = "ssf.safetensors"


@dataclass(frozen=True)
class SSFConfig(StepConfig):
    """Options of ``ssf``: ``sites`` are module names (or name suffixes) whose output is
    scaled and shifted (null: the architecture's default, see ``fedpeft.ssf``)."""

    name: str = "ssf"
    sites: list[str] | None = None
    init_std: float = 0.02
    lr: float = 5e-3

    def validate(self) -> None:
        """Fail early on bad numbers or an empty site list."""
        super().validate()
        if self.sites is not None and not self.sites:
            raise ConfigError("method.sites is empty: give module names or null (default)")
        if not self.init_std >= 0:
            raise ConfigError(f"method.init_std must be >= 0, found {self.init_std}")


@dataclass(frozen=True)
class SSFPoolConfig(SSFConfig):
    """Options of ``ssf_pool``: the SSF options plus the pool (entries, top_n, combine:
    mean | weighted, temperature of the weighted softmax, key_weight λ)."""

    name: str = "ssf_pool"
    pool: PoolOptions = field(default_factory=PoolOptions)

    def validate(self) -> None:
        super().validate()
        self.pool.validate()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@METHODS.register("ssf")
class SSFMethod(LocalStepsMethod):
    """One SSF per site, trained locally; the update is the delta of every γ and β."""

    name = "ssf"
    config_cls = SSFConfig

    def attach(self, base_model: nn.Module, *, seed: int) -> nn.Module:
        """Insert the sites into ``base_model`` in place (seeded init)."""
        gen, std = _generator(seed), self.cfg.init_std
        sites = self.cfg.sites or default_sites(base_model)
        attach_sites(base_model, sites, lambda c: SSF(c, std=std, generator=gen))
        return base_model

    def tuned(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if _is_ssf(n)}

    def get_state(self, model: nn.Module) -> dict[str, np.ndarray]:
        tensors = self.tuned(model)
        return {k: tensors[k].detach().to(torch.float32, copy=True).cpu().numpy()
                for k in sorted(tensors)}

    def set_state(self, model: nn.Module, state: ArrayDict) -> None:
        tensors = self.tuned(model)
        extra, missing = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
        if extra or missing:
            raise ConfigError(f"{self.name} state does not fit the model: unexpected keys "
                              f"{extra[:3]}, missing keys {missing[:3]}")
        with torch.no_grad():
            for k, p in tensors.items():
                p.copy_(torch.as_tensor(np.asarray(state[k])).view(p.shape).to(p.dtype))

    def save(self, model: nn.Module, path: Path) -> None:
        """``ssf.safetensors`` (float32 tensors by name) and ``ssf.json`` (the options)."""
        state = {k: torch.from_numpy(v) for k, v in self.get_state(model).items()}
        save_file(state, str(path / _FILE))
        (path / "ssf.json").write_text(json.dumps(_options(self.cfg), indent=2))

    def load(self, model: nn.Module, path: Path) -> None:
        self.set_state(model, {k: v.numpy() for k, v in load_file(str(path / _FILE)).items()})


def _is_ssf(name: str) -> bool:
    return ".ssf." in name or name.startswith("ssf.") or name == "keys.keys"


def _options(cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(cfg)


@METHODS.register("ssf_pool")
class SSFPoolMethod(SSFMethod):
    """A pool of SSF entries per site with keys; each instance uses its top-N entries."""

    name = "ssf_pool"
    config_cls = SSFPoolConfig
    needs_task = True

    def attach(self, base_model: nn.Module, *, seed: int) -> nn.Module:
        """Wrap ``base_model`` in an :class:`SSFPoolModel` (seeded init)."""
        sites = self.cfg.sites or default_sites(base_model)
        return SSFPoolModel(base_model, sites, self.cfg.pool, std=self.cfg.init_std,
                            generator=_generator(seed))

    def bind_task(self, model: nn.Module, template_prompt: list[int]) -> None:
        """Centre the model's queries on the task's prompt template (empty text)."""
        model.set_reference(template_prompt)
