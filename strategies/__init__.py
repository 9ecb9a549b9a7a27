"""Aggregation strategies: a registry over Flower's built-in strategies plus fedpeft's
decoding wrapper. Implementations in this package register on import."""

from __future__ import annotations

import importlib
import pkgutil

from strategies.base import STRATEGIES, StrategySpec, build_strategy, strategy_params

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["STRATEGIES", "StrategySpec", "build_strategy", "strategy_params"]
