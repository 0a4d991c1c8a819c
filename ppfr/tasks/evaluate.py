"""experiment=evaluate: measure a written protected set (also the last step of experiment=protect).

SSIM/PSNR of X' against X; for every black-box recognizer (never in the ensemble): the share of
faces it still matches at its calibrated threshold, impostor FAR with protected vs clean probes,
and pair-protocol accuracy with protected probes against a clean gallery and against each other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import datamodules
from ppfr import recognizers
from ppfr.config import to_dict
from ppfr.errors import ConfigError, DataError
from ppfr.evaluate import blackbox_metrics, embed_sets
from ppfr.generate import ProtectedSet, load_png
from ppfr.protect import ProtectionMethod
from ppfr.run import Run, format_table
from ppfr.verification import best_threshold, load_threshold


def _label_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every same-identity pair, and as many different-identity pairs (in a fixed order)."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    same = labels[i] == labels[j]
    genuine, impostor = torch.nonzero(same).flatten(), torch.nonzero(~same).flatten()
    impostor = impostor[torch.linspace(0, len(impostor) - 1, min(len(genuine), len(impostor))).long()]
    keep = torch.cat([genuine, impostor])
    return torch.stack([i[keep], j[keep]], dim=1), same[keep]


def _threshold(
    cfg: DictConfig, name: str, clean: torch.Tensor, labels: torch.Tensor, pairs, issame
) -> tuple[float, str]:
    """The recognizer's calibrated threshold: from the calibration file, else from clean pairs of this data."""
    source = cfg.eval.threshold_source
    if source in ("file", "auto"):
        try:
            return load_threshold(cfg.calibration_file, name, cfg.data.name), "file"
        except ConfigError:
            if source == "file":
                raise
    where = "clean pairs of this run"
    if not (issame.any() and (~issame).any()):  # e.g. a subset of identities: pairs from the labels
        pairs, issame = _label_pairs(labels)
        where = "clean same/different-identity pairs of this run"
    if not (issame.any() and (~issame).any()):
        raise ConfigError(
            f"no calibrated threshold for {name} on {cfg.data.name} in {cfg.calibration_file}, "
            "and too few identities here to calibrate one: run experiment=verify first"
        )
    scores = F.cosine_similarity(clean[pairs[:, 0]], clean[pairs[:, 1]], dim=1)
    return best_threshold(scores, issame)[0], where


def evaluate_set(
    cfg: DictConfig,
    run: Run,
    dm,
    out: ProtectedSet,
    method: ProtectionMethod | None = None,
    blackbox: list[recognizers.Recognizer] | None = None,
) -> dict[str, Any]:
    records = out.manifest()
    ids = dm.dataset.ids
    for rec in records:
        if rec["index"] >= len(ids) or ids[rec["index"]] != rec["id"]:
            raise DataError(
                f"{out.dir / 'manifest.jsonl'}: image {rec['id']!r} is not item {rec['index']} of {cfg.data.name}"
            )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if blackbox is None:
        weights = to_dict(cfg.recognizer.weights)
        blackbox = recognizers.create_many(list(cfg.eval.blackbox), cfg.recognizer.models_dir, weights)
    blackbox = [r.to(device) for r in blackbox]
    image, clean, prot = embed_sets(
        dm.dataset, records, out.dir, blackbox, cfg.eval.batch_size, device, flip=cfg.recognizer.flip
    )

    # Pairs of the dataset, re-indexed to the rows of `records`.
    row = {rec["index"]: k for k, rec in enumerate(records)}
    keep = [n for n, (i, j) in enumerate(dm.pairs.tolist()) if i in row and j in row]
    pairs = torch.tensor([[row[i], row[j]] for i, j in dm.pairs[keep].tolist()], dtype=torch.long).reshape(
        -1, 2
    )
    issame, folds = dm.issame[keep], dm.folds[keep]
    labels = torch.tensor([rec["label"] for rec in records])

    per_model: dict[str, dict[str, Any]] = {}
    for rec in blackbox:
        threshold, source = _threshold(cfg, rec.name, clean[rec.name], labels, pairs, issame)
        per_model[rec.name] = {
            **blackbox_metrics(clean[rec.name], prot[rec.name], labels, threshold, pairs, issame, folds),
            "threshold_source": source,
        }
    matches = [m["match"] for m in per_model.values()]
    summary = {
        **image,
        "blackbox_match_mean": sum(matches) / len(matches),
        "blackbox_match_min": min(matches),
        "n_pairs": len(pairs),
    }
    columns = [
        "recognizer",
        "match",
        "cos",
        "thr",
        "FAR prot",
        "FAR clean",
        "acc clean",
        "acc X'|X",
        "acc X'|X'",
    ]
    rows = [
        [
            name,
            m["match"],
            m["cos_mean"],
            m["threshold"],
            m["far_protected"],
            m["far_clean"],
            m.get("pair_acc_clean", float("nan")),
            m.get("pair_acc_protected_vs_clean", float("nan")),
            m.get("pair_acc_protected", float("nan")),
        ]
        for name, m in per_model.items()
    ]
    print(f"SSIM(X', X) {image['ssim']:.4f}  PSNR {image['psnr']:.2f} dB  over {image['n_images']} images")
    print(format_table(columns, rows))
    run.log_table("eval/blackbox", columns, rows)
    run.log_metrics({f"eval/{k}": v for k, v in summary.items()})
    run.log_metrics(
        {f"eval/{name}/{k}": v for name, m in per_model.items() for k, v in m.items() if isinstance(v, float)}
    )
    _log_grid(cfg, run, dm, out, records, method)
    return {"eval": {"summary": summary, "blackbox": per_model}}


def _log_grid(
    cfg: DictConfig, run: Run, dm, out: ProtectedSet, records, method: ProtectionMethod | None
) -> None:
    """original | F | C | protected for a few faces (the method reruns them with their recorded seeds)."""
    chosen = records[: cfg.eval.grid]
    if not chosen:
        return
    x = torch.stack([dm.dataset[r["index"]]["image"] for r in chosen])
    if method is not None:
        seeds = torch.tensor([r["seed"] for r in chosen], dtype=torch.int64)
        with torch.enable_grad():
            stages = method.stages(x.clone(), seeds)
        names = list(stages)
        columns = [stages[n].detach().cpu() for n in names]
    else:
        names = ["original", "protected"]
        columns = [x, torch.stack([load_png(out.dir / r["path"]) for r in chosen])]
    images = [col[k] for k in range(len(chosen)) for col in columns]
    run.log_images("eval/grid", images, [f"{r['id']}: {n}" for r in chosen for n in names])


def run(cfg: DictConfig, run: Run) -> dict[str, Any]:
    if not cfg.eval.set_dir:
        raise ConfigError(
            "experiment=evaluate needs eval.set_dir=<folder of a protected set (holding manifest.jsonl)>"
        )
    out = ProtectedSet(cfg.eval.set_dir)
    out.manifest()  # a clear error before the data is aligned
    dm = datamodules.create(to_dict(cfg.data))
    dm.prepare_data()
    dm.setup("predict")
    return evaluate_set(cfg, run, dm, out)
