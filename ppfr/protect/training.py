"""What the trainable baselines share (issue 11, reference.md 1.1-1.2): the own recognizer (IR-18 with
a widened stem + ArcFace head), the LightningModule every method trainer extends, its published
optimiser schedule, and loading a trained checkpoint into a protection method.

``TRAINERS`` maps a method name to its trainer: ``partialface`` and ``duetface`` (here: their own
IR-18 on the representation), ``minusface`` and ``proface`` (in their modules).
``python -m ppfr.fit experiment=train_method protect=<name>`` trains one (ppfr/tasks/train_method.py).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ppfr.errors import ConfigError, ModelError, check_choice
from ppfr.protect.base import plain
from ppfr.recognizers.iresnet import LAYERS, IResNet
from ppfr.registry import Registry

EMBEDDING = 512
SEED_MAX = 2**62
OPTIMIZERS = ("sgd", "adam")
SCHEDULE_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "milestones", "epochs", "batch_size")

TRAINERS: Registry[type[MethodTrainer]] = Registry("trainable method", key="protect.name")


class ArcFace(nn.Module):
    """Additive angular margin head (Deng et al., CVPR'19): logits s*cos(theta + m) for the true class,
    s*cos(theta) for the others. Past theta = pi - m, cos(theta + m) would rise again, so there the
    margin becomes the linear penalty cos(theta) - m*sin(m) (insightface's choice)."""

    def __init__(self, features: int, classes: int, s: float = 64.0, m: float = 0.5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, features) * 0.01)
        self.s, self.m = s, m

    def forward(self, embedding: Tensor, labels: Tensor) -> Tensor:
        cos = F.linear(F.normalize(embedding), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels[:, None])
        theta = target.acos()
        margin = torch.where(
            theta + self.m < math.pi, (theta + self.m).cos(), target - self.m * math.sin(self.m)
        )
        return self.s * cos.scatter(1, labels[:, None], margin)


class OwnRecognizer(nn.Module):
    """A method's own recognizer: IR-18 whose stem conv takes ``in_channels`` (27 PartialFace, 162
    DuetFace, 192 MinusFace residue, 3*n_dup MinusFace X_p), and its ArcFace head (s=64, m=0.5).

    The stem is TFace's Conv(C_in -> 64, 3x3) + BN + PReLU (the IR-18's own BN and PReLU fit as they
    are). Ours adds a BatchNorm of the input channels: raw DCT coefficients span 1e-3 to 1e3 (DC up
    to 1024), which SGD at lr 0.1 does not take well otherwise.
    """

    def __init__(self, in_channels: int, classes: int) -> None:
        super().__init__()
        backbone = IResNet(LAYERS["iresnet18"], num_features=EMBEDDING)
        backbone.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.net = nn.Sequential(nn.BatchNorm2d(in_channels, affine=False), backbone)
        self.head = ArcFace(EMBEDDING, classes)

    def forward(self, rep: Tensor) -> Tensor:
        """Unit embeddings B x 512."""
        return F.normalize(self.net(rep))

    def loss(self, rep: Tensor, labels: Tensor) -> Tensor:
        """ArcFace cross-entropy of the representation's identities."""
        return F.cross_entropy(self.head(self.net(rep), labels), labels)


def fresh_seeds(n: int) -> Tensor:
    """One seed per training item from torch's generator (seeded by ``seed=N`` for reproduction)."""
    return torch.randint(0, SEED_MAX, (n,), dtype=torch.int64)


def optimizer(groups: list[dict[str, Any]], schedule: Mapping[str, Any]) -> dict[str, Any]:
    """The published optimiser: SGD (momentum) or Adam, lr / 10 at each epoch of ``milestones``."""
    unknown = sorted(set(schedule) - set(SCHEDULE_KEYS) - {"generator_lr_scale"})
    if unknown:
        raise ConfigError(
            f"train.schedules: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SCHEDULE_KEYS)}"
        )
    kind, lr, decay = schedule["optimizer"], float(schedule["lr"]), float(schedule["weight_decay"])
    check_choice("train.schedules.*.optimizer", kind, OPTIMIZERS)
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=lr, momentum=float(schedule["momentum"]), weight_decay=decay
        )
    else:
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=decay)
    steps = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(schedule["milestones"]), gamma=0.1)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": steps, "interval": "epoch"}}


class MethodTrainer(L.LightningModule):
    """Trains what a method learns. Subclasses give ``loss`` (the published objective; batches are the
    datamodule's dicts of image and label, or what ``training_data`` makes of them) and ``embed``
    (the method's own recognizer on protected faces, for verification after training).

    ``protect`` is the method's config node (saved in the checkpoint, checked when a protection
    method loads it), ``schedule`` its optimiser schedule, ``classes`` the training identities.
    """

    def __init__(
        self, protect: Mapping[str, Any], schedule: Mapping[str, Any], classes: int, stage: int = 1
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {"protect": plain(protect), "schedule": plain(schedule), "classes": classes, "stage": stage}
        )
        self.method_cfg, self.schedule, self.stage = plain(protect), plain(schedule), stage

    @staticmethod
    def training_data(faces: Dataset, root: str | Path) -> Dataset:
        """What the training loader iterates: the aligned faces themselves by default."""
        return faces

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def embed(self, x: Tensor, seeds: Tensor) -> Tensor:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, parts = self.loss(batch)
        n = len(next(v for v in batch.values() if isinstance(v, Tensor)))
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=n)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer(self.param_groups(), self.schedule)


@TRAINERS.register("partialface")
@TRAINERS.register("duetface")
class RepresentationTrainer(MethodTrainer):
    """The own IR-18 of a training-free frequency method (PartialFace, DuetFace) on its representation.

    PartialFace draws each face's channel subset from the 3 its identity allows (``label % 20``, TFace
    ``form_training_batch``). DuetFace's server IR-18 here is the plain one: its InteractiveBlocks
    (client MobileFaceNet feature maps x a PFLD facial-landmark mask) need a PFLD checkpoint we do
    not have, so the server network trains on the 162 channels alone.
    """

    def __init__(
        self, protect: Mapping[str, Any], schedule: Mapping[str, Any], classes: int, stage: int = 1
    ) -> None:
        super().__init__(protect, schedule, classes, stage)
        if stage != 1:
            raise ConfigError(
                f"train.stage={stage}: the own recognizer of {self.method_cfg.get('name')} trains in one stage"
            )
        from ppfr.protect import create  # ppfr.protect imports this module

        self.method = create(self.method_cfg)
        probe = self.method.represent(torch.zeros(1, 3, 112, 112), torch.zeros(1, dtype=torch.int64))
        self.recognizer = OwnRecognizer(probe.shape[1], classes)
        self.with_labels = "labels" in inspect.signature(self.method.represent).parameters

    def represent(self, x: Tensor, seeds: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is not None and self.with_labels:
            return self.method.represent(x, seeds, labels)
        return self.method.represent(x, seeds)

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        x, labels = batch["image"], batch["label"]
        arcface = self.recognizer.loss(self.represent(x, fresh_seeds(len(x)), labels), labels)
        return arcface, {"arcface": arcface}

    def embed(self, x: Tensor, seeds: Tensor) -> Tensor:
        return self.recognizer(self.represent(x, seeds))


# -- loading a trained method ------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Config values equal as JSON (tuples and lists alike)."""
    return json.dumps(plain(a), sort_keys=True) == json.dumps(plain(b), sort_keys=True)


def load_trained(
    path: str | Path | None, method: str, config: Mapping[str, Any], keys: Sequence[str]
) -> dict[str, Tensor]:
    """The state dict of a ``train_method`` checkpoint of ``method``, after checking that it was trained
    with the same ``keys`` of the method config as ``config`` (the config describes the method in
    every record, so it may not silently differ from the weights)."""
    if path is None:
        raise ConfigError(
            f"protect.checkpoint: {method} needs trained weights and none are set; train it first with "
            f"`python -m ppfr.fit experiment=train_method protect={method}`, then pass "
            "protect.checkpoint=<its run_dir>/checkpoints/last.ckpt"
        )
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"protect.checkpoint={path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state, trained = ckpt["state_dict"], ckpt["hyper_parameters"]["protect"]
    except Exception as err:  # torch raises many kinds (pickle, zip, key)
        raise ModelError(f"protect.checkpoint={path}: not a train_method checkpoint ({err})") from err
    if trained.get("name") != method:
        raise ModelError(
            f"protect.checkpoint={path}: a checkpoint of {trained.get('name')!r}, not of {method}"
        )
    differ = [k for k in keys if not _same(trained.get(k), config.get(k))]
    if differ:
        was = ", ".join(f"protect.{k}={json.dumps(plain(trained.get(k)))}" for k in differ)
        raise ConfigError(f"protect.checkpoint={path} was trained with {was}: set the same to use it")
    return state


def load_part(module: nn.Module, state: Mapping[str, Tensor], prefix: str, path: str | Path) -> None:
    """Load the ``prefix``-ed entries of a checkpoint's state dict into ``module``."""
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(part)
    except RuntimeError as err:
        raise ModelError(f"protect.checkpoint={path}: its {prefix.rstrip('.')} does not fit ({err})") from err
