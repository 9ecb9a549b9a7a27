"""Compose and validate the whole configuration tree before anything heavy happens.

Hydra's compose API merges ``configs/config.yaml`` with its groups (model, data,
method, strategy) and the user's overrides; this module then builds frozen, typed
config objects, checking every key, every registered name and the compatibility of
components, so a typo fails in milliseconds with the valid choices instead of after a
model has loaded. The same overrides string drives ``fedpeft simulate`` and
``flwr run --run-config "overrides='...'"``.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft import schema
from fedpeft.data import DataConfig
from fedpeft.errors import ConfigError
from fedpeft.methods import METHODS
from fedpeft.models import ModelConfig

CONFIG_DIR_ENV = "FEDPEFT_CONFIG_DIR"
# Component packages outside ``fedpeft/`` that take part in validation. They are loaded
# by name (no static import keeps the core independent of them) and register checks.
COMPONENT_PACKAGES = ("strategies",)
StrategyCheck = Callable[[str, dict[str, Any], str], None]
_STRATEGY_CHECKS: list[StrategyCheck] = []


def register_strategy_check(check: StrategyCheck) -> StrategyCheck:
    """Register ``check(strategy_name, params, update_kind)``; it raises ConfigError."""
    _STRATEGY_CHECKS.append(check)
    return check


def load_components() -> None:
    """Import the component packages so their registries and checks exist."""
    for name in COMPONENT_PACKAGES:
        importlib.import_module(name)


@dataclass(frozen=True)
class RunConfig:
    """Run-level options: rounds, seed, where metrics/checkpoints go, resume."""

    seed: int = 0
    num_rounds: int = 3
    output_dir: str = "runs"
    run_id: str | None = None
    resume: str | None = None  # run directory (or checkpoint directory) to continue
    checkpoint: bool = True
    round_timeout_s: float = 3600.0
    progress: bool = True

    def validate(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"run.num_rounds must be >= 1, found {self.num_rounds}")


@dataclass(frozen=True)
class EvalConfig:
    """Server-side evaluation of the global model on the held-out split."""

    batch_size: int = 16
    max_examples: int | None = None
    every: int = 1  # evaluate every N rounds (the last round is always evaluated); 0 = never

    def validate(self) -> None:
        if self.batch_size < 1 or self.every < 0:
            raise ConfigError("eval.batch_size must be >= 1 and eval.every >= 0")


@dataclass(frozen=True)
class SimConfig:
    """Simulation size and per-client resources (``fedpeft simulate`` passes them to
    ``flwr run --federation-config``; deployments ignore them)."""

    num_clients: int = 4
    client_cpus: int = 2
    client_gpus: float = 0.0

    def validate(self) -> None:
        if self.num_clients < 1 or self.client_cpus <= 0 or self.client_gpus < 0:
            raise ConfigError("sim.num_clients >= 1, sim.client_cpus > 0, sim.client_gpus >= 0")


@dataclass(frozen=True)
class StrategyConfig:
    """``name`` picks a registered strategy; ``params`` are its keyword arguments."""

    name: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FedPeftConfig:
    """The validated configuration tree."""

    model: ModelConfig
    data: DataConfig
    method: Any
    strategy: StrategyConfig
    run: RunConfig
    eval: EvalConfig
    sim: SimConfig = field(default_factory=SimConfig)
    overrides: tuple[str, ...] = ()


_TOP = {"model", "data", "method", "strategy", "run", "eval", "sim"}


def default_config_dir() -> Path:
    """``$FEDPEFT_CONFIG_DIR`` or the ``configs/`` folder next to the package."""
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def parse_overrides(text: str | Sequence[str] | None) -> list[str]:
    """Split an overrides string (shell-style quoting) into a list."""
    if text is None:
        return []
    return shlex.split(text) if isinstance(text, str) else [str(t) for t in text]


def compose(
    overrides: str | Sequence[str] | None = None, config_dir: str | Path | None = None
) -> FedPeftConfig:
    """Compose configs with Hydra and validate the result (see module docstring)."""
    items = parse_overrides(overrides)
    hydra_items = [_add_or_set(o) for o in items]
    raw = _hydra_compose(hydra_items, Path(config_dir) if config_dir else default_config_dir())
    return from_dict(raw, overrides=tuple(items))


_DOTTED = re.compile(r"^[A-Za-z_][\w-]*\.[\w.-]+=")


def _add_or_set(override: str) -> str:
    """``a.b=v`` -> ``++a.b=v``: every schema field is settable even when the YAML leaves
    it at its default; typos are still caught by schema validation, listing valid keys."""
    return f"++{override}" if _DOTTED.match(override) else override


def _hydra_compose(overrides: list[str], config_dir: Path) -> dict[str, Any]:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not (config_dir / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in config directory {str(config_dir)!r}")
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        text = str(exc).split("\nConfig search path")[0].strip()
        raise ConfigError(f"invalid overrides {overrides}: {text}") from None
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def from_dict(raw: dict[str, Any], overrides: tuple[str, ...] = ()) -> FedPeftConfig:
    """Validate a plain config tree (what Hydra composed) into a :class:`FedPeftConfig`."""
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {unknown}; valid keys: {sorted(_TOP)}")
    method_raw = dict(raw.get("method") or {})
    method_cls = METHODS.get(str(method_raw.get("name", "lora"))).config_cls
    cfg = FedPeftConfig(
        model=schema.build(ModelConfig, raw.get("model"), "model"),
        data=schema.build(DataConfig, raw.get("data"), "data"),
        method=schema.build(method_cls, method_raw, "method"),
        strategy=_strategy(raw.get("strategy") or {}),
        run=schema.build(RunConfig, raw.get("run"), "run"),
        eval=schema.build(EvalConfig, raw.get("eval"), "eval"),
        sim=schema.build(SimConfig, raw.get("sim"), "sim"),
        overrides=overrides,
    )
    check_compatibility(cfg)
    return cfg


def _strategy(raw: dict[str, Any]) -> StrategyConfig:
    params = dict(raw)
    return StrategyConfig(name=str(params.pop("name", "fedavg")), params=params)


def check_compatibility(cfg: FedPeftConfig) -> None:
    """Run the registered strategy checks: known name, valid options, and that the
    strategy can aggregate the method's update kind (errors name what would fit)."""
    load_components()
    kind = getattr(METHODS.get(cfg.method.name), "update_kind", "dense")
    for check in _STRATEGY_CHECKS:
        check(cfg.strategy.name, dict(cfg.strategy.params), kind)
