"""A run: its directory, its logger, and the numbers it measured.

Every run directory holds the resolved `config.yaml` and a `results.json` rewritten
atomically whenever results are added, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid, save_image

from ppfr.config import to_dict
from ppfr.errors import ConfigError


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder + rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table for the terminal."""

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(c)), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    line = "  ".join(str(c).ljust(w) for c, w in zip(columns, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    return "\n".join(
        [line, sep, *("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in body)]
    )


def is_main_process() -> bool:
    """False in the extra processes a multi-GPU launch starts (they re-run the same command line)."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def _make_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    if not is_main_process() and os.environ.get("PPFR_RUN_DIR"):
        return Path(os.environ["PPFR_RUN_DIR"])  # the directory rank 0 chose
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(cfg.paths.outputs) / cfg.experiment
    run_dir, n = base / stamp, 1
    while run_dir.exists():
        run_dir, n = base / f"{stamp}_{n}", n + 1
    return run_dir


def _make_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    kind = cfg.logger.name
    if kind == "csv":
        return CSVLogger(save_dir=run_dir, name="", version="csv")
    if kind == "wandb":
        mode = os.environ.get("WANDB_MODE") or cfg.logger.mode
        if mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"logger.mode={mode!r}: expected offline, online or disabled")
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            group=cfg.logger.group,
            tags=list(cfg.logger.tags),
            name=cfg.logger.run_name or f"{cfg.experiment}-{run_dir.name}",
            save_dir=str(run_dir),
            mode=mode,
            offline=mode == "offline",
            config=to_dict(cfg),
        )
    raise ConfigError(f"logger.name={kind!r}: expected wandb or csv")


class Run:
    """What a task needs from the outside world: where to write, how to log, which seed."""

    def __init__(self, cfg: DictConfig, logger: bool = True) -> None:
        self.dir = _make_run_dir(cfg).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.is_main = is_main_process()
        if self.is_main:
            os.environ["PPFR_RUN_DIR"] = str(self.dir)  # inherited by the DDP processes Lightning launches
        cfg.run_dir = str(self.dir)
        self.cfg = cfg
        self.seed: int | None = cfg.seed
        if self.seed is not None:  # reproducing an experiment; otherwise randomness stays fresh
            L.seed_everything(self.seed, workers=True, verbose=False)
        self.results: dict[str, Any] = {}
        self.results_path = self.dir / "results.json"
        if self.results_path.exists():  # a resumed run keeps what it measured before
            self.results = json.loads(self.results_path.read_text())
        if self.is_main:
            write_atomic(self.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        self.logger: Logger | None = _make_logger(cfg, self.dir) if logger else None
        self.add_results(
            experiment=cfg.experiment,
            run_dir=str(self.dir),
            seed=self.seed,
            seed_source="config" if self.seed is not None else "os-entropy",
            machine={
                "host": socket.gethostname(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            },
        )

    def add_results(self, **results: Any) -> None:
        self.results.update(results)
        if self.is_main:
            write_atomic(self.results_path, json.dumps(self.results, indent=2, default=str) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table to W&B (wandb.Table) and always as `<run_dir>/<key>.csv`."""
        if not self.is_main:
            return
        path = self.dir / f"{key.replace('/', '_')}.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([columns, *rows])
        if isinstance(self.logger, WandbLogger):
            self.logger.log_table(key=key, columns=columns, data=[list(r) for r in rows])

    def log_images(self, key: str, images: list[torch.Tensor], captions: list[str]) -> None:
        """Image grids to W&B and always as `<run_dir>/images/<key>.png`."""
        if not self.is_main:
            return
        path = self.dir / "images" / f"{key.replace('/', '_')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid([im.detach().float().cpu().clamp(0, 1) for im in images], nrow=4), path)
        if isinstance(self.logger, WandbLogger):
            self.logger.log_image(
                key=key, images=[im.detach().float().cpu() for im in images], caption=captions
            )

    def finish(self) -> None:
        if self.logger is not None:
            self.logger.finalize("success")
            if isinstance(self.logger, WandbLogger):
                import wandb

                wandb.finish()
