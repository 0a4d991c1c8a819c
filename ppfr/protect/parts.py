"""The parts of LFSA (method.md): F detail extraction, C pruning + stochastic filling, P Perlin noise
and histogram entropy, and the transfer boosters. Each is a plain differentiable torch function,
vectorised over pixels; random draws come from one ``torch.Generator`` per batch item, so an item's
result depends only on its own seed and input.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from ppfr.errors import ConfigError, check_choice
from ppfr.template import ARCFACE_112


def _regions() -> dict[str, tuple[tuple[tuple[float, float], float], ...]]:
    """Region -> ((centre, extra half-width), ...) in 112-template pixels, from the ArcFace points.

    The mouth is one region centred between its corners and widened by half their distance, so
    ``radius`` means the same margin around every feature.
    """
    left, right, nose, mouth_l, mouth_r = (tuple(map(float, p)) for p in ARCFACE_112)
    mouth = ((mouth_l[0] + mouth_r[0]) / 2, (mouth_l[1] + mouth_r[1]) / 2)
    return {
        "eyes": ((left, 0.0), (right, 0.0)),
        "nose": ((nose, 0.0),),
        "mouth": ((mouth, (mouth_r[0] - mouth_l[0]) / 2),),
    }


REGIONS = _regions()
SHAPES = ("ellipse", "box")
RESCALES = ("minmax", "offset", "none")


STREAM_SALT = 0x5DEECE66D2B7E151  # 63-bit odd constant: stream k of seed s is seeded with s ^ (k * salt)


def generators(seeds: Tensor, device: torch.device | str, stream: int = 0) -> list[torch.Generator]:
    """One generator per item, seeded by that item's seed (int64).

    ``stream`` > 0 gives an independent stream of the same seed (``seed ^ stream * salt``), so an
    optional part (a transfer booster) can draw without shifting the draws of the others.
    """
    salt = (stream * STREAM_SALT) & ((1 << 63) - 1)
    return [torch.Generator(device=device).manual_seed(int(s) ^ salt) for s in seeds.tolist()]


def uniform(gens: Sequence[torch.Generator], n: int, device: torch.device | str) -> Tensor:
    """B x n uniforms in [0,1), row b from generator b: one draw call per item."""
    return torch.stack([torch.rand(n, generator=g, device=device) for g in gens])


def blur(x: Tensor, kernel: int) -> Tensor:
    """Gaussian blur with an odd ``kernel`` size and sigma = (kernel-1)/6, i.e. +-3 sigma per window.

    The reflect padding needs kernel // 2 < H, W: larger kernels are clipped to the image.
    """
    kernel = min(kernel | 1, 2 * min(x.shape[-2:]) - 1)
    return gaussian_blur(x, [kernel, kernel], [max((kernel - 1) / 6, 0.5)] * 2)


# ---------------------------------------------------------------- F: detail extraction


def highpass(x: Tensor, omega_c: float, rescale: str = "minmax", gain: float = 4.0) -> Tensor:
    """Keep frequencies with radius sqrt(u^2+v^2) > omega_c (cycles/pixel), eq. 2-3.

    The detail D is zero-mean (the DC term always goes). ``rescale`` maps it for display:
    ``minmax`` stretches each image to [0,1], ``offset`` gives clip(0.5 + gain*D), ``none`` returns D.
    Computed in float32: cuFFT half precision only takes powers of two.
    """
    check_choice("highpass.rescale", rescale, RESCALES)
    h, w = x.shape[-2:]
    u = torch.fft.fftfreq(h, device=x.device)
    v = torch.fft.rfftfreq(w, device=x.device)
    keep = (u[:, None] ** 2 + v[None, :] ** 2).sqrt() > omega_c
    d = torch.fft.irfft2(torch.fft.rfft2(x.float()) * keep, s=(h, w))
    if rescale == "none":
        return d
    if rescale == "offset":
        return (0.5 + gain * d).clamp(0, 1)
    lo = d.amin(dim=(1, 2, 3), keepdim=True)
    hi = d.amax(dim=(1, 2, 3), keepdim=True)
    return (d - lo) / (hi - lo).clamp_min(1e-8)


# ---------------------------------------------------------------- C: pruning and filling


def keep_mask(
    size: int | tuple[int, int],
    regions: Sequence[str] = ("eyes",),
    radius: float | Sequence[float] = (18.0, 13.0),
    shape: str = "ellipse",
    softness: float = 2.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """1 x 1 x H x W keep-mask M over template regions; 1 inside, 0 outside.

    ``radius`` (rx, ry) or r is in 112-template pixels and scales with ``size``; ``softness`` is the
    width in those pixels of a linear ramp across the border (0 = hard edge), which avoids a
    strong artificial edge at the seam.
    """
    regions = (regions,) if isinstance(regions, str) else tuple(regions)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown or not regions:
        raise ConfigError(
            f"prune.regions: {list(regions)} must be a non-empty subset of {', '.join(REGIONS)}"
        )
    check_choice("prune.shape", shape, SHAPES)
    rx, ry = (float(radius), float(radius)) if isinstance(radius, (int, float)) else map(float, radius)
    if rx <= 0 or ry <= 0:
        raise ConfigError(f"prune.radius: {radius} must be positive")
    h, w = (size, size) if isinstance(size, int) else size
    sy, sx = h / 112.0, w / 112.0
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / sy  # template units
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / sx
    mask = torch.zeros(h, w, device=device)
    for region in regions:
        for (cx, cy), extra in REGIONS[region]:
            ax, ay = rx + extra, ry
            dx = ((xs - cx) / ax)[None, :]
            dy = ((ys - cy) / ay)[:, None]
            dist = (dx**2 + dy**2).sqrt() if shape == "ellipse" else torch.maximum(dx.abs(), dy.abs())
            if softness > 0:  # signed distance ~ (1 - dist) * mean radius, ramp of width softness
                inside = ((1 - dist) * (ax + ay) / 2 / softness + 0.5).clamp(0, 1)
            else:
                inside = (dist <= 1).float()
            mask = torch.maximum(mask, inside)
    return mask[None, None]


def local_stats(x: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Per-channel local mean and standard deviation under a Gaussian window."""
    mean = blur(x, window)
    var = (blur(x * x, window) - mean * mean).clamp_min(0)
    return mean, var.sqrt()


def stochastic_fill(
    x: Tensor, mask: Tensor, kappa: float, window: int, gens: Sequence[torch.Generator]
) -> Tensor:
    """X0 = M*x + (1-M)*R with R ~ N(mu, kappa*sigma) (eq. 4), mu/sigma local stats of ``x``.

    Squashing: R is drawn in logit space, R = sigmoid(logit(mu) + kappa*sigma/(mu(1-mu)) * z),
    the delta-method match of N(mu, kappa*sigma). Its median is exactly mu, it behaves like the
    Gaussian for small kappa*sigma, and it stays inside (0,1) without clipping piles at 0 and 1.
    """
    mean, std = local_stats(x, window)
    z = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device) for g in gens])
    m = mean.clamp(1e-3, 1 - 1e-3)
    r = torch.sigmoid(torch.logit(m) + kappa * std / (m * (1 - m)) * z.to(x.dtype))
    return mask * x + (1 - mask) * r


# ---------------------------------------------------------------- P: noise and entropy


def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


@functools.lru_cache(maxsize=16)
def _lattice(
    h: int, w: int, octaves: int, persistence: float, lacunarity: float, scale: float, device: torch.device
) -> tuple[int, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The constant tensors of ``perlin_noise`` for one size, made once per device (no copy per call)."""
    periods = [scale / lacunarity**k for k in range(octaves)]
    grids = [(math.ceil(h / p) + 2, math.ceil(w / p) + 2) for p in periods]
    counts = [gh * gw for gh, gw in grids]

    def per_octave(values: list[float], dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.tensor(values, dtype=dtype).view(1, octaves, 1).to(device)

    period = per_octave(periods)
    base = per_octave([sum(counts[:k]) for k in range(octaves)], torch.long)[..., None, None]
    width = per_octave([gw for _, gw in grids], torch.long)[..., None, None]
    rows = torch.arange(h, device=device) / period  # 1 x K x H, lattice units
    cols = torch.arange(w, device=device) / period  # 1 x K x W
    corner_y = torch.tensor([0, 0, 1, 1]).view(1, 1, 4, 1, 1).to(device)  # the four cell corners
    corner_x = torch.tensor([0, 1, 0, 1]).view(1, 1, 4, 1, 1).to(device)
    amp = per_octave([persistence**k for k in range(octaves)])[..., None]
    return sum(counts), base, width, rows, cols, corner_y, corner_x, amp


def perlin_noise(
    batch: int,
    size: int | tuple[int, int],
    gens: Sequence[torch.Generator],
    octaves: int = 4,
    persistence: float = 0.5,
    lacunarity: float = 2.0,
    scale: float = 16.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """B x 1 x H x W multi-scale gradient noise N' (eq. 5-6), normalised to [0,1] per image.

    Octave k has lattice period scale/lacunarity^k pixels and weight persistence^k. Each lattice
    point gets a random unit gradient, each octave a random sub-cell offset (so lattice points,
    where gradient noise is 0, do not sit at the same pixels every draw). Every call draws afresh
    from the generators: the temporal seed of the paper. All octaves and the four cell corners
    are computed in one gather, which keeps the kernel count small on a GPU; the constants are
    cached per device, so a call makes no host-device copy and no synchronisation.
    """
    if len(gens) != batch:
        raise ValueError(f"perlin_noise: {len(gens)} generators for a batch of {batch}")
    h, w = (size, size) if isinstance(size, int) else size
    total, base, width, rows, cols, cy, cx, amp = _lattice(
        h, w, octaves, float(persistence), float(lacunarity), float(scale), torch.device(device)
    )
    draws = uniform(gens, total + 2 * octaves, device)  # one call per item
    angles = draws[:, :total] * (2 * math.pi)  # B x (all lattice points of all octaves)
    offsets = draws[:, total:].view(batch, octaves, 2, 1)
    py = rows + offsets[:, :, 0]  # B x K x H, lattice units
    px = cols + offsets[:, :, 1]  # B x K x W
    fy, fx = py.frac()[:, :, None, :, None], px.frac()[:, :, None, None, :]
    iy, ix = py.long()[:, :, None, :, None], px.long()[:, :, None, None, :]
    idx = base + (iy + cy) * width + (ix + cx)  # B x K x 4 x H x W
    flat = idx.view(batch, -1)
    hx = angles.cos().gather(1, flat).view(idx.shape)  # the corners' unit gradients
    hy = angles.sin().gather(1, flat).view(idx.shape)
    dot = hx * (fx - cx) + hy * (fy - cy)  # gradient . offset from the corner
    wy, wx = _fade(fy), _fade(fx)
    weight = torch.where(cy == 1, wy, 1 - wy) * torch.where(cx == 1, wx, 1 - wx)
    noise = ((dot * weight).sum(2) * amp).sum(1)  # B x H x W
    lo = noise.amin(dim=(1, 2), keepdim=True)
    hi = noise.amax(dim=(1, 2), keepdim=True)
    return ((noise - lo) / (hi - lo).clamp_min(1e-8))[:, None]


def histogram_entropy(x: Tensor, bins: int = 64, bandwidth: float = 1.0) -> Tensor:
    """Differentiable Shannon entropy of each channel's pixel histogram, averaged over channels (eq. 8).

    Soft binning with a triangular kernel of half-width ``bandwidth`` bins (1 = linear
    interpolation between the two nearest bins), done by scatter-add over the few bins each pixel
    touches: O(pixels), not O(pixels x bins). Returns B entropies divided by log(bins), so in
    [0,1] and comparable with the cosine terms whatever the bin count.
    """
    b, c = x.shape[:2]
    pos = x.float().reshape(b * c, -1).clamp(0, 1) * bins - 0.5  # bin centres at integers
    first = torch.floor(pos - bandwidth) + 1
    hist = x.new_zeros(b * c, bins, dtype=torch.float32)
    for j in range(math.ceil(2 * bandwidth)):
        centre = first + j
        weight = (1 - (pos - centre).abs() / bandwidth).clamp_min(0)
        hist = hist.scatter_add(1, centre.long().clamp(0, bins - 1), weight)
    p = hist / hist.sum(1, keepdim=True)
    h = -(p * (p + 1e-12).log()).sum(1) / math.log(bins)
    return h.view(b, c).mean(1)


# ---------------------------------------------------------------- boosters


def input_diversity(
    x: Tensor,
    draws: Tensor,
    prob: float,
    scale: float,
    shift: float,
    rotate: float = 0.0,
    resample: float = 1.0,
    mirror: bool = False,
) -> Tensor:
    """A random view of each item: rescale by up to +-``scale``, shift by up to +-``shift`` of the
    image, rotate by up to +-``rotate`` degrees, after a down- and up-sampling to a random factor
    in [``resample``, 1] of the size (1 = none); with ``mirror``, flipped left to right as well.

    ``draws`` is B x 4 uniforms (apply?, scale, shift x, shift y), plus a 5th (angle) and a 6th
    (resample factor); those two are read only when used. Differentiable (affine_grid /
    grid_sample, bilinear, border padding), batched with a factor per item and free of host
    synchronisation: the down-sampling is a warp that shrinks the image by the factor (so it spans
    factor x H pixels), the up-sampling a warp that enlarges it back, folded into the jitter.
    """
    apply = (draws[:, 0] < prob).to(x.dtype)
    zoom = 1 + scale * (2 * draws[:, 1] - 1) * apply
    move = 2 * shift * (2 * draws[:, 2:4] - 1) * apply[:, None]  # normalised coords span 2
    angle = math.radians(rotate) * (2 * draws[:, 4] - 1) * apply if rotate > 0 else torch.zeros_like(zoom)
    cos, sin = angle.cos() / zoom, angle.sin() / zoom
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    if mirror:  # the output's x runs the other way: a left-right flip folded into the same warp
        theta = torch.cat([-theta[:, :, :1], theta[:, :, 1:]], 2)
    if resample < 1:
        factor = 1 - (1 - resample) * draws[:, 5] * apply  # in [resample, 1]
        shrink = torch.zeros_like(theta)
        shrink[:, 0, 0] = shrink[:, 1, 1] = 1 / factor
        x = _warp(x, shrink)
        theta = theta * factor[:, None, None]
    return _warp(x, theta)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def conv_layers(network: torch.nn.Module, positions: Sequence[float]) -> list[torch.nn.Module]:
    """The Conv2d modules of ``network`` at relative depths ``positions`` (0 = first, 1 = last), in
    registration order, which is forward order for the zoo's converted and native networks."""
    convs = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise ConfigError(f"{type(network).__name__} has no Conv2d layer to apply feature dropout to")
    chosen = sorted({round(float(p) * (len(convs) - 1)) for p in positions})
    return [convs[i] for i in chosen]


@contextmanager
def feature_dropout(
    layers: Sequence[torch.nn.Module], rate: float, gens: Sequence[torch.Generator]
) -> Iterator[None]:
    """While active, each of ``layers`` drops its output elements with probability ``rate``
    (scaled by 1/(1-rate)); item b's masks come from ``gens[b]``. A batch of k x B rows (k views
    stacked view after view) gets k masks per item."""

    def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        views = out.shape[0] // len(gens)
        shape = (views, *out.shape[1:])
        u = torch.stack([torch.rand(shape, generator=g, device=out.device) for g in gens], 1)
        return out * (u.flatten(0, 1) >= rate).to(out.dtype) / (1 - rate)

    with forward_hooks(layers if rate > 0 else [], hook):
        yield


@contextmanager
def forward_hooks(layers: Sequence[torch.nn.Module], hook: Callable) -> Iterator[None]:
    """``hook`` on the forward of each of ``layers`` while active, removed after (errors included)."""
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


ACTIVATIONS = (torch.nn.ReLU, torch.nn.Hardtanh, torch.nn.PReLU, torch.nn.LeakyReLU)  # ReLU6 is a Hardtanh


def activations(network: torch.nn.Module, start: float) -> list[torch.nn.Module]:
    """The activation modules of ``network`` from relative depth ``start`` (0 = first, 1 = last) on,
    in registration order, which is forward order for the zoo's native networks."""
    acts = [m for m in network.modules() if isinstance(m, ACTIVATIONS)]
    if not acts:
        raise ConfigError(
            f"{type(network).__name__} has no activation module ({', '.join(a.__name__ for a in ACTIVATIONS)}) "
            "for protect.boosters.linear_backward"
        )
    return acts[round(float(start) * (len(acts) - 1)) :]


@contextmanager
def linear_backward(layers: Sequence[torch.nn.Module]) -> Iterator[None]:
    """While active, each of ``layers`` keeps its output but passes the gradient to its input
    unchanged, as if it were linear (LinBP, Guo et al., NeurIPS 2020, who found such gradients to
    transfer better on ImageNet; on the zoo's face models it breaks the ascent: docs/transfer.md)."""

    def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        return inputs[0] + (out - inputs[0]).detach()

    with forward_hooks(layers, hook):
        yield


def model_dropout(draws: Tensor, q: float) -> Tensor:
    """B x n keep weights in {0,1}: each surrogate dropped with prob q, at least one kept per item."""
    keep = draws >= q
    best = draws.argmax(1, keepdim=True)  # the surrogate least likely to be dropped stays
    return keep.scatter(1, best, True).float()
