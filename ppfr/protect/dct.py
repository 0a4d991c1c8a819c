"""The frequency representation PartialFace and DuetFace share (Tencent/TFace, reference.md 1.1).

x in [0,1] -> bilinear x8 upsample (align_corners=True, as TFace) -> x255 -> YCbCr (JPEG / BT.601
full range) -> -128 -> orthonormal 8x8 block DCT-II -> B x 192 x H x W, channel = colour*64 + 8*row
+ col of the 8x8 basis (row = vertical frequency). Pure torch (unfold, one 64x64 matrix, fold)
instead of torchjpeg, so there is no compiled dependency.

The inverse (``to_image``) undoes each step exactly up to the upsampled image; ``from_dct`` then
downsamples x1/8 bilinearly (align_corners=True) as TFace does. That pair is exact only on images
that are affine between pixel centres (a ramp); on LFW faces it is off by 6e-4 mean abs, 0.012 max.

At x8 bilinear upsampling every 8x8 block is nearly a bilinear patch, so the basis functions with
row + col >= 4 hold ~1e-6 of a face's energy (measured on LFW): an inverse DCT of the mid/high
channels alone (PartialFace, DuetFace) deviates from grey by < 0.01, i.e. a flat 128 PNG.
``from_dct(..., stretch=True)`` stretches each image to [0,1] to show what it holds (edges).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ppfr.errors import DataError, check_choice
from ppfr.protect.base import ProtectionMethod

BLOCK = 8
UPSAMPLE = 8
COLOURS = 3
BASIS = BLOCK * BLOCK  # 64 coefficients per block and colour
CHANNELS = COLOURS * BASIS  # 192

_RGB_TO_YCBCR = (
    (0.299, 0.587, 0.114),
    (-0.168736, -0.331264, 0.5),
    (0.5, -0.418688, -0.081312),
)
_OFFSET = (0.0, 128.0, 128.0)


def channels(per_colour: Sequence[int]) -> list[int]:
    """The 192-channel indices of the basis functions ``per_colour`` (0..63) in Y, Cb and Cr."""
    return [c * BASIS + k for c in range(COLOURS) for k in per_colour]


@functools.cache
def _constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(kron(D, D) acting on row-major 8x8 blocks, RGB->YCbCr matrix, its inverse)."""
    k = torch.arange(BLOCK, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * BLOCK)) * math.sqrt(2 / BLOCK)
    d[0] /= math.sqrt(2)
    to_ycbcr = torch.tensor(_RGB_TO_YCBCR, dtype=torch.float64)
    out = torch.kron(d, d), to_ycbcr, torch.linalg.inv(to_ycbcr)
    return tuple(t.to(device=device, dtype=dtype) for t in out)  # type: ignore[return-value]


@functools.cache
def _resampling(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(8n x n bilinear x8 upsample, n x 8n bilinear x1/8 downsample), both align_corners=True.

    Built as float64 matrices: torch's float32 bilinear kernel has ~1e-5 coordinate rounding.
    """
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, 1, n)
    up = F.interpolate(eye, size=(1, UPSAMPLE * n), mode="bilinear", align_corners=True).view(n, -1).T
    eye = torch.eye(UPSAMPLE * n, dtype=torch.float64).view(UPSAMPLE * n, 1, 1, -1)
    down = F.interpolate(eye, size=(1, n), mode="bilinear", align_corners=True).view(-1, n).T
    return up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)


def upsample(x: Tensor) -> Tensor:
    """B x C x H x W -> B x C x 8H x 8W, bilinear (align_corners=True)."""
    h, w = x.shape[-2:]
    return _resampling(h, x.device, x.dtype)[0] @ x @ _resampling(w, x.device, x.dtype)[0].T


def downsample(x: Tensor) -> Tensor:
    """B x C x 8h x 8w -> B x C x h x w, bilinear (align_corners=True): exact inverse of ``upsample``
    only on images affine between pixel centres."""
    h, w = x.shape[-2] // UPSAMPLE, x.shape[-1] // UPSAMPLE
    return _resampling(h, x.device, x.dtype)[1] @ x @ _resampling(w, x.device, x.dtype)[1].T


def block_dct(x: Tensor) -> Tensor:
    """B x C x H x W (multiples of 8) -> B x C*64 x H/8 x W/8 orthonormal 8x8 block DCT-II."""
    b, c, h, w = x.shape
    if h % BLOCK or w % BLOCK:
        raise DataError(f"block_dct: height and width must be multiples of {BLOCK}, got {h} x {w}")
    kron = _constants(x.device, x.dtype)[0]
    blocks = F.unfold(x.reshape(b * c, 1, h, w), BLOCK, stride=BLOCK)  # (b*c) x 64 x blocks
    return (kron @ blocks).view(b, c * BASIS, h // BLOCK, w // BLOCK)


def block_idct(coef: Tensor) -> Tensor:
    """Inverse of ``block_dct``: B x C*64 x h x w -> B x C x 8h x 8w."""
    b, n, h, w = coef.shape
    if n % BASIS:
        raise DataError(f"block_idct: expected a multiple of {BASIS} channels, got {n}")
    kron = _constants(coef.device, coef.dtype)[0]
    blocks = kron.T @ coef.reshape(b * n // BASIS, BASIS, h * w)
    size = (h * BLOCK, w * BLOCK)
    return F.fold(blocks, size, BLOCK, stride=BLOCK).view(b, n // BASIS, *size)


def to_dct(x: Tensor) -> Tensor:
    """Aligned faces B x 3 x H x W in [0,1] -> B x 192 x H x W DCT coefficients (float32)."""
    if x.ndim != 4 or x.shape[1] != COLOURS:
        raise DataError(f"to_dct: expected a B x 3 x H x W image batch, got shape {tuple(x.shape)}")
    rgb = upsample(x.float()) * 255
    _, to_ycbcr, _ = _constants(rgb.device, rgb.dtype)
    offset = torch.tensor(_OFFSET, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return block_dct(torch.einsum("ij,bjhw->bihw", to_ycbcr, rgb) + offset - 128)


def to_image(coef: Tensor) -> Tensor:
    """B x 192 x h x w coefficients -> the upsampled RGB image B x 3 x 8h x 8w (exact inverse, no clamp)."""
    if coef.ndim != 4 or coef.shape[1] != CHANNELS:
        raise DataError(f"from_dct: expected B x {CHANNELS} x h x w coefficients, got {tuple(coef.shape)}")
    ycbcr = block_idct(coef.float()) + 128
    _, _, to_rgb = _constants(ycbcr.device, ycbcr.dtype)
    offset = torch.tensor(_OFFSET, device=ycbcr.device, dtype=ycbcr.dtype).view(1, 3, 1, 1)
    return torch.einsum("ij,bjhw->bihw", to_rgb, ycbcr - offset) / 255


def from_dct(coef: Tensor, stretch: bool = False) -> Tensor:
    """B x 192 x h x w coefficients (pruned ones zero) -> B x 3 x h x w image in [0,1].

    ``stretch`` maps each image's range to [0,1] instead of clamping (see the module note).
    """
    x = downsample(to_image(coef))
    if not stretch:
        return x.clamp(0, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def zero_filled(coef: Tensor, index: Tensor) -> Tensor:
    """The 192-channel tensor holding ``coef`` (B x K x h x w) at channels ``index`` (B x K), zeros elsewhere."""
    b, _, h, w = coef.shape
    full = coef.new_zeros(b, CHANNELS, h, w)
    return full.scatter(1, index[:, :, None, None].expand(-1, -1, h, w), coef)


def select(coef: Tensor, index: Tensor) -> Tensor:
    """Channels ``index`` (B x K, per item) of B x 192 x h x w coefficients -> B x K x h x w."""
    h, w = coef.shape[-2:]
    return coef.gather(1, index[:, :, None, None].expand(-1, -1, h, w))


VISIBLE = ("stretched", "raw")
ATTACKER_INPUTS = ("channels", "image")


class FrequencyMethod(ProtectionMethod):
    """What PartialFace and DuetFace share: the visible image is the inverse DCT of the channels they
    keep, stretched to [0,1] per image (``visible: stretched``) or clamped as TFace does (``raw``:
    near-flat grey, see above); the attacker gets those channels (``attacker_input: channels``,
    faithful) or that image (``image``)."""

    def __init__(self, visible: str, attacker_input: str, kept_channels: int) -> None:
        super().__init__()
        check_choice("protect.visible", visible, VISIBLE)
        check_choice("protect.attacker_input", attacker_input, ATTACKER_INPUTS)
        self.stretch = visible == "stretched"
        self.attacker_view = attacker_input
        self.attacker_channels = 3 if attacker_input == "image" else kept_channels

    def attacker_input(self, x: Tensor, seeds: Tensor) -> Tensor:
        return self(x, seeds) if self.attacker_view == "image" else self.represent(x, seeds)
