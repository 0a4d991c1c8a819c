"""LFSA: local features + stochastic anonymization (the seed paper, read as in docs/method.md).

X0 = C(F(X)): high-pass detail with everything but the eyes replaced by local-statistics noise.
Then T steps of momentum ascent (eq. 9) on L = sum_i beta_i cos(f_i(X), f_i(X_t)) + gamma H(X_t),
each step modulated by fresh multi-scale Perlin noise N'_t, so X -> X' is not a function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppfr.errors import ConfigError
from ppfr.protect import parts
from ppfr.protect.base import ProtectionMethod, check_batch, part

MODES = ("modulate", "add", "both")
UPDATES = ("raw", "sign")


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
class Boosters:
    """Transfer boosters beyond the paper; all off = eq. 9 as written."""

    input_diversity: InputDiversity = field(default_factory=InputDiversity)
    ti_kernel: int = 0
    model_dropout: float = 0.0


class LFSA(ProtectionMethod):
    """The method; ``recognizers`` are the frozen surrogates (B x 3 x 112 x 112 [0,1] -> unit embeddings).

    Defaults are configs/protect/paper.yaml (boosters off); the YAML presets state every key.

    After each ``forward``, ``last_history`` holds the batch-mean ``loss``, ``cos`` and
    ``entropy`` per step (collected on the device, read back once).
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
        mu: float = 0.9,
        p: int = 2,
        steps: int = 100,
        update: str = "raw",
        boosters: Mapping | Boosters | None = None,
    ) -> None:
        super().__init__()
        if not recognizers:
            raise ConfigError("protect.ensemble: LFSA needs at least one surrogate recognizer")
        self.recognizers = nn.ModuleList(recognizers).eval().requires_grad_(False)
        n = len(recognizers)
        betas = [1.0 / n] * n if betas is None else [float(b) for b in betas]
        if len(betas) != n:
            raise ConfigError(f"protect.betas: {len(betas)} weights for {n} surrogates")
        self.register_buffer("betas", torch.tensor(betas), persistent=False)
        self.highpass = part(Highpass, highpass, "protect.highpass")
        self.prune = part(Prune, prune, "protect.prune")
        self.noise = part(Noise, noise, "protect.noise")
        self.entropy = part(Entropy, entropy, "protect.entropy")
        self.boosters = part(Boosters, boosters, "protect.boosters")
        self.gamma, self.alpha, self.mu, self.p, self.steps, self.update = gamma, alpha, mu, p, steps, update
        self._validate()
        self.last_history: dict[str, list[float]] = {}

    def _validate(self) -> None:
        checks = [
            (
                self.noise.mode in MODES,
                f"protect.noise.mode: {self.noise.mode!r} is not one of {', '.join(MODES)}",
            ),
            (self.update in UPDATES, f"protect.update: {self.update!r} is not one of {', '.join(UPDATES)}"),
            (self.p in (1, 2), f"protect.p: {self.p!r} must be 1 or 2"),
            (
                int(self.steps) == self.steps and self.steps >= 0,
                f"protect.steps: {self.steps!r} must be an int >= 0",
            ),
            (self.alpha > 0, f"protect.alpha: {self.alpha} must be > 0"),
            (self.noise.octaves >= 1, f"protect.noise.octaves: {self.noise.octaves} must be >= 1"),
            (self.noise.scale > 0, f"protect.noise.scale: {self.noise.scale} must be > 0"),
            (self.entropy.bins >= 2, f"protect.entropy.bins: {self.entropy.bins} must be >= 2"),
            (self.entropy.bandwidth > 0, f"protect.entropy.bandwidth: {self.entropy.bandwidth} must be > 0"),
            (self.prune.window >= 1, f"protect.prune.window: {self.prune.window} must be >= 1"),
            (0 <= self.boosters.model_dropout < 1, "protect.boosters.model_dropout: must be in [0, 1)"),
            (self.boosters.ti_kernel >= 0, "protect.boosters.ti_kernel: must be >= 0 (0 = off)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        parts.keep_mask(112, self.prune.regions, self.prune.radius, self.prune.shape, self.prune.softness)
        parts.highpass(torch.zeros(1, 3, 4, 4), self.highpass.omega_c, self.highpass.rescale)

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
            out, history = self._optimise(x, x0, gens) if self.steps else (x0, [])
        self._record(history)
        return detail, x0, out

    def _optimise(self, x: Tensor, x0: Tensor, gens: list[torch.Generator]) -> tuple[Tensor, list[Tensor]]:
        """T steps of eq. 9 from X0; also the per-step (loss, cos, entropy) batch means."""
        b, dev = x.shape[0], x.device
        nz, boost = self.noise, self.boosters
        gamma = self.gamma if nz.enabled else 0.0  # w/o P: N' = 1 and gamma = 0
        n_models = len(self.recognizers)
        with torch.no_grad():
            targets = [f(x).float() for f in self.recognizers]
        xt, g = x0.detach().clone(), torch.zeros_like(x0)
        history: list[Tensor] = []
        for _ in range(self.steps):
            draws = parts.uniform(gens, 4 + n_models, dev)  # input diversity, model dropout
            weights = self.betas.expand(b, n_models)
            if boost.model_dropout > 0:
                keep = parts.model_dropout(draws[:, 4:], boost.model_dropout)
                weights = weights * keep / (weights * keep).sum(1, keepdim=True) * self.betas.sum()
            xt.requires_grad_(True)
            seen = xt
            di = boost.input_diversity
            if di.enabled:
                seen = parts.input_diversity(xt, draws[:, :4], di.prob, di.scale, di.shift)
            cos = sum(
                weights[:, i] * F.cosine_similarity(f(seen).float(), t, dim=1)
                for i, (f, t) in enumerate(zip(self.recognizers, targets, strict=True))
            )
            ent = torch.zeros_like(cos)
            if gamma:
                ent = parts.histogram_entropy(xt, self.entropy.bins, self.entropy.bandwidth)
            loss = cos + gamma * ent
            (grad,) = torch.autograd.grad(loss.sum(), xt)
            history.append(torch.stack([loss.mean(), cos.mean(), ent.mean()]).detach())
            xt = xt.detach()
            if boost.ti_kernel > 1:
                with torch.autocast(dev.type, enabled=False):
                    grad = parts.blur(grad, boost.ti_kernel)
            norm = torch.linalg.vector_norm(grad, ord=self.p, dim=(1, 2, 3), keepdim=True)
            g = self.mu * g + grad / norm.clamp_min(1e-12)
            step = g.sign() if self.update == "sign" else g
            xt = self._step(xt, step, gens)
        return xt, history

    def _step(self, xt: Tensor, step: Tensor, gens: list[torch.Generator]) -> Tensor:
        """X_{t+1} from eq. 9 (modulate), the Fig. 2 reading (add), or both; clipped to [0,1]."""
        nz = self.noise
        if not nz.enabled:
            return (xt + self.alpha * step).clamp(0, 1)
        n = parts.perlin_noise(
            len(xt), xt.shape[-2:], gens, nz.octaves, nz.persistence, nz.lacunarity, nz.scale, xt.device
        )
        if nz.mode == "modulate":
            return (xt + self.alpha * n * step).clamp(0, 1)
        added = nz.amplitude * (2 * n - 1)
        if nz.mode == "add":
            return (xt + self.alpha * step + added).clamp(0, 1)
        return (xt + self.alpha * n * step + added).clamp(0, 1)

    def _record(self, history: list[Tensor]) -> None:
        rows = torch.stack(history).tolist() if history else []  # one device sync per call
        self.last_history = {k: [r[i] for r in rows] for i, k in enumerate(("loss", "cos", "entropy"))}
