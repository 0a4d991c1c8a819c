"""experiment=verify: clean verification of every chosen recognizer on the dataset's pairs.

Writes each recognizer's calibrated thresholds for this dataset to `calibration_file`, where the
protection and evaluation experiments read them.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import datamodules
from ppfr import recognizers
from ppfr.config import to_dict
from ppfr.errors import ConfigError
from ppfr.run import Run, format_table
from ppfr.verification import embed, save_calibration, verify

COLUMNS = ["recognizer", "acc ± std", "AUC", "TAR@1e-2", "TAR@1e-3", "threshold", "images/s"]


def device_of(choice: str) -> torch.device:
    """`auto` picks CUDA when there is one."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(choice)
    except RuntimeError as err:
        raise ConfigError(f"recognizer.device={choice!r}: not a torch device ({err})") from err


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    dm = datamodules.create(to_dict(cfg.data))
    dm.prepare_data()
    dm.setup("predict")
    if not len(dm.pairs):
        raise ConfigError(f"data={cfg.data.name}: the dataset has no pairs to verify")
    rec_cfg = cfg.recognizer
    names = rec_cfg.names if isinstance(rec_cfg.names, str) else list(rec_cfg.names)
    device = device_of(rec_cfg.device)
    source = dm.predict_dataloader()  # same data and workers, batches of recognizer.batch_size
    loader = DataLoader(
        source.dataset,
        batch_size=rec_cfg.batch_size,
        num_workers=source.num_workers,
        collate_fn=source.collate_fn,
    )
    i, j = dm.pairs[:, 0], dm.pairs[:, 1]

    results: dict[str, Any] = {}
    rows = []
    for rec in recognizers.create_many(names, rec_cfg.models_dir, to_dict(rec_cfg.weights)):
        start = time.perf_counter()
        emb = embed(rec, loader, bool(rec_cfg.flip), device)
        images_per_s = len(emb) / (time.perf_counter() - start)  # an image and its flip count once
        result = verify(F.cosine_similarity(emb[i], emb[j], dim=1), dm.issame, dm.folds)
        result["images_per_s"] = images_per_s
        results[rec.name] = result
        save_calibration(cfg.calibration_file, rec.name, cfg.data.name, result)
        rows.append(
            [rec.name, f"{result['accuracy']:.4f} ± {result['accuracy_std']:.4f}", result["auc"],
             result["tar_at_far_1e-2"], result["tar_at_far_1e-3"], result["threshold"], round(images_per_s, 1)]
        )  # fmt: skip
        run.log_metrics({f"verify/{rec.name}/{k}": v for k, v in result.items() if isinstance(v, float)})
        rec.cpu()  # free the device for the next model
    print(
        f"verification on {cfg.data.name}: {len(dm.pairs)} pairs, {next(iter(results.values()))['protocol']}"
    )
    print(format_table(COLUMNS, rows))
    print(f"thresholds written to {cfg.calibration_file}")
    run.log_table("verify/table", COLUMNS, rows)
    return results
