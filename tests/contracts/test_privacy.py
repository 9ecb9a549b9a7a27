"""Every registered privacy mechanism: one YAML naming it, a config that validates, a
level, and a clear refusal (or acceptance) for every method it is combined with."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from fedpeft.config import compose
from fedpeft.errors import IncompatibleComponentsError
from fedpeft.privacy import PRIVACY
from fedpeft.privacy.base import LEVELS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
YAMLS = {p.stem: yaml.safe_load(p.read_text()) for p in (CONFIGS / "privacy").glob("*.yaml")}
METHOD_YAMLS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))
STRATEGY_FOR = {"fedkseed": "fedkseed", "ferret": "ferret"}


@pytest.mark.parametrize("name", PRIVACY.names())
def test_every_mechanism_has_a_yaml_that_composes(name: str) -> None:
    (yaml_name,) = [y for y, doc in YAMLS.items() if doc["name"] == name]
    mechanism = PRIVACY.get(name)
    docs = (importlib.import_module(mechanism.__module__).__doc__ or "") + (
        mechanism.__doc__ or "")
    assert mechanism.level in LEVELS and "Paper:" in docs
    fits = [m for m in METHOD_YAMLS if _accepts(yaml_name, m)]
    assert fits, f"privacy={name} accepts no method"


@pytest.mark.parametrize("name", PRIVACY.names())
@pytest.mark.parametrize("method", METHOD_YAMLS)
def test_refusals_name_the_mechanism_the_method_and_why(name: str, method: str) -> None:
    try:
        _compose(name, method)
    except IncompatibleComponentsError as exc:
        text = str(exc)
        registered = yaml.safe_load((CONFIGS / "method" / f"{method}.yaml").read_text())["name"]
        assert f"privacy={name}" in text and f"method={registered}" in text and ": it " in text


def _accepts(privacy: str, method: str) -> bool:
    try:
        _compose(privacy, method)
    except IncompatibleComponentsError:
        return False
    return True


def _compose(privacy: str, method: str):
    return compose(f"privacy={privacy} method={method} "
                   f"strategy={STRATEGY_FOR.get(method, 'fedavg')}")
