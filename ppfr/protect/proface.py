"""PRO-Face (Yuan et al., ACM MM'22; fkeufss/PRO-Face, no licence: re-implemented from the description
in reference.md 1.2, nothing copied).

A two-branch embedder fuses the face X and its obfuscation (Gaussian blur, kernel 31) into an image
that looks like the obfuscation and that a chosen recognizer still matches to X. Training: sigma
~ U[2,8] per face, loss 2 * perceptual(obf, out) + L1(obf, out) + 0.5 * Triplet(out_a, out_p,
out_n) + 0.1 * Triplet(out_a, X_a, out_n) (margin 1, L2 on the recognizer's embeddings), the
recognizer frozen (``protect.ensemble``, one model of the zoo). Protection: sigma = the mean.

What is simplified or substituted, and why:
- perceptual term: 1 - SSIM (torchmetrics) instead of LPIPS, whose network weights would have to be
  downloaded, which this project cannot do;
- embedder: each branch is a plain 3-level U-Net (two 3x3 conv + LeakyReLU per level, widths
  ``width`` x 1, 2, 4) instead of PRO-Face's DenseNet-style U-Nets (growth 4, blocks 3-3-3,
  dropout 0.25). The fusion is PRO-Face's: bottlenecks summed, each decoder stage fed the sum of
  both branches' previous stage plus its own skip, every stage of both branches emitting a
  3-channel map at full size, the output their sum (images in [-1,1], no tanh).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision.transforms.v2.functional import gaussian_blur

from ppfr.errors import ConfigError, DataError
from ppfr.protect.base import METHODS, ProtectionMethod, check_batch
from ppfr.protect.training import TRAINERS, MethodTrainer, load_part, load_trained

LEVELS = 3
WEIGHTS = {"perceptual": 2.0, "l1": 1.0, "triplet": 0.5, "triplet_original": 0.1}
MARGIN = 1.0


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.LeakyReLU(0.2, inplace=True),
    )


class Branch(nn.Module):
    """One U-Net branch: encoder levels, decoder levels and a 3-channel head per level."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.down = nn.ModuleList(_block(3 if k == 0 else widths[k - 1], w) for k, w in enumerate(widths))
        self.up = nn.ModuleList(_block(widths[k + 1] + widths[k], widths[k]) for k in range(len(widths) - 1))
        self.heads = nn.ModuleList(nn.Conv2d(w, 3, 1) for w in widths)

    def encode(self, x: Tensor) -> list[Tensor]:
        features = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.avg_pool2d(x, 2))
            features.append(x)
        return features


class Embedder(nn.Module):
    """Branch O takes the face, branch T its obfuscation (both in [-1,1]); returns the fused image in [-1,1]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        widths = [width * 2**k for k in range(LEVELS)]
        self.o, self.t = Branch(widths), Branch(widths)

    def forward(self, x: Tensor, obf: Tensor) -> Tensor:
        if x.shape[-1] % 2 ** (LEVELS - 1) or x.shape[-2] % 2 ** (LEVELS - 1):
            raise DataError(f"proface: the embedder needs sides that are multiples of {2 ** (LEVELS - 1)} px")
        eo, et = self.o.encode(x), self.t.encode(obf)
        do = dt = eo[-1] + et[-1]  # summed bottlenecks
        out = torch.zeros_like(x)
        for k in range(LEVELS - 1, -1, -1):
            if k < LEVELS - 1:
                fused = F.interpolate(do + dt, size=eo[k].shape[-2:], mode="bilinear", align_corners=False)
                do = self.o.up[k](torch.cat([fused, eo[k]], 1))
                dt = self.t.up[k](torch.cat([fused, et[k]], 1))
            stage = self.o.heads[k](do) + self.t.heads[k](dt)
            out = out + F.interpolate(stage, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out


def fuse(embedder: Embedder, x: Tensor, obf: Tensor) -> Tensor:
    """The embedder on images in [0,1]; its output mapped back to [0,1] scale (not clamped)."""
    return (embedder(x * 2 - 1, obf * 2 - 1) + 1) / 2


def obfuscate(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Gaussian blur of each face with its own sigma (reflect padding)."""
    return torch.cat(
        [gaussian_blur(x[i : i + 1], [kernel, kernel], [s, s]) for i, s in enumerate(sigma.tolist())]
    )


def _check(kernel: Any, sigma: Any, width: Any) -> tuple[int, tuple[float, float], int]:
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 3 or kernel % 2 == 0:
        raise ConfigError(f"protect.kernel: expected an odd integer >= 3 (px), got {kernel!r}")
    ok = isinstance(sigma, Sequence) and len(sigma) == 2 and all(isinstance(s, int | float) for s in sigma)
    if not ok or not 0 < sigma[0] <= sigma[1]:
        raise ConfigError(f"protect.sigma: expected [low, high] with 0 < low <= high, got {sigma!r}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ConfigError(f"protect.width: expected a positive integer, got {width!r}")
    return kernel, (float(sigma[0]), float(sigma[1])), width


@METHODS.register("proface")
class ProFace(ProtectionMethod):
    """forward (= represent = attacker_input): the embedder's fusion of X and its blur at the mean
    sigma, 3 x H x W in [0,1]; deterministic. ``recognizers``: the one frozen recognizer it was
    trained through (``protect.ensemble``), checked against the checkpoint with ``width``."""

    name = "proface"
    needs_training = True

    def __init__(
        self,
        recognizers: Sequence[nn.Module],
        checkpoint: str | None = None,
        kernel: int = 31,
        sigma: Sequence[float] = (2.0, 8.0),
        width: int = 16,
    ) -> None:
        super().__init__()
        self.kernel, low_high, width = _check(kernel, sigma, width)
        self.sigma = sum(low_high) / 2
        self.embedder = Embedder(width)
        ensemble = [getattr(r, "name", None) for r in recognizers]
        state = load_trained(
            checkpoint, self.name, {"ensemble": ensemble, "width": width}, ("ensemble", "width")
        )
        load_part(self.embedder, state, "embedder.", checkpoint or "")
        self.embedder.requires_grad_(False)

    def obfuscated(self, x: Tensor) -> Tensor:
        return obfuscate(x, torch.full((len(x),), self.sigma), self.kernel)

    def stages(self, x: Tensor, seeds: Tensor) -> dict[str, Tensor]:
        check_batch(x, seeds, self.name)
        obf = self.obfuscated(x)
        return {"original": x, "obfuscated": obf, "protected": fuse(self.embedder, x, obf).clamp(0, 1)}

    def forward(self, x: Tensor, seeds: Tensor) -> Tensor:
        check_batch(x, seeds, self.name)
        return fuse(self.embedder, x, self.obfuscated(x)).clamp(0, 1)


class Triplets(Dataset):
    """(anchor, positive, negative) faces: every image of an identity with >= 2 images is an anchor,
    a positive is another image of its identity, a negative any image of another identity (drawn
    anew each time, from Python's ``random``, seeded by ``seed=N`` for reproduction)."""

    def __init__(self, faces: Dataset, root: str | Path) -> None:
        self.faces = faces
        self.labels = list(faces.labels)
        self.by_label: dict[int, list[int]] = defaultdict(list)
        for i, label in enumerate(self.labels):
            self.by_label[label].append(i)
        self.anchors = [i for i, label in enumerate(self.labels) if len(self.by_label[label]) >= 2]
        if not self.anchors or len(self.by_label) < 2:
            raise DataError(
                f"{root}: PRO-Face triplets need an identity with at least 2 images and another identity; "
                f"found {len(self.by_label)} identities, {len(self.anchors)} images of identities with >= 2"
            )

    def __len__(self) -> int:
        return len(self.anchors)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i = self.anchors[k]
        label = self.labels[i]
        j = random.choice([j for j in self.by_label[label] if j != i])
        n = random.randrange(len(self.labels))
        while self.labels[n] == label:
            n = random.randrange(len(self.labels))
        image = lambda index: self.faces[index]["image"]  # noqa: E731
        return {"anchor": image(i), "positive": image(j), "negative": image(n), "label": label}


@TRAINERS.register("proface")
class ProFaceTrainer(MethodTrainer):
    """The embedder, trained through one frozen recognizer (kept outside the module tree: not trained,
    not saved, moved to the device on use). ``embed``: that recognizer on protected faces."""

    def __init__(
        self,
        protect: Mapping[str, Any],
        schedule: Mapping[str, Any],
        classes: int,
        stage: int = 1,
        recognizers: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__(protect, schedule, classes, stage)
        if stage != 1:
            raise ConfigError(f"train.stage={stage}: PRO-Face trains in one stage")
        if len(recognizers) != 1:
            raise ConfigError(
                f"protect.ensemble: PRO-Face trains through one recognizer, got {len(recognizers)}"
            )
        cfg = self.method_cfg
        self.kernel, self.sigma, width = _check(
            cfg.get("kernel", 31), cfg.get("sigma", (2.0, 8.0)), cfg.get("width", 16)
        )
        self.embedder = Embedder(width)
        self.frozen = {"recognizer": recognizers[0].eval().requires_grad_(False)}
        self.triplet = nn.TripletMarginLoss(margin=MARGIN, p=2)

    @staticmethod
    def training_data(faces: Dataset, root: str | Path) -> Dataset:
        return Triplets(faces, root)

    def recognizer(self) -> nn.Module:
        return self.frozen["recognizer"].to(self.device)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        anchor = batch["anchor"]
        x = torch.cat([anchor, batch["positive"], batch["negative"]])
        low, high = self.sigma
        obf = obfuscate(x, low + (high - low) * torch.rand(len(x)), self.kernel)
        out = fuse(self.embedder, x, obf)
        f = self.recognizer()
        out_a, out_p, out_n = f(out).chunk(3)
        with torch.no_grad():
            orig_a = f(anchor)
        parts = {
            "perceptual": 1 - structural_similarity_index_measure(out, obf, data_range=1.0),
            "l1": F.l1_loss(out, obf),
            "triplet": self.triplet(out_a, out_p, out_n),
            "triplet_original": self.triplet(out_a, orig_a, out_n),
        }
        return sum(WEIGHTS[k] * v for k, v in parts.items()), parts

    def embed(self, x: Tensor, seeds: Tensor) -> Tensor:
        obf = obfuscate(x, torch.full((len(x),), sum(self.sigma) / 2), self.kernel)
        return self.recognizer()(fuse(self.embedder, x, obf).clamp(0, 1))
