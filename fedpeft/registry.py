"""A small generic registry: the single extension mechanism of fedpeft.

Methods, strategies, compressors, privacy mechanisms and attacks each own one
``Registry``; implementations register under a name and are built from config by that
name. Unknown names raise :class:`ConfigError` listing the registered names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedpeft.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> implementation mapping for one kind of component."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` without decorator syntax."""
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        """Return the implementation for ``name`` or fail listing valid names."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError.unknown(self.kind, name, self._items) from None

    def build(self, name: str, *args: object, **kwargs: object) -> object:
        """Instantiate/call the implementation registered as ``name``."""
        factory = self.get(name)
        if not callable(factory):
            raise ConfigError(f"{self.kind} {name!r} is not buildable")
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
