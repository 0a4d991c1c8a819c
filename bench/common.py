"""What every benchmark shares: the machine line and one timer for a shared, noisy machine."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch


def machine(device: torch.device) -> str:
    """CPU model, core count, GPU (if any), torch version and the threads torch uses."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return (
        f"CPU {cpu} ({os.cpu_count()} cores) | GPU {gpu} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()}"
    )


def add_denormal_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--keep-denormals",
        action="store_true",
        help="compute with subnormal floats (slow on x86 CPUs) instead of flushing them to zero, "
        "as ppfr.fit does by default (flush_denormal)",
    )


def set_denormals(args: argparse.Namespace) -> str:
    """Apply --keep-denormals before the thread pool starts (its threads inherit the setting)."""
    torch.set_flush_denormal(not args.keep_denormals)
    return "denormals kept" if args.keep_denormals else "denormals flushed"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` calls of each function, in seconds, after one warm-up call each.

    The calls are interleaved round by round and the minimum is kept: on a shared machine that is
    the figure least disturbed by other processes, and a load change hits every function alike.
    """
    best = dict.fromkeys(fns, float("inf"))
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    return best
