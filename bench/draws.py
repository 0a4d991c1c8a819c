"""Cost of the method's per-image random draws: one generator per image against one vectorised hash.

    python bench/draws.py [--device cuda] [--batch 512] [--n 4700]

The method draws from one torch.Generator per image (so an image's noise does not depend on the
batch it is in): one kernel launch per image and draw. A counter-based hash of (seed, counter,
index) gives the same independence in a few launches for the whole batch. This times both for a
draw the size of one step's Perlin lattice (``--n``), to decide whether the launches matter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, timed  # noqa: E402

from ppfr.protect import parts  # noqa: E402


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


GOLDEN, MIX1, MIX2 = (_signed(v) for v in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser, in int64 arithmetic that wraps modulo 2^64."""
    x = (x ^ _shr(x, 30)) * MIX1
    x = (x ^ _shr(x, 27)) * MIX2
    return x ^ _shr(x, 31)


def hashed_uniform(seeds: torch.Tensor, counter: int, n: int) -> torch.Tensor:
    """B x n uniforms in [0, 1) from splitmix64(seed, counter, index): row b depends on seed b only."""
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    key = _mix(seeds * GOLDEN + 1)  # one stream per seed, then one counter per uniform in it
    x = _mix(key[:, None] + (counter * n + idx + 1)[None] * GOLDEN)
    return _shr(x, 40).float() * (1.0 / (1 << 24))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--n", type=int, default=4700, help="uniforms per image (a step's Perlin draw: ~4,700)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    seeds = torch.arange(args.batch, dtype=torch.int64)
    gens = parts.generators(seeds, device)
    seeds_dev = seeds.to(device)
    u = hashed_uniform(seeds_dev, 0, args.n)
    print(machine(device))
    print(
        f"hash check: mean {u.mean().item():.4f} (0.5), var {u.var().item():.4f} (0.0833), range {u.min().item():.4f}-{u.max().item():.4f}"
    )
    t, _ = timed(
        {
            "generators": lambda: parts.uniform(gens, args.n, device),
            "hash": lambda: hashed_uniform(seeds_dev, 1, args.n),
        },
        device,
        args.repeats,
    )
    print(
        f"batch {args.batch} x {args.n} uniforms: one generator per image {t['generators'] * 1e3:.2f} ms, "
        f"vectorised hash {t['hash'] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
