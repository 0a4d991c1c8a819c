"""Face datasets as Lightning DataModules, built by name from a config mapping.

``create({"name": "lfw", "root": ..., ...})``: ``name`` picks the format in ``DATAMODULES``, every
other key is a constructor argument (``configs/data/`` lists them all with their defaults).
Importing the modules below registers them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ppfr.errors import ConfigError

from . import bupt, celeba, insightface_bin, lfw, pairlist  # noqa: F401  (they register themselves)
from .base import DATAMODULES, FaceDataModule, FaceDataset, Pair, Record, check_disjoint_identities


def arguments(cls: type[FaceDataModule]) -> list[str]:
    """Every constructor argument of a datamodule, its own and the shared base ones."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in names:
                names.append(p.name)
        if klass is FaceDataModule:
            break
    return names


def create(cfg: Mapping[str, Any]) -> FaceDataModule:
    """Build the datamodule ``cfg["name"]`` with the remaining keys as arguments."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    cls = DATAMODULES.get(name)
    valid = arguments(cls)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ConfigError(f"data: unknown key(s) {unknown} for dataset {name!r}; valid keys: {valid}")
    if cfg.get("root") in (None, ""):
        raise ConfigError(f"data.root: missing for dataset {name!r}")
    return cls(**cfg)


__all__ = [
    "DATAMODULES",
    "FaceDataModule",
    "FaceDataset",
    "Pair",
    "Record",
    "arguments",
    "check_disjoint_identities",
    "create",
]
