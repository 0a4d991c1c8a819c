"""Protection methods: X (aligned faces in [0,1]) -> X'. ``create`` builds one from its config node.

Every module of this package is imported here, so a method registers itself in ``METHODS`` with
``@METHODS.register(name)`` and needs no line in this file.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping, Sequence

from torch import nn

from ppfr.errors import ConfigError
from ppfr.protect.base import METHODS, ProtectionMethod, plain

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


__all__ = ["METHODS", "ProtectionMethod", "create"]


def create(cfg: Mapping, recognizers: Sequence[nn.Module] | None = None) -> ProtectionMethod:
    """The method ``cfg["name"]`` built with the other keys as its arguments.

    Methods whose first argument is ``recognizers`` get the surrogates; an ``ensemble`` key (the
    surrogates' names) is checked against them and otherwise left to the caller, who builds them.
    """
    cfg = plain(cfg)
    name = cfg.pop("name", None)
    cls = METHODS.get(name)
    params = inspect.signature(cls).parameters
    needs = "recognizers" in params
    ensemble = cfg.pop("ensemble", None)
    valid = [k for k in params if k != "recognizers"]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ConfigError(
            f"protect: unknown key(s) {', '.join(unknown)} for method {name}; valid keys: {', '.join(valid)}"
        )
    if not needs:
        if ensemble:
            raise ConfigError(f"protect.ensemble: method {name} uses no surrogate recognizers")
        return cls(**cfg)
    if not recognizers:
        raise ConfigError(f"protect.ensemble: method {name} needs surrogate recognizers, none were given")
    if ensemble is not None:
        names = [getattr(r, "name", None) for r in recognizers]
        if len(ensemble) != len(recognizers) or (None not in names and list(ensemble) != names):
            raise ConfigError(
                f"protect.ensemble: {list(ensemble)} does not match the recognizers given ({names})"
            )
    return cls(list(recognizers), **cfg)
