"""The U-Net attacker: segmentation_models_pytorch `Unet` from the attacker input to X in [0,1].

Loss: L1, plus optional 1 - SSIM, plus optional identity loss 1 - cos(f(recon), f(X)) through one
frozen surrogate recognizer (the stronger attacker). Batches are `{"input": X', "target": X}`, or
`{"target": X, "id": ids}` when X' is computed on the fly by the protection method (a fresh X' per
image and epoch, for cheap methods).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from attacks import ATTACKERS
from ppfr.errors import ConfigError, ModelError
from ppfr.generate import item_seeds

DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's default for depth 5; shallower U-Nets take the last ones


def load_encoder_weights(encoder: nn.Module, path: str) -> None:
    """A user's encoder state dict (e.g. ImageNet weights from timm/smp), loaded with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many kinds (missing file, pickle, zip)
        raise ModelError(f"attack.encoder_weights_path={path}: cannot load a state dict ({err})") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        encoder.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        raise ModelError(f"attack.encoder_weights_path={path}: does not fit the encoder ({err})") from err


@ATTACKERS.register("unet")
class UNetAttacker(L.LightningModule):
    """`cfg` is the `attack` config node (plain mapping); `in_channels` the method's `attacker_channels`.

    `surrogate` (identity loss) and `method` (X' on the fly) are frozen helpers kept outside the
    module tree: they are not trained, not saved in checkpoints, and moved to the device on use.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any],
        in_channels: int = 3,
        surrogate: nn.Module | None = None,
        method: nn.Module | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"attack": dict(cfg), "in_channels": in_channels})
        depth = int(cfg["encoder_depth"])
        decoder = cfg.get("decoder_channels") or DECODER_CHANNELS[-depth:]
        if len(decoder) != depth:
            raise ConfigError(
                f"attack.decoder_channels: {list(decoder)} has {len(decoder)} entries, encoder_depth is {depth}"
            )
        try:
            self.net = smp.Unet(
                encoder_name=cfg["encoder"],
                encoder_depth=depth,
                encoder_weights=cfg.get("encoder_weights"),
                decoder_channels=list(decoder),
                in_channels=in_channels,
                classes=3,
            )
        except (KeyError, ValueError) as err:
            raise ConfigError(f"attack.encoder={cfg['encoder']!r} / encoder_depth={depth}: {err}") from err
        if cfg.get("encoder_weights_path"):
            load_encoder_weights(self.net.encoder, cfg["encoder_weights_path"])
        self.multiple = 2**depth
        self.freeze_unused(in_channels)
        self.weights = {
            "l1": float(cfg["loss"]["l1"]),
            "ssim": float(cfg["loss"]["ssim"]),
            "identity": float(cfg["identity_loss"]["weight"]),
        }
        if self.weights["identity"] > 0 and surrogate is None:
            raise ConfigError("attack.identity_loss.weight > 0 needs a surrogate recognizer")
        self.lr, self.weight_decay = float(cfg["lr"]), float(cfg["weight_decay"])
        self.seed = seed
        self.frozen = {"surrogate": surrogate, "method": method}

    # -- model ---------------------------------------------------------------------------------
    def freeze_unused(self, in_channels: int) -> None:
        """smp keeps the encoder stages beyond encoder_depth: freeze what a forward pass does not reach,
        so DDP does not wait for their gradients and AdamW does not decay them."""
        self.net.eval()  # no BatchNorm statistics from the probe
        probe = torch.rand(1, in_channels, 2 * self.multiple, 2 * self.multiple)
        with torch.enable_grad():
            self.net(probe).sum().backward()
        for p in self.net.parameters():
            p.requires_grad_(p.grad is not None)
            p.grad = None
        self.net.train()

    def forward(self, x: Tensor, size: tuple[int, int] | torch.Size | None = None) -> Tensor:
        """Reconstruction of size `size` (default: the input's); smaller inputs (DCT channels) are
        resized to it, and sizes that are not a multiple of 2^depth are padded, then cropped back."""
        h, w = size or x.shape[-2:]
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        pad_h, pad_w = -h % self.multiple, -w % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return torch.sigmoid(self.net(x)[..., :h, :w])

    def helper(self, name: str) -> nn.Module | None:
        module = self.frozen[name]
        return None if module is None else module.to(self.device)

    def loss(self, recon: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {"l1": F.l1_loss(recon, target)}
        total = self.weights["l1"] * parts["l1"]
        if self.weights["ssim"] > 0:
            parts["ssim"] = structural_similarity_index_measure(recon, target, data_range=1.0)
            total = total + self.weights["ssim"] * (1 - parts["ssim"])
        if self.weights["identity"] > 0:
            f = self.helper("surrogate")
            with torch.no_grad():
                reference = f(target)
            parts["identity_cos"] = F.cosine_similarity(f(recon), reference, dim=1).mean()
            total = total + self.weights["identity"] * (1 - parts["identity_cos"])
        return total, parts

    def pair(self, batch: dict[str, Any], fresh: bool) -> tuple[Tensor, Tensor]:
        """(attacker input, X): stored, or computed now by the method (fresh seeds when `fresh`)."""
        target = batch["target"]
        if "input" in batch:
            return batch["input"], target
        ids = [f"{self.current_epoch}:{i}" for i in batch["id"]] if fresh else list(batch["id"])
        seeds = item_seeds(ids, self.seed).to(target.device)
        with torch.enable_grad():  # iterative methods (LFSA) need gradients, even in validation
            x = self.helper("method").attacker_input(target.detach().clone(), seeds)
        return x.detach(), target

    # -- Lightning hooks -----------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x, target = self.pair(batch, fresh=True)
        loss, parts = self.loss(self(x, target.shape[-2:]), target)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(target))
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=len(target))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x, target = self.pair(batch, fresh=False)
        recon = self(x, target.shape[-2:])
        loss, parts = self.loss(recon, target)
        parts["ssim"] = structural_similarity_index_measure(recon, target, data_range=1.0)
        parts["psnr"] = peak_signal_noise_ratio(recon, target, data_range=1.0)
        n = len(target)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log_dict({f"val/{k}": v for k, v in parts.items()}, sync_dist=True, batch_size=n)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            [p for p in self.net.parameters() if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay
        )
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ConfigError(
                "the attacker needs trainer.max_epochs or attack.max_steps (the cosine schedule)"
            )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
