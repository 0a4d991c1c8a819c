"""experiment=train_method: train what `protect=<method>` learns, then verify with its own recognizer.

    python -m ppfr.fit experiment=train_method protect=minusface                     # stage 1: G + IR-18 on the residue
    python -m ppfr.fit experiment=train_method protect=minusface train.stage=2 protect.checkpoint=<stage 1>/checkpoints/last.ckpt
    python -m ppfr.fit experiment=train_method protect=proface                       # the fusion embedder
    python -m ppfr.fit experiment=train_method protect=partialface                   # its own IR-18 (27 channels)

Trains on `train.data` (identities, `lfw-train` here) with the method's published schedule
(`train.schedules.<method>`), checkpoints to `<run_dir>/checkpoints/last.ckpt` (resumed when the same
command runs again with the same run_dir), then reports the own recognizer's verification accuracy
on the pairs of `data` (`faces-mini/lfw` by default), on faces protected with per-image seeds.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import datamodules
from ppfr import recognizers
from ppfr.config import to_dict
from ppfr.devices import CpuSettings, device
from ppfr.errors import ConfigError
from ppfr.generate import item_seeds
from ppfr.protect.training import TRAINERS, MethodTrainer
from ppfr.run import Run
from ppfr.verification import verify


def build(cfg: DictConfig, classes: int) -> tuple[MethodTrainer, dict[str, Any]]:
    """The trainer of `protect.name` and its schedule."""
    name = cfg.protect.name
    cls = TRAINERS.get(name)
    schedules = to_dict(cfg.train.schedules)
    if name not in schedules:
        raise ConfigError(f"train.schedules: no schedule for {name}; schedules: {', '.join(schedules)}")
    kwargs: dict[str, Any] = {}
    if "recognizers" in inspect.signature(cls).parameters:
        names = list(cfg.protect.get("ensemble") or [])
        kwargs["recognizers"] = recognizers.from_config(names, cfg.recognizer)
    schedule = schedules[name]
    return cls(to_dict(cfg.protect), schedule, classes, int(cfg.train.stage), **kwargs), schedule


def fit(cfg: DictConfig, run: Run, module: MethodTrainer, loader: DataLoader, epochs: int) -> dict[str, Any]:
    """Train (resuming from last.ckpt) and save the final state as last.ckpt."""
    ckpt_dir = Path(run.dir) / "checkpoints"
    every = int(cfg.train.checkpoint_every_n_steps)
    callback = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=every)
    kwargs = to_dict(cfg.trainer)
    kwargs.update(max_epochs=epochs, max_steps=int(cfg.train.max_steps), limit_val_batches=0)
    trainer = L.Trainer(
        **kwargs,
        logger=run.logger,
        callbacks=[callback, CpuSettings(cfg.flush_denormal, cfg.keep_freed_memory)],
        default_root_dir=run.dir,
    )
    last = ckpt_dir / "last.ckpt"
    resumed = (
        int(torch.load(last, map_location="cpu", weights_only=True)["global_step"]) if last.exists() else 0
    )
    if resumed:
        print(f"train_method: resuming from {last} (step {resumed})")
    start = time.perf_counter()
    trainer.fit(
        module, train_dataloaders=loader, ckpt_path=str(last) if last.exists() else None, weights_only=True
    )
    seconds = time.perf_counter() - start
    if trainer.global_step > resumed:
        trainer.save_checkpoint(
            last, weights_only=False
        )  # the final state, also after fast_dev_run or max_steps mid-epoch
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
    return {
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "resumed_from_step": resumed,
        "seconds": round(seconds, 2),
        "final_loss": metrics.pop("train/loss", None),
        "final_parts": {k.removeprefix("train/"): v for k, v in metrics.items()},
        "checkpoint": str(last) if last.exists() else None,
    }


@torch.no_grad()
def own_accuracy(
    module: MethodTrainer, dm: datamodules.FaceDataModule, seed: int | None, where: torch.device
) -> dict[str, Any]:
    """Verification accuracy of the method's own recognizer on `dm`'s pairs (no flip: the
    representation of a mirrored face is another draw of the method, not the same one)."""
    module.to(where).eval()
    seeds = item_seeds(dm.dataset.ids, seed)
    rows = []
    for batch in dm.predict_dataloader():
        x = batch["image"].to(where)
        rows.append(module.embed(x, seeds[batch["index"]].to(where)).float().cpu())
    emb = torch.cat(rows)
    pairs = dm.pairs
    scores = (emb[pairs[:, 0]] * emb[pairs[:, 1]]).sum(1)
    return {**verify(scores, dm.issame, dm.folds), "images": len(emb)}


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    train_dm = datamodules.create(to_dict(cfg.train.data))
    test_dm = datamodules.create(to_dict(cfg.data))
    shared = sorted(set(train_dm.label_names) & set(test_dm.label_names))
    if shared:
        raise ConfigError(
            f"train.data.root={train_dm.root} shares {len(shared)} identities with data.root={test_dm.root} "
            f"(e.g. {', '.join(shared[:3])}): the own recognizer must be verified on other people"
        )
    module, schedule = build(cfg, len(train_dm.label_names))
    data = module.training_data(train_dm.train_dataset, train_dm.root)
    batch_size = int(schedule["batch_size"])
    loader = DataLoader(
        data,
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(data) > batch_size,  # no batch of 1: BatchNorm cannot train on it
        num_workers=train_dm.num_workers,
        persistent_workers=train_dm.num_workers > 0,
    )
    training = fit(cfg, run, module, loader, int(schedule["epochs"]))
    results: dict[str, Any] = {
        "method": cfg.protect.name,
        "stage": int(cfg.train.stage),
        "training": {**training, "images": len(train_dm.dataset), "identities": len(train_dm.label_names)},
    }
    run.add_results(**results)
    if run.is_main:
        results["own_recognizer"] = own_accuracy(module, test_dm, cfg.seed, device(cfg))
        print(
            f"train_method: {cfg.protect.name} {training['steps']} steps, loss {training['final_loss']}, "
            f"own-recognizer accuracy {results['own_recognizer']['accuracy']:.4f} "
            f"on {results['own_recognizer']['n_pairs']} pairs"
        )
    return results
