"""Build frozen config dataclasses from plain dicts, with errors a user can act on.

Hydra composes the YAML tree; this module turns each node into a typed, frozen
dataclass. Unknown keys fail listing the valid keys; wrong types fail naming the
expected type. Dataclasses may define ``validate(self)`` for value checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

from fedpeft.errors import ConfigError

T = TypeVar("T")


def build(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Instantiate dataclass ``cls`` from ``data`` (recursively), validating keys/types."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f" in '{path}'" if path else ""
        close = sorted({c for u in unknown for c in difflib.get_close_matches(u, list(fields))})
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown config key(s) {unknown}{where}{hint}; valid keys: "
            f"{', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(hints[name], value, _join(path, name)) for name, value in data.items()
    }
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise ConfigError(f"invalid config at '{path or cls.__name__}': {exc}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def to_dict(obj: object) -> dict[str, Any]:
    """Plain-dict view of a (nested) config dataclass."""
    return dataclasses.asdict(obj)  # type: ignore[call-overload]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, path) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _type_error(path, "a mapping", value)
        return build(tp, value, path)
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise _type_error(path, "a list", value)
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise _type_error(path, "a mapping", value)
        return dict(value)
    return _coerce_scalar(tp, value, path)


def _coerce_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(path, "a bool", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, "an integer", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(path, "a string", value)
        return value
    return value


def _type_error(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(
        f"config key '{path}' expects {expected}, found {value!r} ({type(value).__name__})"
    )


def fingerprint(obj: object) -> str:
    """Stable text key of a config dataclass (usable where dict fields prevent hashing)."""
    import json

    return json.dumps(to_dict(obj), sort_keys=True, default=str)
