"""experiment=data_check: align a dataset into the cache and report what it holds.

Run it once on a new dataset before anything else: it fills the alignment cache, counts images,
identities and pairs, lists the images where no face was found, and measures alignment speed.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

import datamodules
from ppfr.run import Run, format_table


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    report = datamodules.create(OmegaConf.to_container(cfg.data, resolve=True)).report  # aligns
    rows = [
        ["images", report["images"]],
        ["identities", report["identities"]],
        ["pairs (genuine)", f"{report['pairs']} ({report['genuine_pairs']})"],
        ["face detected", report["detected"]],
        ["already aligned", report["prealigned"]],
        ["no face: center crop", len(report["fallbacks"]["center_crop"])],
        ["no face: skipped", len(report["fallbacks"]["skipped"])],
        ["pairs dropped", report["pairs_dropped"]],
        ["cache hits / misses", f"{report['cache_hits']} / {report['cache_misses']}"],
        ["alignment s (images/s)", f"{report['seconds']} ({report['images_per_s']})"],
        ["torch threads (alignment)", report["torch_threads"]],
    ]
    print(f"data_check: {report['dataset']} at {report['root']}")
    print(format_table(["", "value"], rows))
    for kind, ids in report["fallbacks"].items():
        for image_id in ids[:20]:
            print(f"  {kind}: {image_id}")
    run.log_metrics(
        {k: float(report[k]) for k in ("images", "identities", "pairs", "detected") if report[k] is not None}
    )
    return report
