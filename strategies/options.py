"""Strategy options: types from each strategy's own signature, ranges from a small schema,
and the node-count rules that only the federation size can decide.

Types are never listed by hand: a Flower class's ``__init__`` annotations say that
``num_malicious_nodes`` is an ``int``, so ``strategy.num_malicious_nodes=abc`` fails at
config time instead of after a round. Ranges follow option names (fractions in [0, 1],
counts >= 0) with a few per-strategy bounds, and the federation checks apply Flower's own
sampling rule (``max(int(n * fraction_train), min_train_nodes)`` of ``n`` nodes) to the
robust strategies' requirements (Krum: n >= 2f + 3, Bulyan: n >= 4f + 3).
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Mapping
from typing import Any

from fedpeft.config import register_federation_check
from fedpeft.errors import ConfigError

# (option-name pattern, lowest, highest, whether the lowest itself is allowed)
_RANGES: tuple[tuple[str, float, float | None, bool], ...] = (
    (r"fraction_\w+", 0.0, 1.0, True),
    (r"beta(_\d)?", 0.0, 1.0, True),
    (r"min_\w+_nodes|num_malicious_nodes", 0, None, True),
    (r"num_nodes_to_select|num_\w+", 1, None, True),
    (r"eta(_l)?|tau|\w*learning_rate|q|proximal_mu|server_momentum", 0.0, None, True),
)
# Per-strategy bounds that the name rule cannot express.
_SPECIAL = {("fedtrimmedavg", "beta"): (0.0, 0.5, "it trims beta from each end")}


def type_hints(factory: Any) -> dict[str, Any]:
    """Annotated parameter types of a strategy factory (class ``__init__`` or function)."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except (NameError, TypeError):
        return {}


def check_option_types(name: str, params: Mapping[str, Any], factory: Any) -> None:
    """Fail when a value does not match its annotated type (or a range rule)."""
    hints = type_hints(factory)
    for key, value in params.items():
        if "Callable" in str(hints.get(key)):
            raise ConfigError(f"strategy.{key} of strategy {name!r} takes a Python callable "
                              f"and cannot be set from config; found {value!r}")
        expected = _scalar(hints.get(key))
        if expected is not None and not _is(expected, value):
            raise ConfigError(
                f"strategy.{key}={value!r} ({type(value).__name__}) is invalid for strategy "
                f"{name!r}: expected {_kind(expected)}")
        _check_range(name, key, value)


def _scalar(tp: Any) -> type | None:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    tp = args[0] if len(args) == 1 else tp
    return tp if tp in (int, float, bool, str) else None


def _is(expected: type, value: Any) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _kind(tp: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _check_range(name: str, key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if (name, key) in _SPECIAL:
        low, high, why = _SPECIAL[(name, key)]
        if not low <= value < high:
            raise ConfigError(f"strategy.{key}={value} for {name!r} must be in "
                              f"[{low}, {high}) ({why})")
        return
    for pattern, low, high, _ in _RANGES:
        if re.fullmatch(pattern, key):
            if value < low or (high is not None and value > high):
                bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ConfigError(f"strategy.{key} must be {bound}, found {value}")
            return


def effective(factory: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """The options a strategy will run with: its signature defaults, then ``params``."""
    sig = inspect.signature(factory)
    defaults = {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}
    return {**defaults, **params}


def sample_size(opts: Mapping[str, Any], num_nodes: int) -> int:
    """How many nodes Flower samples per round from ``num_nodes`` connected ones."""
    if "fraction_train" not in opts:
        return num_nodes
    return max(int(num_nodes * opts["fraction_train"]), int(opts.get("min_train_nodes", 0)))


def nodes_needed(opts: Mapping[str, Any], num_nodes: int) -> int:
    """Nodes the strategy waits for before a round can start."""
    return max(int(opts.get("min_available_nodes", 0)), sample_size(opts, num_nodes), 1)


def check_nodes(name: str, opts: Mapping[str, Any], num_nodes: int) -> None:
    """Node-count rules for ``num_nodes`` clients (see module docstring)."""
    for key in ("min_available_nodes", "min_train_nodes"):
        if int(opts.get(key, 0)) > num_nodes:
            raise ConfigError(
                f"strategy.{key}={opts[key]} but the federation has only {num_nodes} "
                f"client(s) (sim.num_clients={num_nodes}); the run would wait forever. "
                f"Set strategy.{key} <= {num_nodes} or sim.num_clients >= {opts[key]}")
    sampled = sample_size(opts, num_nodes)
    if sampled < 1:
        raise ConfigError(
            f"strategy.fraction_train={opts['fraction_train']} of {num_nodes} client(s) "
            "samples no client; raise strategy.fraction_train or strategy.min_train_nodes")
    _check_robust(name, opts, sampled)


def _check_robust(name: str, opts: Mapping[str, Any], sampled: int) -> None:
    f = int(opts.get("num_malicious_nodes", 0))
    need = {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(name)
    if need is not None and sampled < need:
        rule = "4f + 3" if name == "bulyan" else "2f + 3"
        raise ConfigError(
            f"strategy={name} with num_malicious_nodes={f} needs at least {need} clients per "
            f"round (n >= {rule}), but {sampled} are sampled; lower "
            f"strategy.num_malicious_nodes or raise sim.num_clients / fraction_train")
    select = opts.get("num_nodes_to_select")
    if select is not None and int(select) > sampled:
        raise ConfigError(f"strategy.num_nodes_to_select={select} exceeds the {sampled} "
                          "clients sampled per round")


@register_federation_check
def _federation(name: str, params: dict[str, Any], num_nodes: int) -> None:
    from strategies.base import STRATEGIES

    check_nodes(name, effective(STRATEGIES.get(name).factory, params), num_nodes)
