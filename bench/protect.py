"""Cost of the protection method per optimisation step, against the bare surrogate ensemble.

    python bench/protect.py --models-dir ../shared/models [--device cuda] [--batch-sizes 1 8 32] [--steps 5]

For each batch size and precision (fp32; bf16 autocast where the device supports it) it prints
ms per image per step of the full method (config default: configs/protect/lfsa.yaml, with its
ensemble), images/s of the whole method at the config's T, the bare ensemble forward+backward at
the same batch, their ratio (goal <= 1.2), the peak memory, and the step's own parts
(noise, entropy, input diversity, random draws) timed alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ppfr import recognizers
from ppfr.protect import create, parts

ROOT = Path(__file__).resolve().parents[1]


def machine(device: torch.device) -> str:
    text = f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        text += f" | {torch.cuda.get_device_name(device)}"
    return text


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` calls of each function, in seconds, after one warm-up call each.

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


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB RSS (process max)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--config", default=str(ROOT / "configs" / "protect" / "lfsa.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=5, help="optimisation steps per timed call (>= 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (the fastest counts)")
    ap.add_argument(
        "--threads", type=int, default=None, help="CPU threads; 1 on a shared CPU (busy OpenMP threads stall)"
    )
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(
            "--steps must be >= 2 (the per-step cost is the difference of a 1-step and a multi-step call)"
        )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = OmegaConf.to_container(OmegaConf.load(args.config))
    ensemble = recognizers.create_many(cfg["ensemble"], args.models_dir)
    full_steps = cfg["steps"]
    method = create({**cfg, "steps": args.steps}, ensemble).to(device)
    one_step = create({**cfg, "steps": 1}, ensemble).to(device)
    print(machine(device))
    print(f"config {args.config}: ensemble {cfg['ensemble']}, T={full_steps}, timed with {args.steps} steps")
    precisions = ["fp32"]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        precisions.append("bf16")

    for batch in args.batch_sizes:
        x = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(0)).to(device)
        seeds = torch.arange(batch, dtype=torch.int64)
        for precision in precisions:
            measure(method, one_step, x, seeds, precision, args.steps, args.repeats, full_steps)
        breakdown(method, x, seeds, device, args.repeats)


def measure(method, one_step, x, seeds, precision: str, steps: int, repeats: int, full_steps: int) -> None:
    """One line: the method's cost per step against the bare ensemble forward+backward.

    Per step = (t(steps) - t(1)) / (steps - 1): the once-per-call work (F, C, clean embeddings)
    cancels out.
    """
    device, batch = x.device, len(x)
    ensemble = list(method.recognizers)

    def amp():
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Targets of other (upside-down) images: at cos = 1 the gradients are ~0 and their denormals slow a CPU.
    with torch.no_grad(), amp():
        targets = [f(x.flip(-2)).float() for f in ensemble]

    def bare() -> None:
        xg = x.clone().requires_grad_(True)
        with amp():
            cos = [
                F.cosine_similarity(f(xg).float(), t, dim=1) for f, t in zip(ensemble, targets, strict=True)
            ]
        torch.autograd.grad(sum(cos).sum(), xg)

    def full(m) -> Callable[[], None]:
        def call() -> None:
            with amp():
                m(x, seeds)

        return call

    t = timed({"bare": bare, "full": full(method), "one": full(one_step)}, device, repeats)
    t_bare, t_full, t_one = t["bare"], t["full"], t["one"]
    per_step = (t_full - t_one) / (steps - 1)
    images_s = batch / (t_one + (full_steps - 1) * per_step)
    print(
        f"B={batch:<3} {precision}: method {1e3 * per_step / batch:8.2f} ms/img/step, "
        f"{images_s:8.3f} img/s at T={full_steps} | bare ensemble fwd+bwd {1e3 * t_bare / batch:8.2f} "
        f"ms/img | ratio {per_step / t_bare:5.2f} | peak {peak_memory(device)}",
        flush=True,
    )


def breakdown(method, x: torch.Tensor, seeds: torch.Tensor, device: torch.device, repeats: int) -> None:
    """The per-step extras of the method, timed alone at this batch (ms per step)."""
    b = len(x)
    gens = parts.generators(seeds, device)
    nz, ent, di = method.noise, method.entropy, method.boosters.input_diversity
    xg = x.clone().requires_grad_(True)
    draws = parts.uniform(gens, 4, device)
    items = {
        "draws": lambda: parts.uniform(gens, 4 + len(method.recognizers), device),
        "perlin": lambda: parts.perlin_noise(
            b, x.shape[-2:], gens, nz.octaves, nz.persistence, nz.lacunarity, nz.scale, device
        ),
        "entropy fwd+bwd": lambda: torch.autograd.grad(
            parts.histogram_entropy(xg, ent.bins, ent.bandwidth).sum(), xg
        ),
        "input diversity fwd+bwd": lambda: torch.autograd.grad(
            parts.input_diversity(xg, draws, di.prob, di.scale, di.shift).sum(), xg
        ),
    }
    line = ", ".join(f"{k} {1e3 * v:.2f}" for k, v in timed(items, device, repeats).items())
    print(f"        parts per step (ms, whole batch): {line}", flush=True)


if __name__ == "__main__":
    main()
