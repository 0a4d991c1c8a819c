"""Protection methods: X (aligned faces in [0,1]) -> X'. ``create`` builds one from its config node."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

from torch import nn

from ppfr.errors import ConfigError
from ppfr.protect.base import ProtectionMethod, plain
from ppfr.protect.lfsa import LFSA

METHODS: dict[str, type[ProtectionMethod]] = {"lfsa": LFSA}

__all__ = ["METHODS", "ProtectionMethod", "create"]


def create(cfg: Mapping, recognizers: Sequence[nn.Module] | None = None) -> ProtectionMethod:
    """The method ``cfg["name"]`` built with the other keys as its arguments.

    Methods whose first argument is ``recognizers`` get the surrogates; an ``ensemble`` key (the
    surrogates' names) is checked against them and otherwise left to the caller, who builds them.
    """
    cfg = plain(cfg)
    name = cfg.pop("name", None)
    if name not in METHODS:
        raise ConfigError(f"protect.name: unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    cls = METHODS[name]
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
