"""Client training methods; every module in this package registers on import."""

from __future__ import annotations

import importlib
import pkgutil

from fedpeft.methods.base import METHODS, ClientMethod, TrainContext, build_method, build_model

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base" and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "ClientMethod", "TrainContext", "build_method", "build_model"]
