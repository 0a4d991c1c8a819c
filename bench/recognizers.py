"""Throughput of the recognizer zoo: inference images/s and forward+backward time (input gradients).

    python bench/recognizers.py --models-dir ../shared/models [--device cuda] [--names a b ...]

Inputs are random 112x112 crops: speed does not depend on content. Forward+backward is what the
protection method pays per step and surrogate: gradients w.r.t. the input only (weights frozen).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from ppfr import recognizers


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return f"CPU {cpu} | GPU {gpu} | torch {torch.__version__} | threads {torch.get_num_threads()}"


def timed(fn, device: torch.device, iterations: int) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-dir", default="../shared/models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--names", nargs="+", default=["all"], help="recognizer names (default: all ONNX models)"
    )
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(machine(device))
    names = "all" if args.names == ["all"] else args.names
    print(f"{'recognizer':<26}{'img/s b32':>11}{'img/s b64':>11}{'fwd+bwd ms b32':>16}")
    for rec in recognizers.create_many(names, args.models_dir):
        rec.to(device)
        speeds = []
        for batch in (32, 64):
            x = torch.rand(batch, 3, 112, 112, device=device)
            with torch.no_grad():
                speeds.append(batch / timed(lambda x=x, rec=rec: rec(x), device, args.iterations))
        x = torch.rand(32, 3, 112, 112, device=device, requires_grad=True)

        def step(x=x, rec=rec) -> None:
            x.grad = None
            rec(x).sum().backward()

        ms = 1000 * timed(step, device, args.iterations)
        print(f"{rec.name:<26}{speeds[0]:>11.1f}{speeds[1]:>11.1f}{ms:>16.1f}", flush=True)
        rec.cpu()


if __name__ == "__main__":
    main()
