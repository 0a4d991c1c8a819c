"""Fitting an attacker: Lightning Trainer with checkpoints (last + best on validation), early stopping,
and resume from `<run_dir>/checkpoints/last.ckpt` when the same command is rerun with the same run_dir."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig

from attacks.pairs import PairData
from ppfr.config import to_dict
from ppfr.devices import CpuSettings
from ppfr.errors import ConfigError
from ppfr.run import Run


def fit(cfg: DictConfig, run: Run, module: L.LightningModule, data: PairData) -> dict[str, Any]:
    """Train `module` on `data` (resuming), then load its best checkpoint; what the training did."""
    acfg = cfg.attack
    ckpt_dir = Path(run.dir) / "checkpoints"
    has_val = data.val is not None
    best = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-{step}",
        monitor="val/loss" if has_val else None,
        mode="min",
        save_last=True,
        save_top_k=1,
    )
    callbacks: list[L.Callback] = [best, CpuSettings(cfg.flush_denormal, cfg.keep_freed_memory)]
    if has_val and acfg.early_stopping_patience > 0:
        callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=acfg.early_stopping_patience))
    every = acfg.val_every_n_steps
    if every is not None and int(every) < 1:
        raise ConfigError(
            f"attack.val_every_n_steps={every}: a positive number of steps, or null (each epoch)"
        )
    kwargs = to_dict(cfg.trainer)
    kwargs["max_steps"] = int(acfg.max_steps)
    if every is not None:
        kwargs.update(val_check_interval=int(every), check_val_every_n_epoch=None)
    if not has_val:
        kwargs["limit_val_batches"] = 0
    trainer = L.Trainer(
        **kwargs,
        logger=run.logger,
        callbacks=callbacks,
        inference_mode=False,  # methods computing X' on the fly (LFSA) need gradients in validation
        default_root_dir=run.dir,
    )
    last = ckpt_dir / "last.ckpt"
    resumed_from = 0
    if last.exists():
        resumed_from = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
        print(f"attack: resuming from {last} (step {resumed_from})")
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    seconds = time.perf_counter() - start
    if not trainer.fast_dev_run and trainer.global_step > resumed_from:
        trainer.save_checkpoint(
            last, weights_only=False
        )  # the final state: a rerun with more steps goes on from here
    chosen = best.best_model_path or (str(last) if last.exists() else "")
    if chosen:
        state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    return {
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "resumed_from_step": resumed_from,
        "seconds": round(seconds, 2),
        "stopped_early": any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in callbacks),
        "checkpoint": chosen or None,
        "best_val_loss": float(best.best_model_score) if best.best_model_score is not None else None,
        "global_rank": trainer.global_rank,
    }
