"""One way to build things by name (timm's register / create / list): recognizers, protection
methods, datamodules and attackers each keep one `Registry`.

    METHODS = Registry("protection method", key="protect.name")

    @METHODS.register("blur")
    class Blur(ProtectionMethod): ...

    METHODS.create("blur", sigma=3.0)   # -> Blur(sigma=3.0)
    METHODS.names()                     # -> ["blur", ...]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ppfr.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named builders of one kind of thing; an unknown name is a ConfigError listing the known ones."""

    def __init__(self, kind: str, key: str | None = None) -> None:
        self.kind = kind
        self.key = key or kind  # the config key users set, named in errors
        self._builders: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def add(builder: Callable[..., T]) -> Callable[..., T]:
            if name in self._builders and self._builders[name] is not builder:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return add

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._builders:
            raise ConfigError(f"{self.key}: unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._builders[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
