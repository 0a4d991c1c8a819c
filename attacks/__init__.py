"""Reconstruction attackers: learn X back from what a protection method gives out, then measure the leak.

    ATTACKERS.create("unet", cfg.attack, in_channels=3)   # -> a LightningModule

`attacks.pairs` makes the training pairs (a protected set of identities disjoint from the test
set), `attacks.train` fits an attacker with checkpoints and resume, `attacks.evaluate` measures
SSIM/PSNR of its reconstructions and how often black boxes re-identify them.
"""

from __future__ import annotations

from lightning import LightningModule

from ppfr.registry import Registry

ATTACKERS: Registry[LightningModule] = Registry("attacker", key="attack.name")

from attacks import unet  # noqa: E402  (registers itself in ATTACKERS)

__all__ = ["ATTACKERS", "unet"]
