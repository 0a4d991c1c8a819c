"""What every benchmark shares: the machine line and one timer for a shared, noisy machine."""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable

import torch

from ppfr.devices import apply_cpu_settings


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


def add_machine_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--keep-denormals",
        action="store_true",
        help="compute with subnormal floats (slow on x86 CPUs) instead of flushing them to zero, "
        "as ppfr.fit does by default (flush_denormal)",
    )
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc as it is instead of keeping freed memory for reuse, "
        "as ppfr.fit does by default (keep_freed_memory)",
    )
    ap.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its kernels and pick the fastest (trainer.benchmark=true)",
    )


def apply_machine_options(args: argparse.Namespace) -> str:
    """Apply the options before the thread pool starts (its threads inherit the denormal setting);
    returns them as a line for the output."""
    apply_cpu_settings(not args.keep_denormals, not args.default_malloc)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return (
        f"denormals {'kept' if args.keep_denormals else 'flushed'} | "
        f"malloc {'default' if args.default_malloc else 'keeps freed memory'}"
        + (" | cudnn.benchmark" if args.cudnn_benchmark else "")
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of `repeats` n x n float32 matmuls: the reference of what this
    machine's cores (or GPU) can do, against which a network's own GFLOP/s reads as a fraction."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = timed({"matmul": lambda: a @ b}, device, repeats)[0]["matmul"]
    return 2 * n**3 / best / 1e9


def flops(fn: Callable[[], object]) -> float:
    """Floating-point operations of one call of `fn`, as torch's FLOP counter sees its matmuls and
    convolutions (elementwise work is not counted). Compiled modules run eagerly for the count."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@functools.cache
def warm_up(device: torch.device) -> None:
    """Start what any first call would (CUDA context, cuBLAS and cuDNN handles) on shapes of their own,
    so a measured first call holds only what belongs to it: its own kernels and plans. Once per
    process and device: what it starts stays started."""
    x = torch.ones(2, 4, 8, 8, device=device, requires_grad=True)
    w = torch.ones(4, 1, 3, 3, device=device)
    y = torch.nn.functional.conv2d(x, w, groups=4).flatten(1)
    (y @ y.T).sum().backward()
    sync(device)


def timed(
    fns: dict[str, Callable[[], object]], device: torch.device, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Fastest of `repeats` calls of each function, and its first call, in seconds.

    The calls are interleaved round by round and the minimum is kept: on a shared machine that is
    the figure least disturbed by other processes, and a load change hits every function alike.
    The first call (round 0, not counted in the fastest) is kept apart: it pays what a process pays
    once per shape, such as cuDNN's plan setup (seconds for runtime-compiled kernels), in `fns` order.
    """
    warm_up(device)
    best, first = dict.fromkeys(fns, float("inf")), {}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds = time.perf_counter() - start
            if round_:
                best[name] = min(best[name], seconds)
            else:
                first[name] = seconds
    return best, first
