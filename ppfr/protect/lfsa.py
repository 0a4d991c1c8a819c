"""LFSA: local features + stochastic anonymization (the seed paper, read as in docs/method.md).

X0 = C(F(X)): high-pass detail with everything but the eyes replaced by local-statistics noise.
Then T steps of momentum ascent (eq. 9) on L = sum_i beta_i cos(f_i(X), f_i(X_t)) + gamma H(X_t),
each step modulated by fresh multi-scale Perlin noise N'_t, so X -> X' is not a function.

Transfer boosters (``boosters``, all off in the paper preset) make the ascent less particular to
the surrogates; they use only the surrogates, never a held-out model. Their random draws come
from a second generator per item, so switching one on leaves every other draw unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppfr.errors import ConfigError, check_choice
from ppfr.protect import parts
from ppfr.protect.base import METHODS, ProtectionMethod, check_batch, part

MODES = ("modulate", "add", "both")
UPDATES = ("raw", "sign")
NEGATIVES = ("nearest", "spread")
MAX_RADIUS = 0.5 * math.sqrt(2)  # the highest frequency radius of an image, cycles/pixel


@dataclass(frozen=True)
class Highpass:
    """Step F. omega_c in cycles/pixel (0 ... 0.707)."""

    enabled: bool = True
    omega_c: float = 0.04
    rescale: str = "minmax"
    gain: float = 4.0


@dataclass(frozen=True)
class Prune:
    """Step C. radius in 112-template pixels; window = Gaussian kernel size of the local statistics."""

    enabled: bool = True
    regions: tuple[str, ...] = ("eyes",)
    radius: tuple[float, float] = (18.0, 13.0)
    shape: str = "ellipse"
    softness: float = 2.0
    kappa: float = 1.0
    window: int = 31


@dataclass(frozen=True)
class Noise:
    """Step P's noise. amplitude scales the additive noise of modes add/both: amplitude*(2N'-1)."""

    enabled: bool = True
    mode: str = "modulate"
    octaves: int = 4
    persistence: float = 0.5
    lacunarity: float = 2.0
    scale: float = 16.0
    amplitude: float = 0.02


@dataclass(frozen=True)
class Entropy:
    bins: int = 64
    bandwidth: float = 1.0


@dataclass(frozen=True)
class InputDiversity:
    enabled: bool = False
    prob: float = 1.0
    scale: float = 0.1
    shift: float = 0.1


@dataclass(frozen=True)
class FeatureDropout:
    """Dropout on chosen convolution outputs of every surrogate (rate 0 = off)."""

    rate: float = 0.0
    layers: tuple[float, ...] = (0.5,)  # relative depths among each surrogate's Conv2d layers


@dataclass(frozen=True)
class LinearBackward:
    """LinBP: activations from relative depth ``start`` on pass the gradient through unchanged."""

    enabled: bool = False
    start: float = 0.5  # relative depth among each surrogate's activations (0 = first, 1 = last)


@dataclass(frozen=True)
class Views:
    """The loss of each step averaged over k random views (k 0 = off; then input_diversity applies)."""

    k: int = 0
    scale: float = 0.1
    shift: float = 0.1
    rotate: float = 0.0  # degrees
    resample: float = 1.0  # lowest down-sampling factor (1 = none)
    mirror: bool = False  # every second view flipped left to right, as verification embeds the mirror too


@dataclass(frozen=True)
class VarianceTuning:
    """VMI: the previous step's gradient variance over n random neighbours is added (n 0 = off)."""

    n: int = 0
    radius: float = 0.05  # neighbours uniform in +-radius per pixel


@dataclass(frozen=True)
class Margin:
    """Surrogate weights beta_i * softmin over margins cos_i - threshold_i; no pull past stop_margin."""

    enabled: bool = False
    temperature: float = 0.05
    stop_margin: float = 0.1


@dataclass(frozen=True)
class Lowres:
    """An additive component optimised at size x size and up-sampled (size 0 = off)."""

    size: int = 0
    weight: float = 1.0  # its step relative to the image's


@dataclass(frozen=True)
class Negatives:
    """Push each face away from other people, the first ``identities`` people of ``root`` (the task
    embeds them once; weight 0 = off). ``penalty`` "nearest": minus ``weight`` x the smooth maximum
    (logsumexp at ``temperature``) of its cosine to the reference faces. "spread": minus ``weight``
    x how far the mean squared cosine to them exceeds the clean face's (ratio - 1, zero at or below
    it): a protected face whose scores against other people spread wider than the clean face's
    passes more of them at a threshold in the tail."""

    weight: float = 0.0
    penalty: str = "nearest"
    temperature: float = 0.05
    root: str | None = None  # read by the task (null: the attackers' training people)
    identities: int = 256


@dataclass(frozen=True)
class Whiten:
    """Compare embeddings where other people vary least: each surrogate's cos is taken after
    (e - strength mu) A, A = (strength Sigma / mean variance + (1 - strength) I)^(-1/2), with mu
    and Sigma the mean and covariance of its embeddings of the reference faces (the first
    ``identities`` people of ``root``, as for ``negatives``). strength 0 = off (plain cos), 1 =
    full whitening, which weights up to 1000x the directions no reference face uses (eigenvalues
    floored at 1e-6): keep it below 1. The directions along which people differ most (pose, age,
    gender...) carry over to black boxes as likeness to other people; whitening weights the ascent
    toward the rest of the identity."""

    strength: float = 0.0
    root: str | None = None  # read by the task (null: the attackers' training people)
    identities: int = 256


@dataclass(frozen=True)
class Boosters:
    """Transfer boosters beyond the paper; all off = eq. 9 as written."""

    input_diversity: InputDiversity = field(default_factory=InputDiversity)
    ti_kernel: int = 0
    model_dropout: float = 0.0
    feature_dropout: FeatureDropout = field(default_factory=FeatureDropout)
    linear_backward: LinearBackward = field(default_factory=LinearBackward)
    views: Views = field(default_factory=Views)
    variance_tuning: VarianceTuning = field(default_factory=VarianceTuning)
    margin: Margin = field(default_factory=Margin)
    lowres: Lowres = field(default_factory=Lowres)
    negatives: Negatives = field(default_factory=Negatives)
    whiten: Whiten = field(default_factory=Whiten)


def in_range(key: str, value: Any, interval: str) -> None:
    """A ConfigError naming ``protect.<key>`` unless ``value`` is a number in ``interval``.

    ``interval`` reads like maths: "(0, 1]", "[0, inf)", or "int [1, inf)" for an integer.
    """
    integer = interval.startswith("int ")
    body = interval.removeprefix("int ")
    low, high = (float(v) for v in body[1:-1].split(","))
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if body[0] == "(" else value >= low)
    ok = ok and (value < high if body[-1] == ")" else value <= high)
    if not ok:
        raise ConfigError(
            f"protect.{key}: {value!r} must be {'an integer' if integer else 'a number'} in {body}"
        )


def whitening(ref: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """(strength mu, A) of the whiten booster from M x d reference embeddings (see ``Whiten``)."""
    ref = F.normalize(ref.double(), dim=1)
    mean = ref.mean(0)
    cov = torch.cov(ref.T, correction=0).reshape(ref.shape[1], ref.shape[1])
    cov = strength * cov / cov.diagonal().mean().clamp_min(1e-12) + (1 - strength) * torch.eye(
        len(cov), dtype=cov.dtype
    )
    values, vectors = torch.linalg.eigh(cov)
    matrix = vectors @ torch.diag(values.clamp_min(1e-6).rsqrt()) @ vectors.T
    return (strength * mean).float(), matrix.float()


def ssim(a: Tensor, b: Tensor, size: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM of two [0,1] batches as the evaluation measures it (torchmetrics: Gaussian
    window 11, sigma 1.5, reflected borders), with a separable window: torchmetrics' one 2-D grouped
    convolution took 170 ms for 16 images on a 2-core CPU, more than half a protection step."""
    c, pad = a.shape[1], (size - 1) // 2
    g = torch.exp(-0.5 * ((torch.arange(size, device=a.device) - pad) / sigma) ** 2)
    g = (g / g.sum()).to(torch.float32)
    a, b = (F.pad(v.float(), (pad,) * 4, mode="reflect") for v in (a, b))
    x = torch.cat([a, b, a * a, b * b, a * b], 1)
    x = F.conv2d(x, g.view(1, 1, 1, size).expand(5 * c, 1, 1, size), groups=5 * c)
    x = F.conv2d(x, g.view(1, 1, size, 1).expand(5 * c, 1, size, 1), groups=5 * c)
    mu_a, mu_b, aa, bb, ab = x.split(c, 1)
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_a * mu_b + c1) * (2 * (ab - mu_a * mu_b) + c2)
    den = (mu_a**2 + mu_b**2 + c1) * ((aa - mu_a**2).clamp_min(0) + (bb - mu_b**2).clamp_min(0) + c2)
    return (num / den).flatten(1).mean(1)


def pick(v: Tensor, rows: Tensor | None) -> Tensor:
    """The ``rows`` of ``v`` (all of it when None)."""
    return v if rows is None else v[rows]


def put(v: Tensor, rows: Tensor | None, new: Tensor) -> Tensor:
    """``v`` with its ``rows`` replaced by ``new`` (``new`` itself when rows is None)."""
    return new if rows is None else v.index_copy(0, rows, new)


def hold(done: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    """``new``, except the images marked ``done``, which keep ``old``."""
    return new if done is None else torch.where(done.view(-1, *[1] * (new.ndim - 1)), old, new)


@METHODS.register("lfsa")
class LFSA(ProtectionMethod):
    """The method; ``recognizers`` are the frozen surrogates (B x 3 x 112 x 112 [0,1] -> unit embeddings).

    Defaults are configs/protect/paper.yaml (boosters off). ``sign_step`` is the step of
    ``update=sign`` in pixel units (``alpha`` scales the normalised raw gradient instead).
    ``thresholds`` (one per surrogate, from the calibration file) feed the margin booster;
    ``negatives`` (one M x d matrix per surrogate: its embeddings of reference faces) the
    negatives booster, ``whiten`` (the same, of the whiten booster's reference faces) that one.
    ``stop_ssim`` > 0 is a visual budget: an image stops moving at the first step where
    SSIM(X_t, X) <= stop_ssim, so each takes only the steps it needs (at most ``steps``).
    ``monitors`` are recognizers outside the ensemble (black boxes) whose cos(f(X), f(X_t)) is
    logged every ``monitor_every`` steps and at the last, with each surrogate's on the same plain
    image; outputs only, without gradients: they never change the result.

    After each ``forward``, ``last_history`` holds per step t = 0..T-1 the batch-mean ``loss``,
    ``cos`` (the beta-weighted surrogate mean), ``entropy``, ``cos/<surrogate>`` (as the loss sees
    it: through the views and dropout), ``moving`` (the share of images still short of the SSIM
    budget; a stopped image counts with its last values) and, with monitors,
    ``monitor/<surrogate or monitor>`` (nan at the steps not watched). It is collected on the
    device and read back once per call.
    """

    name = "lfsa"
    stochastic = True

    def __init__(
        self,
        recognizers: Sequence[nn.Module],
        betas: Sequence[float] | None = None,
        highpass: Mapping | Highpass | None = None,
        prune: Mapping | Prune | None = None,
        noise: Mapping | Noise | None = None,
        gamma: float = 5.0,
        entropy: Mapping | Entropy | None = None,
        alpha: float = 1.0,
        sign_step: float = 0.004,
        mu: float = 0.9,
        p: int = 2,
        steps: int = 100,
        stop_ssim: float = 0.0,
        update: str = "raw",
        boosters: Mapping | Boosters | None = None,
        thresholds: Sequence[float] | None = None,
        negatives: Sequence[Tensor] | None = None,
        whiten: Sequence[Tensor] | None = None,
        monitors: Sequence[nn.Module] | None = None,
        monitor_every: int = 10,
    ) -> None:
        super().__init__()
        if not recognizers:
            raise ConfigError("protect.ensemble: LFSA needs at least one surrogate recognizer")
        self.recognizers = nn.ModuleList(recognizers).eval().requires_grad_(False)
        self.monitors = nn.ModuleList(monitors or []).eval().requires_grad_(False)
        n = len(recognizers)
        betas = [1.0 / n] * n if betas is None else list(betas)
        if len(betas) != n:
            raise ConfigError(f"protect.betas: {len(betas)} weights for {n} surrogates")
        for b in betas:
            in_range("betas", b, "[0, inf)")
        if thresholds is not None and len(thresholds) != n:
            raise ConfigError(f"protect thresholds: {len(thresholds)} thresholds for {n} surrogates")
        for t in thresholds or []:
            in_range("thresholds", t, "[-1, 1]")
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "thresholds", None if thresholds is None else torch.tensor(thresholds), persistent=False
        )
        if negatives is not None and len(negatives) != n:
            raise ConfigError(f"protect negatives: {len(negatives)} reference sets for {n} surrogates")
        self._n_negatives = len(negatives or [])
        for i, ref in enumerate(negatives or []):
            self.register_buffer(f"negatives_{i}", F.normalize(ref.float(), dim=1), persistent=False)
        if whiten is not None and len(whiten) != n:
            raise ConfigError(f"protect whiten: {len(whiten)} reference sets for {n} surrogates")
        self._n_whiten = len(whiten or [])
        self.highpass = part(Highpass, highpass, "protect.highpass")
        self.prune = part(Prune, prune, "protect.prune")
        self.noise = part(Noise, noise, "protect.noise")
        self.entropy = part(Entropy, entropy, "protect.entropy")
        self.boosters = part(Boosters, boosters, "protect.boosters")
        self.gamma, self.alpha, self.sign_step, self.mu = gamma, alpha, sign_step, mu
        self.p, self.steps, self.update, self.monitor_every = p, steps, update, monitor_every
        self.stop_ssim = stop_ssim
        self._validate()
        for i, ref in enumerate(whiten or []):
            mean, matrix = whitening(ref, self.boosters.whiten.strength)
            self.register_buffer(f"whiten_mean_{i}", mean, persistent=False)
            self.register_buffer(f"whiten_matrix_{i}", matrix, persistent=False)
        fd = self.boosters.feature_dropout
        self._dropout_layers = (
            [layer for f in self.recognizers for layer in parts.conv_layers(f, fd.layers)] if fd.rate else []
        )
        lb = self.boosters.linear_backward
        self._linear_layers = (
            [layer for f in self.recognizers for layer in parts.activations(f, lb.start)]
            if lb.enabled
            else []
        )
        self.last_history: dict[str, list[float]] = {}

    def _validate(self) -> None:
        hp, pr, nz, boost = self.highpass, self.prune, self.noise, self.boosters
        di, fd, views, vt = boost.input_diversity, boost.feature_dropout, boost.views, boost.variance_tuning
        flags = {
            "highpass.enabled": hp.enabled,
            "prune.enabled": pr.enabled,
            "noise.enabled": nz.enabled,
            "boosters.input_diversity.enabled": di.enabled,
            "boosters.margin.enabled": boost.margin.enabled,
            "boosters.linear_backward.enabled": boost.linear_backward.enabled,
        }
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ConfigError(f"protect.{key}: {value!r} must be true or false")
        radius = pr.radius if isinstance(pr.radius, Sequence) else (pr.radius,)
        checks = [
            ("highpass.omega_c", hp.omega_c, f"(0, {MAX_RADIUS:.4f})"),  # above: nothing kept, a black image
            ("highpass.gain", hp.gain, "(0, inf)"),
            *(("prune.radius", r, "(0, inf)") for r in radius),
            ("prune.softness", pr.softness, "[0, inf)"),
            ("prune.kappa", pr.kappa, "[0, inf)"),
            ("prune.window", pr.window, "int [1, inf)"),
            ("noise.octaves", nz.octaves, "int [1, inf)"),
            ("noise.persistence", nz.persistence, "(0, 1]"),
            ("noise.lacunarity", nz.lacunarity, "(1, inf)"),
            ("noise.scale", nz.scale, "(0, inf)"),
            ("noise.amplitude", nz.amplitude, "[0, inf)"),
            ("gamma", self.gamma, "[0, inf)"),
            ("entropy.bins", self.entropy.bins, "int [2, inf)"),
            ("entropy.bandwidth", self.entropy.bandwidth, "(0, inf)"),
            ("alpha", self.alpha, "(0, inf)"),
            ("sign_step", self.sign_step, "(0, 1]"),
            ("mu", self.mu, "[0, 1]"),
            ("p", self.p, "int [1, 2]"),
            ("steps", self.steps, "int [0, inf)"),
            ("stop_ssim", self.stop_ssim, "[0, 1)"),
            ("monitor_every", self.monitor_every, "int [1, inf)"),
            ("boosters.input_diversity.prob", di.prob, "[0, 1]"),
            ("boosters.input_diversity.scale", di.scale, "[0, 1)"),
            ("boosters.input_diversity.shift", di.shift, "[0, 1)"),
            ("boosters.ti_kernel", boost.ti_kernel, "int [0, inf)"),
            ("boosters.model_dropout", boost.model_dropout, "[0, 1)"),
            ("boosters.feature_dropout.rate", fd.rate, "[0, 1)"),
            *(("boosters.feature_dropout.layers", v, "[0, 1]") for v in fd.layers),
            ("boosters.linear_backward.start", boost.linear_backward.start, "[0, 1]"),
            ("boosters.views.k", views.k, "int [0, inf)"),
            ("boosters.views.scale", views.scale, "[0, 1)"),
            ("boosters.views.shift", views.shift, "[0, 1)"),
            ("boosters.views.rotate", views.rotate, "[0, 180]"),
            ("boosters.views.resample", views.resample, "(0, 1]"),
            ("boosters.variance_tuning.n", vt.n, "int [0, inf)"),
            ("boosters.variance_tuning.radius", vt.radius, "(0, 1]"),
            ("boosters.margin.temperature", boost.margin.temperature, "(0, inf)"),
            ("boosters.margin.stop_margin", boost.margin.stop_margin, "[0, 2]"),
            ("boosters.lowres.size", boost.lowres.size, "int [0, inf)"),
            ("boosters.lowres.weight", boost.lowres.weight, "(0, inf)"),
            ("boosters.negatives.weight", boost.negatives.weight, "[0, inf)"),
            ("boosters.negatives.temperature", boost.negatives.temperature, "(0, inf)"),
            ("boosters.negatives.identities", boost.negatives.identities, "int [1, inf)"),
            ("boosters.whiten.strength", boost.whiten.strength, "[0, 1]"),
            ("boosters.whiten.identities", boost.whiten.identities, "int [1, inf)"),
        ]
        for key, value, interval in checks:
            in_range(key, value, interval)
        check_choice("protect.noise.mode", nz.mode, MODES)
        check_choice("protect.update", self.update, UPDATES)
        check_choice("protect.boosters.negatives.penalty", boost.negatives.penalty, NEGATIVES)
        rules = [
            (pr.window % 2 == 1, f"protect.prune.window: {pr.window} must be odd"),
            (
                boost.ti_kernel == 0 or (boost.ti_kernel >= 3 and boost.ti_kernel % 2 == 1),
                f"protect.boosters.ti_kernel: {boost.ti_kernel} must be 0 (off) or odd >= 3",
            ),
            (not fd.rate or fd.layers, "protect.boosters.feature_dropout.layers: empty while rate > 0"),
            (
                boost.lowres.size == 0 or boost.lowres.size >= 4,
                f"protect.boosters.lowres.size: {boost.lowres.size} must be 0 (off) or >= 4 pixels",
            ),
            (
                not boost.negatives.weight or self._n_negatives,
                "protect.boosters.negatives: needs the surrogates' embeddings of the reference faces "
                "(the task makes them from boosters.negatives.root)",
            ),
            (
                not boost.whiten.strength or self._n_whiten,
                "protect.boosters.whiten: needs the surrogates' embeddings of the reference faces "
                "(the task makes them from boosters.whiten.root)",
            ),
            (
                not (boost.whiten.strength and boost.margin.enabled),
                "protect.boosters.whiten and boosters.margin: the margin compares cos with calibrated "
                "thresholds, which whitened cos is not; use one of them",
            ),
            (
                not boost.margin.enabled or self.thresholds is not None,
                "protect.boosters.margin: needs the surrogates' calibrated thresholds (the task passes "
                "them from calibration_file: run experiment=verify first)",
            ),
        ]
        for ok, msg in rules:
            if not ok:
                raise ConfigError(msg)
        for mon in self.monitors:
            family = getattr(mon, "family", None)
            if any(mon is f or (family and family == getattr(f, "family", None)) for f in self.recognizers):
                raise ConfigError(
                    f"LFSA monitors: {getattr(mon, 'name', mon)!r} is (a sibling of) a surrogate; "
                    "a monitor must be a model outside the ensemble"
                )
        parts.keep_mask(112, pr.regions, pr.radius, pr.shape, pr.softness)
        parts.highpass(torch.zeros(1, 3, 4, 4), hp.omega_c, hp.rescale)

    # ------------------------------------------------------------ stage 1: F and C

    def start(self, x: Tensor, gens: list[torch.Generator]) -> tuple[Tensor, Tensor]:
        """(F(X), X0); each step is skipped when disabled. C makes the first draw of each generator."""
        hp, pr = self.highpass, self.prune
        detail = parts.highpass(x, hp.omega_c, hp.rescale, hp.gain) if hp.enabled else x.float()
        if not pr.enabled:
            return detail, detail
        mask = parts.keep_mask(x.shape[-2:], pr.regions, pr.radius, pr.shape, pr.softness, x.device)
        return detail, parts.stochastic_fill(detail, mask, pr.kappa, pr.window, gens)

    # ------------------------------------------------------------ stage 2: P and eq. 9

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        return self._run(x, seeds)[2]

    def stages(self, x: Tensor, seeds: Tensor) -> dict[str, Tensor]:
        detail, x0, out = self._run(x, seeds)
        return {"original": x, "F": detail, "C": x0, "protected": out}

    def _run(self, x: Tensor, seeds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        check_batch(x, seeds, self.name)
        # A Lightning predict loop may hand over inference tensors: leave inference mode and clone,
        # so autograd can record the steps.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().float()
            gens = parts.generators(seeds, x.device)
            with torch.autocast(x.device.type, enabled=False):  # local variances need float32
                detail, x0 = self.start(x, gens)
            if self.steps:
                out, history = self._optimise(x, x0, gens, parts.generators(seeds, x.device, 1))
            else:
                out, history = x0, []
        self._record(history)
        return detail, x0, out

    def _optimise(
        self, x: Tensor, x0: Tensor, gens: list[torch.Generator], boost_gens: list[torch.Generator]
    ) -> tuple[Tensor, list[Tensor]]:
        """T steps of eq. 9 from X0 (``gens``: the method's draws, ``boost_gens``: the boosters').

        With an SSIM budget, an image that reaches it keeps its X_t (and z) and leaves the batch,
        so the surrogates spend no more passes on it (at one read-back per step: which images
        still move). Also returns the per-step history rows, on
        the device: batch means, an image that stopped counting with its last step's values.
        """
        b, dev = x.shape[0], x.device
        boost, vt, lowres = self.boosters, self.boosters.variance_tuning, self.boosters.lowres
        n_models = len(self.recognizers)
        with torch.no_grad():
            targets = [f(x).float() for f in self.recognizers]
            watched = [m(x).float() for m in self._watched()]
        xt, g = x0.detach().clone(), torch.zeros_like(x0)
        size = min(lowres.size, *x.shape[-2:])
        z = x0.new_zeros(b, 3, size, size) if lowres.size else None
        gz = torch.zeros_like(z) if z is not None else None
        variance = torch.zeros_like(x0)
        last = (x0.new_zeros(b), x0.new_zeros(b, n_models), x0.new_zeros(b))  # loss, cos, entropy
        history: list[Tensor] = []
        unwatched = x0.new_full((len(watched),), float("nan"))
        moving: Tensor | None = None  # indices of the images still moving; None: all of them
        for t in range(self.steps):
            if moving is not None and not len(moving):  # every image has stopped: nothing changes
                history.append(history[-1])
                continue
            rows = moving.tolist() if moving is not None else range(b)  # the step's one read-back
            mine, boost_mine = [gens[i] for i in rows], [boost_gens[i] for i in rows]
            xa, ga, va = (pick(v, moving) for v in (xt, g, variance))
            za, gza = (pick(v, moving) if v is not None else None for v in (z, gz))
            ta = [pick(v, moving) for v in targets]
            draws = parts.uniform(mine, 4 + n_models, dev)  # input diversity, model dropout
            weights = self.betas.expand(len(xa), n_models)
            if boost.model_dropout > 0:
                keep = parts.model_dropout(draws[:, 4:], boost.model_dropout)
                weights = weights * keep / (weights * keep).sum(1, keepdim=True) * self.betas.sum()
            xa.requires_grad_(True)
            inputs = [xa] if za is None else [xa, za.requires_grad_(True)]
            image = self._compose(xa, za)
            watch = self.monitors and (t % self.monitor_every == 0 or t == self.steps - 1)
            seen_by_monitors = self._watch(self._compose(xt, z), watched) if watch else unwatched
            loss, cos, ent = self._objective(image, ta, weights, draws[:, :4], boost_mine)
            grads = torch.autograd.grad(loss.sum(), inputs)
            last = tuple(put(v, moving, now.detach()) for v, now in zip(last, (loss, cos, ent), strict=True))
            means = torch.stack([last[0].mean(), (last[1] * self.betas).sum(1).mean(), last[2].mean()])
            share = x0.new_ones(1) * (1.0 if moving is None else len(moving) / b)
            history.append(torch.cat([means, last[1].mean(0), share, seen_by_monitors]).detach())
            grad = grads[0]
            if vt.n:  # VMI: this step's gradient + the last step's neighbourhood variance
                around = self._neighbours(image.detach(), ta, weights, draws[:, :4], boost_mine)
                grad, va = grad + va, around - grad
            xa = xa.detach()
            if boost.ti_kernel > 1:
                with torch.autocast(dev.type, enabled=False):
                    grad = parts.blur(grad, boost.ti_kernel)
            ga = self.mu * ga + self._normalise(grad)
            # An image at or below its SSIM budget keeps its X_t (and z) from here on.
            done = ssim(self._compose(xa, za), pick(x, moving)) <= self.stop_ssim if self.stop_ssim else None
            xa = hold(done, xa, self._step(xa, self._direction(ga), mine))
            if za is not None:
                gza = self.mu * gza + self._normalise(grads[1])
                step = self.sign_step if self.update == "sign" else self.alpha
                za = hold(done, za.detach(), (za.detach() + lowres.weight * step * self._direction(gza)))
                z, gz = put(z, moving, za.clamp(-1, 1)), put(gz, moving, gza)
            xt, g, variance = put(xt, moving, xa), put(g, moving, ga), put(variance, moving, va)
            if done is not None:
                moving = (torch.arange(b, device=dev) if moving is None else moving)[~done]
        return self._compose(xt, z).detach(), history

    def _compose(self, xt: Tensor, z: Tensor | None) -> Tensor:
        """The image: X_t plus the up-sampled low-resolution component when that booster is on."""
        if z is None:
            return xt
        up = F.interpolate(z, size=xt.shape[-2:], mode="bilinear", align_corners=False)
        return (xt + up).clamp(0, 1)

    def _objective(
        self, image: Tensor, targets: list[Tensor], weights: Tensor, draws: Tensor, boost_gens
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss B, cos B x n, entropy B) at ``image``: the surrogates see its views, with feature dropout."""
        boost = self.boosters
        views, di = boost.views, boost.input_diversity
        if views.k:
            u = parts.uniform(boost_gens, 6 * views.k, image.device)
            jitter = (1.0, views.scale, views.shift, views.rotate, views.resample)
            seen = torch.cat(
                [
                    parts.input_diversity(image, d, *jitter, mirror=views.mirror and i % 2 == 1)
                    for i, d in enumerate(u.split(6, dim=1))
                ]
            )
        elif di.enabled:
            seen = parts.input_diversity(image, draws, di.prob, di.scale, di.shift)
        else:
            seen = image
        k = len(seen) // len(image)
        with (
            parts.feature_dropout(self._dropout_layers, boost.feature_dropout.rate, boost_gens),
            parts.linear_backward(self._linear_layers),
        ):
            embs = [f(seen).float().view(k, len(image), -1) for f in self.recognizers]
        seen_pairs = zip(embs, targets, strict=True)
        if self.boosters.whiten.strength:
            seen_pairs = [(self._whitened(i, e), self._whitened(i, t)) for i, (e, t) in enumerate(seen_pairs)]
        cos = torch.stack([F.cosine_similarity(e, t, dim=-1).mean(0) for e, t in seen_pairs], 1)  # B x n
        gamma = self.gamma if self.noise.enabled else 0.0  # w/o P: N' = 1 and gamma = 0
        pulled: Tensor | float = 1.0  # per image: 0 once the margin booster has stopped every surrogate
        margin = boost.margin
        if margin.enabled:  # softmin over margins; a surrogate past threshold + stop_margin stops pulling
            m = cos.detach() - self.thresholds
            w = weights * torch.softmax(-m / margin.temperature, dim=1) * (m < margin.stop_margin)
            weights = w / w.sum(1, keepdim=True).clamp_min(1e-12) * self.betas.sum()
            # An image whose surrogates all stopped is done: its entropy term stops too, or the
            # normalised step would follow the entropy gradient alone, at full size.
            pulled = (w.sum(1) > 0).to(cos.dtype)
        ent = torch.zeros_like(cos[:, 0])
        if gamma:
            ent = parts.histogram_entropy(image, self.entropy.bins, self.entropy.bandwidth)
        loss = (weights * cos).sum(1) + gamma * pulled * ent
        if boost.negatives.weight:
            loss = loss - boost.negatives.weight * pulled * (
                self.betas * self._negatives_penalty(embs, targets)
            ).sum(1)
        return loss, cos, ent

    def _whitened(self, i: int, e: Tensor) -> Tensor:
        return (e - getattr(self, f"whiten_mean_{i}")) @ getattr(self, f"whiten_matrix_{i}")

    def _negatives_penalty(self, embs: list[Tensor], targets: list[Tensor]) -> Tensor:
        """B x n: per surrogate, the negatives penalty against its reference faces (mean over views)."""
        neg = self.boosters.negatives
        refs = [getattr(self, f"negatives_{i}") for i in range(self._n_negatives)]
        out = []
        for e, t, ref in zip(embs, targets, refs, strict=True):
            cos = F.normalize(e, dim=-1) @ ref.T  # views x B x M
            if neg.penalty == "spread":
                clean = (F.normalize(t, dim=-1) @ ref.T).square().mean(-1)
                out.append(F.relu(cos.square().mean(-1).mean(0) / clean.clamp_min(1e-12) - 1))
            else:
                out.append(neg.temperature * torch.logsumexp(cos / neg.temperature, dim=-1).mean(0))
        return torch.stack(out, 1)

    def _neighbours(self, image: Tensor, targets, weights, draws, boost_gens) -> Tensor:
        """Mean gradient at ``variance_tuning.n`` random points within +-radius of ``image``."""
        vt = self.boosters.variance_tuning
        total = torch.zeros_like(image)
        for _ in range(vt.n):
            u = torch.stack(
                [torch.rand(image.shape[1:], generator=g, device=image.device) for g in boost_gens]
            )
            near = (image + vt.radius * (2 * u - 1)).clamp(0, 1).requires_grad_(True)
            (grad,) = torch.autograd.grad(
                self._objective(near, targets, weights, draws, boost_gens)[0].sum(), near
            )
            total = total + grad
        return total / vt.n

    def _normalise(self, grad: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(grad, ord=self.p, dim=tuple(range(1, grad.ndim)), keepdim=True)
        return grad / norm.clamp_min(1e-12)

    def _direction(self, g: Tensor) -> Tensor:
        return g.sign() if self.update == "sign" else g

    def _watched(self) -> list[nn.Module]:
        """What the monitors log: each surrogate on the plain image (comparable with the black boxes,
        unlike the loss, which sees views and dropout), then each monitor; nothing without monitors."""
        return [*self.recognizers, *self.monitors] if self.monitors else []

    @torch.no_grad()
    def _watch(self, image: Tensor, watched: list[Tensor]) -> Tensor:
        """Batch-mean cos(f(X), f(X_t)) of what the monitors log: outputs only, never a gradient."""
        pairs = zip(self._watched(), watched, strict=True)
        return torch.stack([F.cosine_similarity(m(image).float(), t, dim=1).mean() for m, t in pairs])

    def _step(self, xt: Tensor, step: Tensor, gens: list[torch.Generator]) -> Tensor:
        """X_{t+1} from eq. 9 (modulate), the Fig. 2 reading (add), or both; clipped to [0,1].

        ``step`` is the momentum (raw) or its sign; its size is ``alpha`` or ``sign_step``."""
        nz = self.noise
        size = self.sign_step if self.update == "sign" else self.alpha
        if not nz.enabled:
            return (xt + size * step).clamp(0, 1)
        n = parts.perlin_noise(
            len(xt), xt.shape[-2:], gens, nz.octaves, nz.persistence, nz.lacunarity, nz.scale, xt.device
        )
        if nz.mode == "modulate":
            return (xt + size * n * step).clamp(0, 1)
        added = nz.amplitude * (2 * n - 1)
        if nz.mode == "add":
            return (xt + size * step + added).clamp(0, 1)
        return (xt + size * n * step + added).clamp(0, 1)

    def _record(self, history: list[Tensor]) -> None:
        """``last_history`` from the device rows, with one read-back."""
        names = [getattr(f, "name", str(i)) for i, f in enumerate(self.recognizers)]
        watched = [getattr(m, "name", f"monitor{j}") for j, m in enumerate(self.monitors)]
        watched = [*names, *watched] if self.monitors else []
        keys = ["loss", "cos", "entropy", *(f"cos/{n}" for n in names), "moving"]
        keys += [f"monitor/{n}" for n in watched]
        rows = torch.stack(history).tolist() if history else []  # the one sync
        self.last_history = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
