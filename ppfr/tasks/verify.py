"""experiment=verify: clean verification of every chosen recognizer on the dataset's pairs.

Writes each recognizer's calibrated thresholds to `calibration_file`, keyed by what they were
measured on (data, subset, flip, model), where the protection and evaluation experiments read them.
"""

from __future__ import annotations

import time
from typing import Any

import torch.nn.functional as F
from omegaconf import DictConfig

import datamodules
from ppfr import recognizers
from ppfr.config import to_dict
from ppfr.devices import device
from ppfr.errors import ConfigError
from ppfr.run import Run, format_table
from ppfr.verification import FARS, describe, embed, measured_on, save_calibration, verify

COLUMNS = ["recognizer", "acc ± std", "AUC", *(f"TAR@{f}" for f in FARS), "thr (best acc)",
           *(f"thr@FAR{f}" for f in FARS), "images/s"]  # fmt: skip


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    dm = datamodules.create(to_dict(cfg.data))
    n_pairs, n_same = len(dm.pairs), int(dm.issame.sum())
    subset = "" if cfg.data.subset.pairs is None else f" (data.subset.pairs={cfg.data.subset.pairs})"
    if not n_pairs:
        raise ConfigError(f"data={cfg.data.name}: the dataset has no pairs to verify")
    if not n_same or n_same == n_pairs:
        raise ConfigError(
            f"data={cfg.data.name}{subset}: {n_same} genuine and {n_pairs - n_same} impostor pairs; "
            "verification needs at least one of each (use data.subset.pairs >= 2)"
        )
    rec_cfg = cfg.recognizer
    names = rec_cfg.names if isinstance(rec_cfg.names, str) else list(rec_cfg.names)
    where = device(cfg)
    loader = dm.predict_dataloader(batch_size=rec_cfg.batch_size)
    i, j = dm.pairs[:, 0], dm.pairs[:, 1]

    results: dict[str, Any] = {}
    rows = []
    for rec in recognizers.from_config(names, rec_cfg):
        start = time.perf_counter()
        emb = embed(rec, loader, bool(rec_cfg.flip), where)
        images_per_s = len(emb) / (time.perf_counter() - start)  # an image and its flip count once
        result = verify(F.cosine_similarity(emb[i], emb[j], dim=1), dm.issame, dm.folds)
        result["images_per_s"] = images_per_s
        results[rec.name] = result
        measured = measured_on(cfg, rec)
        save_calibration(cfg.calibration_file, measured, result)
        std = result["accuracy_std"]
        rows.append(
            [rec.name, f"{result['accuracy']:.4f} ± {std:.4f}" if std == std else f"{result['accuracy']:.4f} (no CV)",
             result["auc"], *(result[f"tar_at_far_{f}"] for f in FARS), result["threshold"],
             *(result[f"threshold_far_{f}"] for f in FARS), f"{images_per_s:.1f}"]
        )  # fmt: skip
        run.log_metrics({f"verify/{rec.name}/{k}": v for k, v in result.items() if isinstance(v, float)})
        rec.cpu()  # free the device for the next model
    protocol = next(iter(results.values()))["protocol"]
    print(f"verification on {describe(measured)}: {n_pairs} pairs ({n_same} genuine), {protocol}")
    print(format_table(COLUMNS, rows))
    print(f"thresholds written to {cfg.calibration_file}, keyed by this data, subset, flip and model")
    run.log_table("verify/table", COLUMNS, rows)
    return results
