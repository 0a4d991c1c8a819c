"""One place that turns `recognizer.device` (auto | cpu | cuda | cuda:N) into a torch.device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
