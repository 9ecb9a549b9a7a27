from __future__ import annotations

import pytest

from fedpeft.errors import ConfigError
from fedpeft.registry import Registry


def test_register_get_build_and_names() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register("b")
    class B:
        def __init__(self, x: int) -> None:
            self.x = x

    reg.add("a", dict)

    assert reg.names() == ["a", "b"]
    assert reg.get("b") is B
    assert reg.build("b", 3).x == 3
    assert "a" in reg and "zzz" not in reg
    assert len(reg) == 2


def test_unknown_name_lists_valid_choices() -> None:
    reg: Registry[type] = Registry("widget")
    reg.add("alpha", int)
    reg.add("beta", float)

    with pytest.raises(ConfigError) as err:
        reg.get("gamma")

    msg = str(err.value)
    assert "widget" in msg and "'gamma'" in msg and "alpha, beta" in msg


def test_duplicate_registration_fails() -> None:
    reg: Registry[type] = Registry("widget")
    reg.add("a", int)
    with pytest.raises(ConfigError, match="already registered"):
        reg.add("a", float)
