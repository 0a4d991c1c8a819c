"""Face datasets as Lightning DataModules, built by name from a config mapping.

``create({"name": "lfw", "root": ..., ...})``: ``name`` picks the format, every other key is a
constructor argument (the YAMLs in ``configs/data/`` list them all with their defaults).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from ppfr.errors import ConfigError

from .base import FaceDataModule, FaceDataset, Pair, Record
from .bupt import BUPTDataModule
from .celeba import CelebADataModule
from .insightface_bin import BinDataModule
from .lfw import LFWDataModule
from .pairlist import AgeDBDataModule, CALFWDataModule, CPLFWDataModule

REGISTRY: dict[str, type[FaceDataModule]] = {
    "lfw": LFWDataModule,
    "celeba": CelebADataModule,
    "agedb": AgeDBDataModule,
    "calfw": CALFWDataModule,
    "cplfw": CPLFWDataModule,
    "bin": BinDataModule,
    "bupt": BUPTDataModule,
}


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
    if name not in REGISTRY:
        raise ConfigError(f"data.name: {name!r} is not a known dataset; valid: {sorted(REGISTRY)}")
    cls = REGISTRY[name]
    valid = arguments(cls)
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ConfigError(f"data: unknown key(s) {unknown} for dataset {name!r}; valid keys: {valid}")
    if cfg.get("root") in (None, ""):
        raise ConfigError(f"data.root: missing for dataset {name!r}")
    return cls(**cfg)


__all__ = ["REGISTRY", "FaceDataModule", "FaceDataset", "Pair", "Record", "arguments", "create"]
