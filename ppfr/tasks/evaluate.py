"""experiment=evaluate: measure a protected set already on disk (`eval.set_dir`) on the data it was made from."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

import datamodules
from ppfr.config import to_dict
from ppfr.errors import ConfigError
from ppfr.evaluate import evaluate_set
from ppfr.generate import ProtectedSet
from ppfr.run import Run


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    if not cfg.eval.set_dir:
        raise ConfigError(
            "experiment=evaluate needs eval.set_dir=<folder of a protected set (holding manifest.jsonl)>"
        )
    protected_set = ProtectedSet(cfg.eval.set_dir)
    protected_set.manifest()  # a clear error before the data is aligned
    return evaluate_set(cfg, run, datamodules.create(to_dict(cfg.data)), protected_set)
