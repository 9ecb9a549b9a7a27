"""Differential privacy: mechanisms (one module each, registered in ``PRIVACY``), their
configs, and the per-client ledger (:mod:`fedpeft.privacy.accounting`).

Mechanism modules import Opacus only inside the functions that train, so composing a
config stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil

from fedpeft.privacy.base import PRIVACY, PrivacyMechanism, build_privacy

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "accounting") and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["PRIVACY", "PrivacyMechanism", "build_privacy"]
