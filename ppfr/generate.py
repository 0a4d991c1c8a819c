"""Generating protected sets: a LightningModule for `Trainer.predict` and a writer that makes runs resumable.

Layout of a protected set (`out_dir`):
    meta.json                       what determines its images (method config, seed policy, data ids,
                                    ensemble sha256) and their hash; a set never mixes two of them
    shards/NNNN/<id>.png            lossless PNG, no metadata, shard = dataset index // shard_size
    grid/<id>.<stage>.png           intermediate stages (LFSA: F, C) of the first `eval.grid` images
    parts/<attempt>-rank<r>.jsonl   one line per finished image, appended after its PNG is in place
    manifest.jsonl                  the merged, sorted manifest, written when a run completes

An image is finished when its manifest line exists (the PNG is fsynced and renamed into place
before the line is appended), so a run killed at any moment resumes by skipping finished ids and
redoing the rest, without duplicates or losses.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from ppfr.config import to_dict
from ppfr.devices import CpuSettings
from ppfr.errors import DataError
from ppfr.io import fsync_dir, save_png, write_atomic
from ppfr.io import load_png as load_png  # re-exported: ppfr/evaluate.py and ppfr/tasks/evaluate.py
from ppfr.protect.base import ProtectionMethod
from ppfr.recognizers.base import Recognizer
from ppfr.run import Run, is_main_process

SEED_MASK = (1 << 63) - 1

# What determines a set's images, as meta.json names it, and how errors name it to users.
IDENTITY = {
    "method": "method config (protect.*)",
    "seed": "seed policy (seed)",
    "data_ids": "data ids (data.root, data.subset.*, data.on_no_face)",
    "models": "ensemble models (sha256 of protect.ensemble)",
}


def build_method(
    cfg: DictConfig,
    ensemble: Sequence[Recognizer] | None = None,
    monitors: Sequence[Recognizer] = (),
    blackbox: Sequence[Recognizer] | None = None,
) -> tuple[ProtectionMethod, dict[str, Any], dict[str, str | None], list[Recognizer]]:
    """The method of `cfg.protect`, the config that made it, its surrogates' sha256 by name, and the
    black boxes (`blackbox`, default those of `eval.blackbox`; checked independent of the surrogates).

    `ensemble` replaces `protect.ensemble` (experiment=transfer); `monitors` are recognizers whose cos
    the method logs every `transfer.monitor_every` steps, never using their gradients. The margin
    booster gets the surrogates' calibrated thresholds from the calibration file, the negatives
    and whiten boosters their embeddings of their reference faces."""
    from ppfr import protect, recognizers  # the method and zoo packages import torch models: lazily
    from ppfr.verification import load_threshold

    method_cfg = to_dict(cfg.protect)
    if ensemble is None:
        ensemble = recognizers.from_config(method_cfg.get("ensemble") or [], cfg.recognizer)
    elif ensemble:
        method_cfg["ensemble"] = [r.name for r in ensemble]
    if blackbox is None:
        blackbox = recognizers.from_config(list(cfg.eval.blackbox), cfg.recognizer)
    recognizers.check_disjoint(ensemble, [*blackbox, *monitors])
    if ((method_cfg.get("boosters") or {}).get("margin") or {}).get("enabled"):
        nearest = cfg.eval.threshold_source == "nearest"
        method_cfg["thresholds"] = [load_threshold(cfg, r, fallback=nearest) for r in ensemble]
    extra: dict[str, Any] = {}
    if monitors:
        extra = {"monitors": list(monitors), "monitor_every": cfg.get("transfer", {}).get("monitor_every", 5)}
    boosters = method_cfg.get("boosters") or {}
    for key, switch in (("negatives", "weight"), ("whiten", "strength")):
        spec = boosters.get(key) or {}
        if spec.get(switch):
            extra[key] = reference_embeddings(cfg, spec, ensemble, f"protect.boosters.{key}")
    method = protect.create({**method_cfg, **extra}, ensemble)
    models = {r.name: getattr(r, "sha256", None) for r in ensemble}
    return method, method_cfg, models, list(blackbox)


@torch.no_grad()
def reference_embeddings(
    cfg: DictConfig,
    spec: Mapping[str, Any],
    ensemble: Sequence[Recognizer],
    key: str = "protect.boosters.negatives",
) -> list[torch.Tensor]:
    """Each surrogate's embeddings of a booster's reference faces (`key`: negatives, whiten): the
    first `identities` people of `root` (identity folders; default the attackers' training people),
    none of them among the protected people (checked: fitting to the very impostors the evaluation
    counts would flatter its FAR)."""
    import datamodules
    from ppfr.verification import embed

    root = spec.get("root") or f"{cfg.paths.data}/lfw-train"
    common = {"pairs_file": None, "on_no_face": "center_crop", "cache_dir": cfg.data.cache_dir}
    ref = datamodules.create(
        {"name": "lfw", "root": root, "subset": {"identities": spec["identities"]}, **common}
    )
    datamodules.check_disjoint_identities(
        ref, datamodules.create(to_dict(cfg.data)), key, "the reference faces must be other people"
    )
    loader = ref.predict_dataloader(batch_size=64)
    return [embed(f, loader, flip=False, device=next(f.parameters()).device).float() for f in ensemble]


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ids_hash(ids: Sequence[str]) -> str:
    """The ordered image ids of a dataset or subset, as one digest."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


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
    `torch.enable_grad()` (build the Trainer with `inference_mode=False`).

    For the ids in `grid_ids` it also returns the method's intermediate stages, so the evaluation
    grid shows them without running the method again. It sums the method's per-step curve
    (`last_history`, e.g. LFSA's loss, cos and entropy) over the images it protects.
    """

    def __init__(
        self,
        method: ProtectionMethod,
        seed: int | None = None,
        grid_ids: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.method = method
        self.seed = seed
        self.grid_ids = frozenset(grid_ids)
        self.curve_keys: list[str] = []
        self.curve_sum: list[list[float]] = []  # per step, per key: sum over images of the batch means
        self.curve_images = 0

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        ids = list(batch["id"])
        x = batch["image"].detach().clone()
        seeds = item_seeds(ids, self.seed).to(x.device)
        grid = [k for k, item_id in enumerate(ids) if item_id in self.grid_ids]
        with torch.enable_grad():
            if grid:
                stages = dict(self.method.stages(x, seeds))
                out = stages.pop("protected") if "protected" in stages else self.method(x, seeds)
                stages.pop("original", None)
            else:
                out, stages = self.method(x, seeds), {}
        self._add_curve(getattr(self.method, "last_history", None), len(ids))
        return {
            "id": ids,
            "index": batch["index"].tolist(),
            "label": batch["label"].tolist(),
            "seed": seeds.tolist(),
            "image": out.detach().clamp(0, 1).cpu(),
            "stages": {ids[k]: {name: im[k].detach().cpu() for name, im in stages.items()} for k in grid},
        }

    def _add_curve(self, history: Mapping[str, Sequence[float]] | None, n: int) -> None:
        if not history or not all(history.values()):
            return
        keys, rows = list(history), list(zip(*history.values(), strict=True))
        if not self.curve_sum:
            self.curve_keys, self.curve_sum = keys, [[0.0] * len(keys) for _ in rows]
        if keys != self.curve_keys or len(rows) != len(self.curve_sum):
            return  # a method whose curve changes shape between batches: nothing to average
        for total, row in zip(self.curve_sum, rows, strict=True):
            for j, value in enumerate(row):
                total[j] += value * n
        self.curve_images += n


class ProtectedSet:
    """The on-disk protected set: what is finished, and where each image goes."""

    def __init__(self, out_dir: str | Path, shard_size: int = 1000) -> None:
        self.dir = Path(out_dir)
        self.shard_size = shard_size

    def path_for(self, index: int, item_id: str) -> Path:
        return self.dir / "shards" / f"{index // self.shard_size:04d}" / f"{safe_name(item_id)}.png"

    def grid_path(self, item_id: str, stage: str) -> Path:
        return self.dir / "grid" / f"{safe_name(item_id)}.{stage}.png"

    def meta(self) -> dict[str, Any]:
        path = self.dir / "meta.json"
        if not path.exists():
            raise DataError(f"{self.dir}: no meta.json; is this a protected set?")
        return json.loads(path.read_text())

    def bind(
        self,
        method: dict[str, Any],
        seed: int | None,
        ids: Sequence[str],
        models: Mapping[str, str | None],
        data: Mapping[str, Any] | None = None,
    ) -> str:
        """Record what determines the images; refuse to add to a set written with anything else.

        `models`: ensemble name -> sha256 of its weights; `data`: the data config, for messages."""
        identity = {"method": method, "seed": seed, "data_ids": ids_hash(ids), "models": dict(models)}
        digest = config_hash(identity)
        meta = self.dir / "meta.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old.get("config_hash") != digest:
                raise DataError(f"{meta}: {self._mismatch(old, identity, len(ids))}")
        elif is_main_process():
            record = {"config_hash": digest, **identity, "n_images": len(ids), "data": dict(data or {})}
            write_atomic(meta, json.dumps(record, indent=2, default=str) + "\n")
        if is_main_process():  # half-written files of a killed run; their items are redone
            for tmp in [*self.dir.glob("shards/*/.*.tmp"), *self.dir.glob("grid/.*.tmp")]:
                tmp.unlink(missing_ok=True)
        return digest

    @staticmethod
    def _mismatch(old: Mapping[str, Any], new: Mapping[str, Any], n_images: int) -> str:
        """Which part of what determines the images differs, and what to do."""
        differs = []
        for part, what in IDENTITY.items():
            if part not in old:
                differs.append(f"{what}: not recorded by the set (written by an older ppfr)")
            elif old[part] != new[part]:
                if part == "method":
                    detail = _changed_keys(old[part], new[part], "protect")
                elif part == "data_ids":
                    detail = (
                        f"the set holds {old.get('n_images', '?')} images, this run {n_images} (other ids)"
                    )
                elif part == "seed":
                    detail = f"the set has {_seed(old[part])}, this run {_seed(new[part])}"
                else:
                    detail = f"the set has {old[part]!r}, this run {new[part]!r}"
                differs.append(f"{what}: {detail}")
        return (
            "this protected set was written with a different " + "; ".join(differs) + ". A set holds the "
            "images of one configuration: rerun with the settings it was written with to resume it, or "
            "write a new set (another run_dir= or generate.out_dir=)"
        )

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


def _seed(seed: int | None) -> str:
    return "null (fresh OS entropy)" if seed is None else str(seed)


def _changed_keys(old: Any, new: Any, prefix: str) -> str:
    """`protect.alpha: 1.0 in the set, 0.5 here` for the first few keys whose values differ."""

    def flat(node: Any, key: str) -> dict[str, Any]:
        if isinstance(node, Mapping):
            return {k: v for name, sub in node.items() for k, v in flat(sub, f"{key}.{name}").items()}
        return {key: node}

    a, b = flat(old, prefix), flat(new, prefix)
    changed = [
        f"{k}: {a.get(k, '(absent)')!r} in the set, {b.get(k, '(absent)')!r} here"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


class ProtectedSetWriter(BasePredictionWriter):
    """Writes each predicted batch as PNGs (and the grid stages), then appends its manifest lines
    (per rank, per attempt)."""

    def __init__(self, protected: ProtectedSet, config_digest: str) -> None:
        super().__init__(write_interval="batch")
        self.protected = protected
        self.digest = config_digest
        self.attempt = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Every rank writes where global rank 0 does: ranks started by torchrun or SLURM each guessed
        their own run directory (the process group exists from here on)."""
        super().setup(trainer, pl_module, stage)
        self.protected.dir = Path(trainer.strategy.broadcast(str(self.protected.dir), src=0))
        self.attempt = trainer.strategy.broadcast(self.attempt, src=0)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        records, folders = [], set()
        for k, item_id in enumerate(prediction["id"]):
            for stage, image in prediction["stages"].get(item_id, {}).items():
                save_png(image, self.protected.grid_path(item_id, stage))
            index = prediction["index"][k]
            path = self.protected.path_for(index, item_id)
            save_png(prediction["image"][k], path)
            folders.add(path.parent)
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
        for folder in folders:  # the renames are durable before the lines that say they happened
            fsync_dir(folder)
        part = self.protected.dir / "parts" / f"{self.attempt}-rank{trainer.global_rank}.jsonl"
        self.protected.append(part, records)
        if trainer.received_sigterm:  # Lightning's predict loop would run on to the end: stop at this batch
            raise SIGTERMException(
                f"{self.protected.dir}: stopped by SIGTERM after a finished batch; rerun to resume"
            )


class ConvergenceLog(Callback):
    """The method's per-step curve averaged over every image this run protected, on all ranks.

    After prediction every rank holds it as `keys` and `rows` ([step, mean of each key]); with a
    `run`, rank 0 also writes `<run_dir>/<key>.csv`, a W&B table, and `<key>/<name>` metrics by step."""

    def __init__(self, run: Run | None = None, key: str = "convergence") -> None:
        self.run, self.key = run, key
        self.keys: list[str] = []
        self.rows: list[list[float]] = []

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert isinstance(pl_module, ProtectModule)
        local = (pl_module.curve_keys, pl_module.curve_sum, pl_module.curve_images)
        parts: list[Any] = [local]
        if dist.is_available() and dist.is_initialized():  # every rank protected its share of the images
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, local)
        self.rows = mean_curve(parts)
        self.keys = next((keys for keys, _, n in parts if n), [])
        if self.run is None or not trainer.is_global_zero or not self.rows:
            return
        self.run.log_table(self.key, ["step", *self.keys], self.rows)
        for row in self.rows:
            self.run.log_metrics(
                {f"{self.key}/{k}": v for k, v in zip(self.keys, row[1:], strict=True)}, step=row[0]
            )


@dataclass
class Generation:
    """What `generate` did. `records` (in the order asked for) exist on global rank 0 only."""

    records: list[dict[str, Any]] | None
    generated_now: int
    resumed_from: int
    seconds: float
    curve: ConvergenceLog

    @property
    def images_per_s(self) -> float | None:
        return self.generated_now / self.seconds if self.generated_now and self.seconds > 0 else None


def generate(
    cfg: DictConfig,
    run: Run,
    dm,
    method: ProtectionMethod,
    out: ProtectedSet,
    digest: str,
    indices: Sequence[int] | None = None,
    curve_key: str = "convergence",
) -> Generation:
    """Protect dataset items `indices` (default: all) into the bound set `out` with `Trainer.predict` on
    every device of `cfg.trainer`, skipping the finished ones; the one way every task writes a set.

    The first `eval.grid` items also keep their stages (`grid/`), and the method's per-step curve is
    logged as `<curve_key>.csv`. Generation always covers every item asked for (`fast_dev_run` and
    `limit_predict_batches` do not apply: they would leave a set unfinished)."""
    ids = dm.dataset.ids
    indices = list(range(len(ids)) if indices is None else indices)
    done = out.records()
    todo = [i for i in indices if ids[i] not in done]
    if run.is_main:
        print(
            f"generate: {len(indices)} images, {len(indices) - len(todo)} already done, {len(todo)} to go -> {out.dir}"
        )
    curve, rank, start = ConvergenceLog(run, curve_key), 0, time.perf_counter()
    if todo:
        callbacks: list[Callback] = [
            ProtectedSetWriter(out, digest),
            curve,
            CpuSettings(cfg.flush_denormal, cfg.keep_freed_memory),
        ]
        if cfg.trainer.enable_progress_bar:
            callbacks.append(ImageProgressBar())
        trainer_cfg = {**to_dict(cfg.trainer), "fast_dev_run": False, "limit_predict_batches": None}
        trainer = L.Trainer(
            **trainer_cfg,
            logger=run.logger,
            callbacks=callbacks,
            inference_mode=False,
            enable_checkpointing=False,
            default_root_dir=run.dir,
        )
        trainer.predict(
            ProtectModule(method, cfg.seed, grid_ids=[ids[i] for i in indices[: cfg.eval.grid]]),
            dataloaders=dm.predict_dataloader(todo, batch_size=cfg.generate.batch_size),
            return_predictions=False,
        )
        trainer.strategy.barrier()  # every rank's last batch is on disk before the manifest is merged
        rank = trainer.global_rank
    seconds = time.perf_counter() - start
    if rank != 0:
        return Generation(None, len(todo), len(indices) - len(todo), seconds, curve)
    by_id = {r["id"]: r for r in out.write_manifest()}
    missing = [ids[i] for i in indices if ids[i] not in by_id]
    if missing:
        raise DataError(
            f"{out.dir}: {len(missing)} images were not written (first: {missing[:3]}); rerun to resume"
        )
    records = [by_id[ids[i]] for i in indices]
    return Generation(records, len(todo), len(indices) - len(todo), seconds, curve)


def mean_curve(parts: Sequence[tuple[list[str], list[list[float]], int]]) -> list[list[float]]:
    """[step, mean of each key] rows from per-rank sums; ranks whose curve has another shape are left out."""
    filled = [p for p in parts if p[2]]
    if not filled:
        return []
    keys, first, _ = filled[0]
    same = [p for p in filled if p[0] == keys and len(p[1]) == len(first)]
    images = sum(n for _, _, n in same)
    return [
        [t, *(sum(p[1][t][j] for p in same) / images for j in range(len(keys)))] for t in range(len(first))
    ]


class ImageProgressBar(TQDMProgressBar):
    """The predict bar counts images, so its rate is images/s and its ETA holds for any batch size."""

    def init_predict_tqdm(self):
        bar = super().init_predict_tqdm()
        bar.unit = "img"
        return bar

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not self.has_dataloader_changed(dataloader_idx):
            return
        self._images = 0
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, Sequence) else loaders
        sampler = getattr(loader.batch_sampler, "sampler", None)  # under DDP: this rank's share
        try:
            total = len(loader.sampler if sampler is None else sampler)
        except TypeError:  # an iterable dataset: no total, no ETA
            total = None
        self.predict_progress_bar.reset(total=total)
        self.predict_progress_bar.set_description(f"{self.predict_description} DataLoader {dataloader_idx}")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._images += len(batch["id"])
        bar = self.predict_progress_bar
        if not bar.disable and self._should_update(
            batch_idx + 1, self.total_predict_batches_current_dataloader
        ):
            bar.n = self._images
            bar.refresh()
