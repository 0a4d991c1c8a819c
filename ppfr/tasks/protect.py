"""experiment=protect: generate a protected set with `Trainer.predict` (any number of devices), then evaluate it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

import datamodules
from ppfr.config import to_dict
from ppfr.evaluate import evaluate_set
from ppfr.generate import ProtectedSet, build_method, generate
from ppfr.run import Run


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    method, method_cfg, models, blackbox = build_method(cfg)
    dm = datamodules.create(to_dict(cfg.data))
    ids = dm.dataset.ids
    out = ProtectedSet(cfg.generate.out_dir or Path(run.dir) / "protected", cfg.generate.shard_size)
    digest = out.bind(method_cfg, cfg.seed, ids, models, data=to_dict(cfg.data))

    gen = generate(cfg, run, dm, method, out, digest)
    if gen.records is None:
        return {}  # the other DDP processes are done: rank 0 writes the manifest and evaluates
    # What the images on disk were made with (the set's meta), not what this command asked for.
    seed = out.meta()["seed"]
    seed_source = "config" if seed is not None else "os-entropy"
    results: dict[str, Any] = {
        "seed": seed,
        "seed_source": seed_source,
        "generation": {
            "out_dir": str(out.dir),
            "images": len(gen.records),
            "generated_now": gen.generated_now,
            "resumed_from": gen.resumed_from,
            "seconds": round(gen.seconds, 2),
            "images_per_s": round(gen.images_per_s, 3) if gen.images_per_s else None,
            "config_hash": digest,
            "stochastic": method.stochastic,  # False: X -> X' is a function, the seed changes nothing
            "seed": seed,
            "seed_source": seed_source,
        },
    }
    run.add_results(**results)
    if cfg.eval.enabled:
        results.update(evaluate_set(cfg, run, dm, out, blackbox))
    return results
