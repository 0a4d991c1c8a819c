"""The one entry point: `python -m ppfr.fit [experiment=NAME] [group=option] [dotted.key=value]`.

Works as a W&B sweep command too: `command: [${env}, ${interpreter}, -m, ppfr.fit, ${args_no_hyphens}]`.
torch, Lightning and the tasks are imported only once the config is valid, so `--help` and config
errors answer at once instead of after seconds of imports.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

import ppfr.tasks
from ppfr.config import compose, help_text
from ppfr.errors import ConfigError, DataError, ModelError


def tasks() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(ppfr.tasks.__path__))


def local_processes(trainer: DictConfig) -> int:
    """Processes of this run on this node: the launcher's count, else the devices Lightning will use."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    if not isinstance(devices, int | str):
        return max(1, len(devices))  # a list of device indices
    import torch

    gpu = trainer.get("accelerator") in ("auto", "gpu", "cuda")
    return max(1, torch.cuda.device_count()) if gpu else 1  # devices: auto or -1


def choose_threads(cfg: DictConfig) -> int:
    """`threads`, else $OMP_NUM_THREADS, else this process's cores divided by this node's processes."""
    if cfg.threads is not None:
        return int(cfg.threads)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_processes(cfg.trainer))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Compose the config, run its task, and return (and write) the measured results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = compose(argv)
    if cfg.task not in tasks():
        raise ConfigError(
            f"task={cfg.task!r} (experiment {cfg.experiment}) is unknown; tasks: {', '.join(tasks())}"
        )
    cfg.threads = choose_threads(cfg)
    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return {}
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from ppfr.devices import apply_cpu_settings
    from ppfr.run import Run

    # before the thread pool starts, so that its threads start with it
    apply_cpu_settings(bool(cfg.flush_denormal), bool(cfg.keep_freed_memory))
    torch.set_num_threads(cfg.threads)
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads)  # processes a launcher starts from here inherit it
    with Run(cfg) as run:  # results.json says running, then ok, or failed with the error
        try:
            results = importlib.import_module(f"ppfr.tasks.{cfg.task}").run(cfg, run)
        except MisconfigurationException as e:  # Lightning refusing a trainer.* value
            raise ConfigError(f"trainer: {e}") from e
        run.add_results(**(results or {}))
    if run.is_main:
        print(f"results: {run.results_path}")
    return run.results


def _one_line(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).splitlines())


def cli() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(help_text())
        return
    try:
        main()
    except (ConfigError, DataError, ModelError) as e:
        sys.exit(f"{type(e).__name__}: {_one_line(e)}")


if __name__ == "__main__":
    cli()
