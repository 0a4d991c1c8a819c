"""Generating protected sets: a LightningModule for `Trainer.predict` and a writer that makes runs resumable.

Layout of a protected set (`out_dir`):
    meta.json                       method config and its hash; a set never mixes two configs
    shards/NNNN/<id>.png            lossless PNG, no metadata, shard = dataset index // shard_size
    parts/<attempt>-rank<r>.jsonl   one line per finished image, appended after its PNG is in place
    manifest.jsonl                  the merged, sorted manifest, written when a run completes

An image is finished when its manifest line exists (the PNG is renamed into place before the
line is appended), so a run killed at any moment resumes by skipping finished ids and redoing
the rest, without duplicates or losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from PIL import Image

from ppfr.errors import DataError
from ppfr.protect.base import ProtectionMethod
from ppfr.run import is_main_process, write_atomic

SEED_MASK = (1 << 63) - 1


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def item_seeds(ids: Sequence[str], seed: int | None) -> torch.Tensor:
    """One seed per image: fresh OS entropy, or (for reproduction) derived from `seed` and the image id.

    Derived seeds make an image's output independent of batch composition and device count.
    """
    if seed is None:
        raw = np.frombuffer(os.urandom(8 * len(ids)), dtype=np.int64)
        return torch.from_numpy(raw & SEED_MASK)
    digests = [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest() for i in ids]
    return torch.tensor([int.from_bytes(d, "little") & SEED_MASK for d in digests], dtype=torch.int64)


def safe_name(item_id: str) -> str:
    """A file name for an image id (ids are relative paths: `Abel_Pacheco/Abel_Pacheco_0001.jpg`)."""
    stem = item_id.rsplit(".", 1)[0] if "." in item_id.rsplit("/", 1)[-1] else item_id
    return stem.replace("/", "__")


class ProtectModule(L.LightningModule):
    """Runs a protection method in `predict_step`; its optimisation needs gradients, so it runs under
    `torch.enable_grad()` (build the Trainer with `inference_mode=False`)."""

    def __init__(self, method: ProtectionMethod, seed: int | None = None) -> None:
        super().__init__()
        self.method = method
        self.seed = seed

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        seeds = item_seeds(batch["id"], self.seed)
        x = batch["image"]
        with torch.enable_grad():
            out = self.method(x.detach().clone(), seeds.to(x.device))
        return {
            "id": list(batch["id"]),
            "index": batch["index"].tolist(),
            "label": batch["label"].tolist(),
            "seed": seeds.tolist(),
            "image": out.detach().clamp(0, 1).cpu(),
        }


def save_png(image: torch.Tensor, path: Path) -> None:
    """A lossless 8-bit PNG with no metadata, renamed into place atomically."""
    array = image.float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    Image.fromarray(array, mode="RGB").save(tmp, format="PNG")
    os.replace(tmp, path)


def load_png(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except OSError as e:
        raise DataError(f"{path}: cannot read protected image ({e})") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


class ProtectedSet:
    """The on-disk protected set: what is finished, and where each image goes."""

    def __init__(self, out_dir: str | Path, shard_size: int = 1000) -> None:
        self.dir = Path(out_dir)
        self.shard_size = shard_size

    def path_for(self, index: int, item_id: str) -> Path:
        return self.dir / "shards" / f"{index // self.shard_size:04d}" / f"{safe_name(item_id)}.png"

    def bind(self, method_cfg: dict[str, Any]) -> str:
        """Record the method config; refuse to add to a set written with another config."""
        digest = config_hash(method_cfg)
        meta = self.dir / "meta.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old["config_hash"] != digest:
                raise DataError(
                    f"{meta}: this protected set was written with method config {old['config_hash']}, "
                    f"not {digest}; use a new output folder (generate.out_dir) for a different config"
                )
        else:
            write_atomic(meta, json.dumps({"config_hash": digest, "method": method_cfg}, indent=2) + "\n")
        if is_main_process():  # half-written images of a killed run; their items are redone
            for tmp in (self.dir / "shards").glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)
        return digest

    def records(self) -> dict[str, dict[str, Any]]:
        """Finished images by id. A torn last line (a kill mid-append) is not finished: it is redone."""
        done: dict[str, dict[str, Any]] = {}
        files = sorted((self.dir / "parts").glob("*.jsonl"))
        for part in files:
            for line in part.read_text().splitlines(keepends=True):
                if not line.endswith("\n"):
                    continue
                rec = json.loads(line)
                if (self.dir / rec["path"]).exists():
                    done[rec["id"]] = rec
        return done

    def append(self, part: Path, records: Iterable[dict[str, Any]]) -> None:
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def manifest(self) -> list[dict[str, Any]]:
        """The records of a finished set, in dataset order."""
        path = self.dir / "manifest.jsonl"
        if not path.exists():
            raise DataError(
                f"{self.dir}: no manifest.jsonl; is this a finished protected set? (rerun protect to resume it)"
            )
        return [json.loads(line) for line in path.read_text().splitlines()]

    def write_manifest(self) -> list[dict[str, Any]]:
        records = sorted(self.records().values(), key=lambda r: r["index"])
        write_atomic(self.dir / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return records


class ProtectedSetWriter(BasePredictionWriter):
    """Writes each predicted batch as PNGs, then appends its manifest lines (per rank, per attempt)."""

    def __init__(self, protected: ProtectedSet, config_digest: str) -> None:
        super().__init__(write_interval="batch")
        self.protected = protected
        self.digest = config_digest
        self.attempt = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        records = []
        for k, item_id in enumerate(prediction["id"]):
            index = prediction["index"][k]
            path = self.protected.path_for(index, item_id)
            save_png(prediction["image"][k], path)
            records.append(
                {
                    "id": item_id,
                    "index": index,
                    "label": prediction["label"][k],
                    "path": str(path.relative_to(self.protected.dir)),
                    "seed": prediction["seed"][k],
                    "config_hash": self.digest,
                }
            )
        part = self.protected.dir / "parts" / f"{self.attempt}-rank{trainer.global_rank}.jsonl"
        self.protected.append(part, records)


class ImagesPerSecond(TQDMProgressBar):
    """The predict progress bar, with images/s."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if batch_idx == 0:
            self._t0, self._n = time.perf_counter(), 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._n += len(batch["id"])
        rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
        self.predict_progress_bar.set_postfix(img_s=f"{rate:.2f}")
