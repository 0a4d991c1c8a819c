"""The one entry point: `python -m ppfr.fit [experiment=NAME] [group=option] [dotted.key=value]`.

Works as a W&B sweep command too: `command: [${env}, ${interpreter}, -m, ppfr.fit, ${args_no_hyphens}]`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

import ppfr.tasks
from ppfr.config import compose, help_text
from ppfr.errors import ConfigError, DataError, ModelError
from ppfr.run import Run


def tasks() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(ppfr.tasks.__path__))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Compose the config, run its task, and return (and write) the measured results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = compose(argv)
    if cfg.task not in tasks():
        raise ConfigError(
            f"task={cfg.task!r} (experiment {cfg.experiment}) is unknown; tasks: {', '.join(tasks())}"
        )
    run = Run(cfg)
    if cfg.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        results = importlib.import_module(f"ppfr.tasks.{cfg.task}").run(cfg, run)
        run.add_results(**(results or {}))
    finally:
        run.finish()
    print(f"results: {run.results_path}")
    return run.results


def cli() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(help_text())
        return
    try:
        main()
    except (ConfigError, DataError, ModelError) as e:
        sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    cli()
