"""One place for the machine: `recognizer.device` (auto | cpu | cuda | cuda:N) as a torch.device, and the
CPU settings every Trainer's ranks apply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch

from ppfr.errors import ConfigError


def device(choice: str | torch.device | Mapping[str, Any] | None = "auto") -> torch.device:
    """The device a config asks for: a string, or a config holding `recognizer.device`.

    `auto` picks CUDA when there is one. Asking for a CUDA device that is not there is a
    ConfigError rather than a crash deep inside the first forward pass.
    """
    if isinstance(choice, Mapping):  # a whole config (DictConfig is a Mapping)
        choice = (choice.get("recognizer") or {}).get("device", "auto")
    if choice is None or str(choice) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"recognizer.device={choice!r}: not a device (auto, cpu, cuda or cuda:N)") from err
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"recognizer.device={choice!r}: no CUDA device here (use auto or cpu)")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"recognizer.device={choice!r}: only {count} CUDA device(s) (cuda:0..{count - 1})"
            )
    return dev


class FlushDenormals(L.Callback):
    """Sets `torch.set_flush_denormal` in every rank: `ppfr.fit` sets it in the launcher, but ranks that
    `ddp_spawn` starts begin without it, and subnormal activations slow x86 convolutions many times.
    The setting is per thread; `setup` runs before a spawned rank's thread pool starts, so the pool's
    threads inherit it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        torch.set_flush_denormal(self.enabled)
