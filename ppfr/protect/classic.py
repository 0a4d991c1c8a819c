"""The classic obfuscations users expect as baselines: Gaussian blur, pixelation, additive noise.

Strengths are in pixels of the aligned crop (112 px for the ArcFace template), so they mean the
same whatever resolution the crops come in at.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from ppfr.errors import ConfigError
from ppfr.protect import parts
from ppfr.protect.base import METHODS, ProtectionMethod, check_batch


def _positive(value: float, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


@METHODS.register("blur")
class Blur(ProtectionMethod):
    """Gaussian blur with standard deviation ``sigma`` px; the kernel spans +-3 sigma (reflect padding)."""

    name = "blur"

    def __init__(self, sigma: float = 3.0) -> None:
        super().__init__()
        self.sigma = _positive(sigma, "protect.sigma")

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        # reflect padding needs kernel // 2 < H, W: wider kernels are clipped to the image
        kernel = min(2 * math.ceil(3 * self.sigma) + 1, 2 * min(x.shape[-2:]) - 1)
        return gaussian_blur(x, [kernel, kernel], [self.sigma, self.sigma])


@METHODS.register("pixelate")
class Pixelate(ProtectionMethod):
    """Mosaic of ``block`` x ``block`` px cells, each the mean of its pixels (edge cells may be smaller)."""

    name = "pixelate"

    def __init__(self, block: int = 8) -> None:
        super().__init__()
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ConfigError(f"protect.block: expected a positive integer (px), got {block!r}")
        self.block = block

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        h, w = x.shape[-2:]
        cells = F.avg_pool2d(x, self.block, ceil_mode=True)
        big = cells.repeat_interleave(self.block, dim=2).repeat_interleave(self.block, dim=3)
        return big[..., :h, :w]


@METHODS.register("noise")
class Noise(ProtectionMethod):
    """X + N(0, std^2) per pixel and channel, clipped to [0,1]; a fresh draw per seed."""

    name = "noise"
    stochastic = True

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = _positive(std, "protect.std")

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        gens = parts.generators(seeds, x.device)
        z = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in gens])
        return (x + self.std * z.to(x.dtype)).clamp(0, 1)
