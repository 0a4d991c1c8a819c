"""One place for the machine: `recognizer.device` (auto | cpu | cuda | cuda:N) as a torch.device, and the
CPU settings every Trainer's ranks apply."""

from __future__ import annotations

import ctypes
import ctypes.util
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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse the memory the process frees instead of handing it back to the OS.

    By default glibc serves each block above its mmap threshold (128 KiB, rising to at most 32 MiB)
    with fresh pages and unmaps them on free, so every step's activations fault in again, zeroed by
    the kernel: a ReLU6 over a 51 MB tensor took 22-35 ms instead of 2.3 on a 2-core AMD EPYC. With
    mmap off and trimming above 2 GiB, freed blocks stay in the heap for the next step. Returns
    whether it applied (False where the C library is not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def apply_cpu_settings(flush_denormal: bool, reuse_memory: bool) -> None:
    """The config's `flush_denormal` and `keep_freed_memory`, for this process (and its thread pool
    when called before the pool starts)."""
    torch.set_flush_denormal(flush_denormal)
    if reuse_memory:
        keep_freed_memory()


class CpuSettings(L.Callback):
    """Applies `flush_denormal` and `keep_freed_memory` in every rank: `ppfr.fit` applies them in the
    launcher, but ranks that `ddp_spawn` starts begin without them, and subnormal activations slow
    x86 convolutions many times. The denormal setting is per thread; `setup` runs before a spawned
    rank's thread pool starts, so the pool's threads inherit it."""

    def __init__(self, flush_denormal: bool = True, keep_freed_memory: bool = True) -> None:
        self.flush_denormal, self.keep_freed_memory = flush_denormal, keep_freed_memory

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        apply_cpu_settings(self.flush_denormal, self.keep_freed_memory)
