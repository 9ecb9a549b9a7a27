"""What can be configured: groups, their YAML files and every valid key with its type.

Backs ``fedpeft config show [group]`` and ``fedpeft validate --help``, so the valid
keys are read from the same dataclasses and strategy signatures the validator uses,
never from a list kept by hand.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import Any

from fedpeft.compression import COMPRESSORS
from fedpeft.config import (
    COMPONENT_PACKAGES,
    CaptureConfig,
    EvalConfig,
    RunConfig,
    ScreenConfig,
    SecAggConfig,
    SimConfig,
    default_config_dir,
    load_components,
)
from fedpeft.data import DataConfig
from fedpeft.errors import ConfigError
from fedpeft.methods import METHODS
from fedpeft.models import ModelConfig
from fedpeft.privacy import PRIVACY

_PLAIN = {"model": ModelConfig, "data": DataConfig, "run": RunConfig, "eval": EvalConfig,
          "sim": SimConfig, "screen": ScreenConfig, "secagg": SecAggConfig,
          "capture": CaptureConfig}
_COMPONENTS = ("model", "data", "method", "strategy", "privacy", "compression")
_REGISTRIES = {"method": METHODS, "privacy": PRIVACY, "compression": COMPRESSORS}


def yaml_names(group: str) -> list[str]:
    """The YAML files of a config group (``group=<name>`` choices)."""
    return sorted(p.stem for p in (default_config_dir() / group).glob("*.yaml"))


def groups_text() -> str:
    """Overview: groups with their choices, top-level keys, the ``name:`` rule."""
    lines = ["Config groups (choose with group=<name>; set keys with group.key=value):"]
    lines += [f"  {g}: {', '.join(yaml_names(g))}" for g in _COMPONENTS]
    lines += ["Run-level keys: run.*, eval.*, sim.*, screen.*, capture.*",
              "Every component YAML (configs/<group>/<name>.yaml) must contain `name:`, the",
              "registered component it configures. List a group's keys with",
              "`fedpeft config show <group>` (groups: "
              + ", ".join(dict.fromkeys([*_COMPONENTS, *_PLAIN])) + ")."]
    return "\n".join(lines)


def group_text(group: str) -> str:
    """Every valid key of ``group`` with its type and default."""
    if group in _PLAIN:
        return f"{group}:\n" + _fields(_PLAIN[group], group)
    if group in _REGISTRIES:
        registry = _REGISTRIES[group]
        return "\n".join(f"{group}={n}:\n" + _fields(registry.get(n).config_cls, group)
                         for n in registry.names())
    if group == "strategy":
        return _strategies()
    raise ConfigError.unknown("config group", group, [*_COMPONENTS, *_PLAIN])


def _fields(cls: Any, prefix: str) -> str:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        if dataclasses.is_dataclass(hints[f.name]):
            out.append(_fields(hints[f.name], f"{prefix}.{f.name}"))
            continue
        out.append(f"  {prefix}.{f.name}: {_type_name(hints[f.name])} = {default!r}")
    return "\n".join(out)


def _strategies() -> str:
    load_components()
    pkg = importlib.import_module(COMPONENT_PACKAGES[0])
    out = []
    for name in pkg.STRATEGIES.names():
        params = pkg.strategy_params(pkg.STRATEGIES.get(name))
        keys = [f"  strategy.{k}: {_type_name(p.annotation)} = {p.default!r}"
                for k, p in params.items() if p.default is not inspect.Parameter.empty
                and not callable_option(p.annotation)]
        out.append(f"strategy={name}:\n" + ("\n".join(keys) or "  (no options)"))
    return "\n".join(out)


def callable_option(tp: Any) -> bool:
    """Whether an annotation is a callable (not settable from YAML)."""
    return "Callable" in str(tp)


def _type_name(tp: Any) -> str:
    """``int``, ``tuple[int, ...]``: parametrised types keep their parameters."""
    if typing.get_args(tp):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
