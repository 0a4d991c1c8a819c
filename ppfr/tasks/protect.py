"""experiment=protect: generate a protected set with `Trainer.predict` (any number of devices), then evaluate it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

import datamodules
from ppfr import protect, recognizers
from ppfr.config import to_dict
from ppfr.errors import DataError
from ppfr.generate import ImagesPerSecond, ProtectedSet, ProtectedSetWriter, ProtectModule
from ppfr.run import Run
from ppfr.tasks.evaluate import evaluate_set


def build_method(
    cfg: DictConfig,
) -> tuple[protect.ProtectionMethod, dict[str, Any], list[recognizers.Recognizer]]:
    """The method from `cfg.protect` with its surrogates, and the black boxes (checked independent of them)."""
    method_cfg = to_dict(cfg.protect)
    weights = to_dict(cfg.recognizer.weights)
    ensemble = recognizers.create_many(method_cfg.get("ensemble") or [], cfg.recognizer.models_dir, weights)
    blackbox = recognizers.create_many(list(cfg.eval.blackbox), cfg.recognizer.models_dir, weights)
    recognizers.check_disjoint(ensemble, blackbox)
    return protect.create(method_cfg, ensemble), method_cfg, blackbox


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    dm = datamodules.create(to_dict(cfg.data))
    dm.prepare_data()
    dm.setup("predict")
    method, method_record, blackbox = build_method(cfg)
    out = ProtectedSet(cfg.generate.out_dir or Path(run.dir) / "protected", cfg.generate.shard_size)
    digest = out.bind(method_record)

    ids = dm.dataset.ids
    done = out.records()
    todo = [i for i, item_id in enumerate(ids) if item_id not in done]
    print(f"protect: {len(ids)} images, {len(ids) - len(todo)} already done, {len(todo)} to go -> {out.dir}")
    t0 = time.perf_counter()
    if todo:
        loader = DataLoader(
            Subset(dm.dataset, todo), batch_size=cfg.generate.batch_size, num_workers=cfg.data.num_workers
        )
        callbacks = [ProtectedSetWriter(out, digest)]
        if cfg.trainer.enable_progress_bar:
            callbacks.append(ImagesPerSecond())
        trainer = L.Trainer(
            **to_dict(cfg.trainer),
            logger=run.logger,
            callbacks=callbacks,
            inference_mode=False,
            default_root_dir=run.dir,
        )
        trainer.predict(ProtectModule(method, cfg.seed), dataloaders=loader, return_predictions=False)
        trainer.strategy.barrier()  # every rank's last batch is on disk before the manifest is merged
        if trainer.global_rank != 0:
            return {}
    seconds = time.perf_counter() - t0
    records = out.write_manifest()
    missing = sorted(set(ids) - {r["id"] for r in records})
    if missing:
        raise DataError(
            f"{out.dir}: {len(missing)} images were not written (first: {missing[:3]}); rerun to resume"
        )
    results: dict[str, Any] = {
        "generation": {
            "out_dir": str(out.dir),
            "images": len(records),
            "generated_now": len(todo),
            "resumed_from": len(ids) - len(todo),
            "seconds": round(seconds, 2),
            "images_per_s": round(len(todo) / seconds, 3) if todo and seconds > 0 else None,
            "config_hash": digest,
        }
    }
    run.add_results(**results)
    if cfg.eval.enabled:
        results.update(evaluate_set(cfg, run, dm, out, method, blackbox))
    return results
