"""Sweeps: ``fedpeft simulate --multirun`` over the cartesian grid of Hydra sweep overrides.

Each override is read by Hydra's own override parser, so ``a=1,2``, ``a=choice(1,2)``,
``a=range(1,4)`` and quoting (``a='x,y',z``) mean exactly what they mean to Hydra's
``--multirun``; this module only multiplies the choices out, in the order given, as Hydra's
BasicSweeper does. Overrides without a sweep are kept verbatim (their quoting untouched).
Every grid point is composed and preflighted before any runs, so a typo in the last point
fails in seconds instead of after the first runs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

from fedpeft.errors import ConfigError, FedPeftError


def expand_grid(overrides: Sequence[str]) -> list[list[str]]:
    """The grid points: one plain override list per combination of the swept values."""
    axes = [_choices(item) for item in overrides]
    return [list(point) for point in itertools.product(*axes)]


@functools.lru_cache(maxsize=1)
def _parser() -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def _parse(override: str) -> Any:
    """Hydra's parsed ``Override``; a grammar error names the override."""
    from hydra.errors import HydraException

    try:
        return _parser().parse_overrides([override])[0]
    except HydraException as exc:
        detail = str(exc).split("\nSee https://")[0].strip()
        raise ConfigError(f"cannot parse the override {override!r} for --multirun: "
                          f"{detail}") from None


def _choices(override: str) -> list[str]:
    """``key=v1,v2`` -> [``key=v1``, ``key=v2``]; a plain override -> [itself]."""
    parsed = _parse(override)
    if not parsed.is_sweep_override():
        return [override]
    if not parsed.is_discrete_sweep() or parsed.value_type.name == "GLOB_CHOICE_SWEEP":
        raise ConfigError(
            f"override {override!r}: --multirun runs a grid of listed values, so only "
            "comma lists (a=1,2), choice(...) and range(...) sweeps can be expanded; list "
            "the values instead")
    key = parsed.get_key_element()
    values = [f"{key}={value}" for value in parsed.sweep_string_iterator()]
    if not values:
        raise ConfigError(f"override {override!r} sweeps over no values")
    return values


def check_grid(grid: Sequence[Sequence[str]]) -> list[Any]:
    """Preflight every point (compose, validate, files, model, partition); the first
    failure is a ConfigError naming the point. Returns the points' configs."""
    from fedpeft.preflight import preflight

    configs = []
    for i, point in enumerate(grid):
        try:
            cfg = preflight(list(point), federation_size="sim").cfg
        except FedPeftError as exc:
            raise ConfigError(f"sweep point {i} ({' '.join(point)}): {exc}") from None
        if cfg.run.resume:
            raise ConfigError(f"sweep point {i}: run.resume cannot be combined with "
                              "--multirun (every point would continue the same run)")
        configs.append(cfg)
    return configs


def point_label(grid: Sequence[Sequence[str]], point: Sequence[str]) -> str:
    """The overrides that vary across the grid, to name a point in progress lines."""
    varying = [item for i, item in enumerate(point) if len({p[i] for p in grid}) > 1]
    return " ".join(varying) or "(single point)"
