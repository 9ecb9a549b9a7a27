"""Strategy registry: name -> how to build a Flower ``Strategy`` from config.

Flower's strategies are reused as they are; this module only validates their keyword
arguments against each class's signature (unknown keys list the valid ones) and records
which update kinds a strategy can aggregate, for config-time compatibility checks.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedpeft.config import register_strategy_check
from fedpeft.errors import ConfigError, IncompatibleComponentsError
from fedpeft.registry import Registry
from strategies.options import check_option_types

# Keyword arguments fedpeft sets itself; users cannot override them from config.
RESERVED = frozenset(
    {"arrayrecord_key", "configrecord_key", "weighted_by_key", "train_metrics_aggr_fn",
     "evaluate_metrics_aggr_fn", "fraction_evaluate", "min_evaluate_nodes"}
)


@dataclass(frozen=True)
class StrategySpec:
    """How to build one strategy.

    Attributes:
        factory: callable returning a Flower ``Strategy`` from keyword arguments.
        accepts: update kinds it aggregates (``dense`` = adapter/tensor deltas).
        paper: reference for the aggregation rule.
        fixed: keyword arguments always passed (not user-settable).
        wrap: whether the server wraps it in ``DecodingStrategy`` (dense strategies).
        linear: whether its rule needs only the example-weighted sum of the updates, so
            it runs under secure aggregation (FedAvg and the server optimisers).
    """

    factory: Callable[..., Strategy]
    accepts: frozenset[str] = frozenset({"dense"})
    paper: str = ""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    wrap: bool = True  # wrap in DecodingStrategy (dense deltas -> full tensors)
    linear: bool = False


STRATEGIES: Registry[StrategySpec] = Registry("strategy")


def strategy_params(spec: StrategySpec) -> dict[str, inspect.Parameter]:
    """User-settable parameters of a strategy (name -> signature parameter)."""
    sig = inspect.signature(spec.factory)
    return {
        n: p for n, p in sig.parameters.items()
        if n not in RESERVED and n not in spec.fixed and n != "self"
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def validate_params(name: str, params: Mapping[str, Any]) -> None:
    """Fail on unknown or missing strategy options, listing the valid ones."""
    valid = strategy_params(STRATEGIES.get(name))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        close = sorted({c for u in unknown for c in difflib.get_close_matches(u, list(valid))})
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown option(s) {unknown} for strategy {name!r}{hint}; "
            f"valid options: {', '.join(sorted(valid)) or '(none)'}"
        )
    missing = sorted(n for n, p in valid.items() if p.default is p.empty and n not in params)
    if missing:
        raise ConfigError(f"strategy {name!r} requires option(s) {missing}")
    check_option_types(name, params, STRATEGIES.get(name).factory)


def build_strategy(name: str, params: Mapping[str, Any]) -> Strategy:
    """Instantiate strategy ``name`` with validated ``params``.

    Federated (client-side) evaluation is off: fedpeft evaluates the global model on
    the server's held-out split every round.
    """
    validate_params(name, params)
    spec = STRATEGIES.get(name)
    kwargs = {**params, **spec.fixed}
    if "fraction_evaluate" in inspect.signature(spec.factory).parameters:
        kwargs["fraction_evaluate"] = 0.0
    return spec.factory(**kwargs)


@register_strategy_check
def check_strategy(name: str, params: Mapping[str, Any], update_kind: str, *,
                   secagg: bool = False) -> None:
    """Config-time check: known strategy, valid options, accepts the update kind, and
    (with secure aggregation) aggregates by a weighted sum."""
    spec = STRATEGIES.get(name)
    validate_params(name, params)
    if secagg and not spec.linear:
        fits = [n for n in STRATEGIES.names() if STRATEGIES.get(n).linear]
        raise IncompatibleComponentsError(
            f"secagg.enabled=true: strategy={name} needs each client's update (robust or "
            f"per-client rules, seed replays), but the server sees only their sum; "
            f"strategies that work on the sum: {', '.join(fits)}")
    if update_kind not in spec.accepts:
        fits = [n for n in STRATEGIES.names() if update_kind in STRATEGIES.get(n).accepts]
        raise IncompatibleComponentsError(
            f"strategy={name} cannot aggregate {update_kind!r} updates; "
            f"strategies that can: {', '.join(fits)}"
        )
