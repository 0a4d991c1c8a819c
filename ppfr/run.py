"""A run: its directory, its logger, and the numbers it measured.

Every run directory holds the resolved `config.yaml` and a `results.json` rewritten
atomically whenever results are added, so a crash never leaves a half-written file. Its
`status` says how the run ended: `running` (still, or killed), `ok`, or `failed` with the error.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import platform
import socket
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torchvision.utils import make_grid

from ppfr.config import to_dict
from ppfr.errors import ConfigError, check_choice
from ppfr.io import save_png, write_atomic

__all__ = ["Run", "format_table", "is_main_process", "write_atomic"]

# What launchers set in the processes they start: torchrun (RANK, LOCAL_RANK), SLURM (SLURM_PROCID),
# LSF (JSM_NAMESPACE_RANK), Lightning's own DDP launchers (LOCAL_RANK, NODE_RANK).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK")


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
    """True only in global rank 0, however the processes were launched (every rank variable set is 0)."""
    return all(os.environ.get(key, "0") == "0" for key in RANK_VARIABLES)


def _make_run_dir(cfg: DictConfig) -> Path:
    """`run_dir`, else a new `<outputs>/<experiment>/<timestamp>`.

    Only the main process creates it. Other ranks get a guess that they never write to: what they
    write (the protected set) goes to the path broadcast from rank 0 once the process group exists
    (`ProtectedSetWriter.setup`), because ranks started by torchrun or SLURM cannot agree on a
    timestamp by themselves.
    """
    if cfg.run_dir:
        return Path(cfg.run_dir)
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
        check_choice("logger.mode (or $WANDB_MODE)", mode, ("offline", "online", "disabled"))
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
    """What a task needs from the outside world: where to write, how to log, which seed.

    Use it as a context manager, so that `results.json` records how the run ended:

        with Run(cfg) as run:
            run.add_results(**task(cfg, run))
    """

    def __init__(self, cfg: DictConfig, logger: bool = True) -> None:
        self.is_main = is_main_process()
        self.dir = _make_run_dir(cfg).resolve()
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
        cfg.run_dir = str(self.dir)
        self.cfg = cfg
        self.seed: int | None = cfg.seed
        if self.seed is not None:  # reproducing an experiment; otherwise randomness stays fresh
            L.seed_everything(self.seed, workers=True, verbose=False)
        self.results: dict[str, Any] = {}
        self.results_path = self.dir / "results.json"
        if self.results_path.exists():  # a resumed run keeps what it measured before
            self.results = json.loads(self.results_path.read_text())
        self.results.pop("error", None)
        if self.is_main:
            write_atomic(self.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        self.logger: Logger | None = _make_logger(cfg, self.dir) if logger else None
        self.add_results(
            experiment=cfg.experiment,
            status="running",
            run_dir=str(self.dir),
            seed=self.seed,
            seed_source="config" if self.seed is not None else "os-entropy",
            machine={
                "host": socket.gethostname(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "threads": torch.get_num_threads(),
                "flush_denormal": bool(cfg.flush_denormal),
                "keep_freed_memory": bool(cfg.keep_freed_memory),
            },
        )

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(error)

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
        text = io.StringIO()
        csv.writer(text).writerows([columns, *rows])
        write_atomic(self.dir / f"{key.replace('/', '_')}.csv", text.getvalue())
        if isinstance(self.logger, WandbLogger):
            self.logger.log_table(key=key, columns=columns, data=[list(r) for r in rows])

    def log_images(self, key: str, images: list[torch.Tensor], captions: list[str], nrow: int = 4) -> None:
        """Image grids to W&B and always as `<run_dir>/images/<key>.png` (`nrow` images a row)."""
        if not self.is_main:
            return
        grid = make_grid([im.detach().float().cpu().clamp(0, 1) for im in images], nrow=nrow)
        save_png(grid, self.dir / "images" / f"{key.replace('/', '_')}.png")
        if isinstance(self.logger, WandbLogger):
            self.logger.log_image(
                key=key, images=[im.detach().float().cpu() for im in images], caption=captions
            )

    def finish(self, error: BaseException | None = None) -> None:
        """Record how the run ended (`status` ok, or failed with the error) and close the logger."""
        if error is None:
            self.add_results(status="ok")
        else:
            self.add_results(status="failed", error={"type": type(error).__name__, "message": str(error)})
        if self.logger is not None:
            self.logger.finalize("success" if error is None else "failed")
            if isinstance(self.logger, WandbLogger):
                import wandb

                wandb.finish(exit_code=0 if error is None else 1)
