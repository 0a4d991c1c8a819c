"""MinusFace (Mi et al., CVPR'24; Tencent/TFace ``recognition/tasks/minusface``, reference.md 1.1).

A generator G maps the 192-channel DCT tensor of a face to 192 channels whose inverse DCT looks
like the face; what it leaves, the residue DCT(x) - G(DCT(x)), carries the identity. Stage 1
trains G and an IR-18 on the residue together: 5 * L1(x, IDCT(G(DCT x))) (images in [-1,1] as
TFace) + ArcFace. Stage 2 freezes G, shuffles the 192 residue channels of every face with its own
random permutation and inverse-DCTs them: X_p, 3 x 112 x 112 in [0,1], the protected image (what
people, black boxes and attackers see); a new IR-18 learns identities from X_p.

G here is a segmentation_models_pytorch ``Unet`` (ResNet encoder, no pretrained weights, depth 4:
112 px / 16 = 7) on the coefficients / 1024, not TFace's plain 64-1024 U-Net without BatchNorm:
a kept library, and several times cheaper at 112 px.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppfr.errors import ConfigError, DataError
from ppfr.protect import dct, parts
from ppfr.protect.base import METHODS, ProtectionMethod, check_batch, plain
from ppfr.protect.training import TRAINERS, MethodTrainer, OwnRecognizer, fresh_seeds, load_part, load_trained

SCALE = 1024.0  # |DC| <= 8 * 128: G sees and gives coefficients / SCALE
RECONSTRUCTION_WEIGHT = (
    5.0  # TFace stage 1: 5 * L1 + ArcFace (the KL sparsity term has weight 0 in the paper)
)
GENERATOR = {"encoder": "resnet34", "depth": 4, "decoder_channels": [256, 128, 64, 32]}


class Generator(nn.Module):
    """G: 192 DCT channels -> 192, in coefficient units."""

    def __init__(
        self, encoder: str = "resnet34", depth: int = 4, decoder_channels: Sequence[int] = (256, 128, 64, 32)
    ) -> None:
        super().__init__()
        if len(decoder_channels) != depth:
            raise ConfigError(
                f"protect.generator.decoder_channels: {list(decoder_channels)} has {len(decoder_channels)} "
                f"entries, depth is {depth}"
            )
        try:
            self.net = smp.Unet(
                encoder_name=encoder,
                encoder_depth=depth,
                encoder_weights=None,
                decoder_channels=list(decoder_channels),
                in_channels=dct.CHANNELS,
                classes=dct.CHANNELS,
            )
        except (KeyError, ValueError) as err:
            raise ConfigError(f"protect.generator: encoder={encoder!r}, depth={depth}: {err}") from err
        self.multiple = 2**depth
        self.freeze_unused()

    def freeze_unused(self) -> None:
        """smp keeps encoder stages beyond ``depth``: freeze what a forward pass does not reach, so
        DDP does not wait for their gradients."""
        self.net.eval()
        probe = torch.zeros(1, dct.CHANNELS, 2 * self.multiple, 2 * self.multiple)
        self.net(probe).sum().backward()
        for p in self.net.parameters():
            p.requires_grad_(p.grad is not None)
            p.grad = None
        self.net.train()

    def forward(self, coef: Tensor) -> Tensor:
        h, w = coef.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise DataError(
                f"minusface: G needs faces whose sides are multiples of {self.multiple} px, got {h} x {w}"
            )
        return self.net(coef / SCALE) * SCALE


def build_generator(config: Mapping[str, Any] | None) -> Generator:
    """G from ``protect.generator`` (unknown keys are a ConfigError)."""
    config = plain(config or GENERATOR)
    unknown = sorted(set(config) - set(GENERATOR))
    if unknown:
        raise ConfigError(
            f"protect.generator: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GENERATOR)}"
        )
    return Generator(**config)


def residue(g: Generator, x: Tensor) -> Tensor:
    """DCT(x) - G(DCT(x)): B x 192 x H x W."""
    coef = dct.to_dct(x)
    return coef - g(coef)


def permutations(seeds: Tensor, n_dup: int) -> Tensor:
    """B x (192 * n_dup): ``n_dup`` random orders of the 192 channels per item, from its seed."""
    gens = parts.generators(seeds, "cpu")
    return torch.stack(
        [torch.cat([torch.randperm(dct.CHANNELS, generator=g) for _ in range(n_dup)]) for g in gens]
    )


def shuffled(res: Tensor, seeds: Tensor, n_dup: int) -> Tensor:
    """X_p: each item's residue channels permuted, inverse DCT, clamped to [0,1] (TFace): B x 3*n_dup x H x W."""
    order = permutations(seeds, n_dup).to(res.device)
    h, w = res.shape[-2:]
    coef = res.gather(1, order[:, :, None, None].expand(-1, -1, h, w))
    return torch.cat([dct.from_dct(c) for c in coef.split(dct.CHANNELS, dim=1)], dim=1)


def _n_dup(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"protect.n_dup: expected a positive integer, got {value!r}")
    return value


@METHODS.register("minusface")
class MinusFace(ProtectionMethod):
    """forward: X_p (first shuffle), 3 x H x W in [0,1]; represent and attacker_input: the ``n_dup``
    shuffles channel-concatenated (3 * n_dup channels, what the stage-2 IR-18 and a U-Net attacker
    get). Stochastic: the permutations come from each face's seed. ``checkpoint``: a
    ``train_method`` checkpoint of stage 1 or 2 (both hold G); its ``generator`` must match.
    """

    name = "minusface"
    stochastic = True
    needs_training = True

    def __init__(
        self, checkpoint: str | None = None, n_dup: int = 1, generator: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.n_dup = _n_dup(n_dup)
        self.attacker_channels = 3 * self.n_dup
        self.generator = build_generator(generator)
        state = load_trained(
            checkpoint, self.name, {"generator": plain(generator or GENERATOR)}, ("generator",)
        )
        load_part(self.generator, state, "generator.", checkpoint or "")
        self.generator.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> MinusFace:
        super().train(mode)
        self.generator.eval()  # frozen, BatchNorm statistics included
        return self

    @torch.no_grad()
    def represent(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        return shuffled(residue(self.generator, x), seeds, self.n_dup).to(x.dtype)

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        return self.represent(x, seeds)[:, :3]

    def attacker_input(self, x: Tensor, seeds: Tensor) -> Tensor:
        return self.represent(x, seeds)


@TRAINERS.register("minusface")
class MinusFaceTrainer(MethodTrainer):
    """Stage 1: G and an IR-18 on the 192-channel residue. Stage 2: G loaded from ``protect.checkpoint``
    (a stage-1 checkpoint) and frozen, an IR-18 on X_p (3 * n_dup channels).

    Upstream LR quirk: TFace's README means G to train at lr x 0.1, but ``get_optimizer`` compares
    the method name with 'Minusface' (lower-case f), so that branch never fires and G trains at the
    recognizer's lr. ``train.schedules.minusface.generator_lr_scale`` is 1.0 (as TFace ran); 0.1
    is what its README intends.
    """

    def __init__(
        self, protect: Mapping[str, Any], schedule: Mapping[str, Any], classes: int, stage: int = 1
    ) -> None:
        super().__init__(protect, schedule, classes, stage)
        cfg = self.method_cfg
        self.n_dup = _n_dup(cfg.get("n_dup", 1))
        self.generator = build_generator(cfg.get("generator"))
        if stage == 1:
            self.recognizer = OwnRecognizer(dct.CHANNELS, classes)
        elif stage == 2:
            path = cfg.get("checkpoint")
            state = load_trained(path, "minusface", cfg, ("generator",))
            load_part(self.generator, state, "generator.", path)
            self.generator.requires_grad_(False)
            self.recognizer = OwnRecognizer(3 * self.n_dup, classes)
        else:
            raise ConfigError(f"train.stage={stage}: MinusFace has stages 1 and 2")

    def protected(self, x: Tensor, seeds: Tensor) -> Tensor:
        self.generator.eval()  # Lightning sets train mode on the whole module each epoch
        with torch.no_grad():
            return shuffled(residue(self.generator, x), seeds, self.n_dup)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        x, labels = batch["image"], batch["label"]
        if self.stage == 2:
            arcface = self.recognizer.loss(self.protected(x, fresh_seeds(len(x))), labels)
            return arcface, {"arcface": arcface}
        coef = dct.to_dct(x)
        encoded = self.generator(coef)
        recon = dct.downsample(dct.to_image(encoded))  # no clamp, so every pixel has a gradient
        l1 = F.l1_loss(recon * 2 - 1, x * 2 - 1)
        arcface = self.recognizer.loss(coef - encoded, labels)
        return RECONSTRUCTION_WEIGHT * l1 + arcface, {"l1": l1, "arcface": arcface}

    def embed(self, x: Tensor, seeds: Tensor) -> Tensor:
        if self.stage == 1:
            return self.recognizer(residue(self.generator, x))
        return self.recognizer(self.protected(x, seeds))

    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": list(self.recognizer.parameters())}]
        if self.stage == 1:
            scale = float(self.schedule.get("generator_lr_scale", 1.0))
            trained = [p for p in self.generator.parameters() if p.requires_grad]
            groups.append({"params": trained, "lr": float(self.schedule["lr"]) * scale})
        return groups
