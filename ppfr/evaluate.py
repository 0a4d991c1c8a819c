"""How well a protected set protects: image similarity to the original and black-box recognition.

`evaluate_set` measures a written set (experiment=evaluate, and the last step of
experiment=protect): SSIM/PSNR of X' against X; for every black-box recognizer (never in the
ensemble) the share of faces it still matches at its calibrated thresholds (best accuracy, and
FAR 1e-3 as a second column), impostor FAR with protected vs clean probes, and pair-protocol
accuracy with protected probes against a clean gallery and against each other. It streams over
the set in batches (memory does not grow with its size) and keeps only embeddings.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig
from scipy.stats import binomtest
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ppfr import recognizers
from ppfr.config import THRESHOLD_SOURCES
from ppfr.devices import device as device_of
from ppfr.errors import ConfigError, DataError, check_choice
from ppfr.generate import ProtectedSet, safe_name
from ppfr.io import load_png
from ppfr.recognizers import Recognizer
from ppfr.run import Run, format_table
from ppfr.verification import (
    best_threshold,
    describe,
    describe_data,
    embed_batch,
    find_calibration,
    measured_on,
    tar_at_far,
    verify,
)

MIN_PAIRS_PER_CLASS = 10  # below this, k-fold pair accuracy is not reported
FAR = "1e-3"  # the fixed false accept rate of the second match column
KEPT_COS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # the counterfactual own-identity cos of `far_by_kept_cos`
FIRST_STAGES = ("F", "C")  # grid columns after the original; other stored stages follow by name


@torch.no_grad()
def embed_sets(
    dm,
    records: Sequence[dict[str, Any]],
    root: Path,
    recognizers: Sequence[Recognizer],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip: bool | Mapping[str, bool] = False,
) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SSIM/PSNR of X' against X, and clean/protected embeddings per recognizer (rows follow `records`).

    `flip` (one setting, or one per recognizer name) sums each embedding with that of the
    mirrored image, as the verification protocol does, so that its thresholds apply here."""
    flips = flip if isinstance(flip, Mapping) else {r.name: bool(flip) for r in recognizers}
    path_of = {r["index"]: root / r["path"] for r in records}
    ssim, psnr = [], []
    clean: dict[str, list[torch.Tensor]] = {r.name: [] for r in recognizers}
    prot: dict[str, list[torch.Tensor]] = {r.name: [] for r in recognizers}
    for batch in dm.predict_dataloader(indices=[r["index"] for r in records], batch_size=batch_size):
        x = batch["image"].to(device)
        xp = torch.stack([load_png(path_of[i]) for i in batch["index"].tolist()]).to(device)
        ssim.append(structural_similarity_index_measure(xp, x, data_range=1.0, reduction="none").cpu())
        psnr.append(peak_signal_noise_ratio(xp, x, data_range=1.0, reduction="none", dim=(1, 2, 3)).cpu())
        for rec in recognizers:
            clean[rec.name].append(embed_batch(rec, x, flips[rec.name]).float().cpu())
            prot[rec.name].append(embed_batch(rec, xp, flips[rec.name]).float().cpu())
    image = {
        "ssim": torch.cat(ssim).mean().item(),
        "psnr": torch.cat(psnr).mean().item(),
        "n_images": len(records),
    }
    return image, {k: torch.cat(v) for k, v in clean.items()}, {k: torch.cat(v) for k, v in prot.items()}


def impostor_accepts(
    clean: torch.Tensor, protected: torch.Tensor, labels: torch.Tensor, threshold: float
) -> dict[str, Any]:
    """Over ordered pairs (a, b) of different identities, probe a against clean b: how many pass the
    threshold with the protected probe a' and with the clean probe a, and the pairs where only one
    does. The two FARs share every pair, so the discordant pairs (a one-sided sign test) say whether
    protection raised the FAR beyond chance: `far_excess_p` small = it did. Pairs share their faces,
    so that test is optimistic; `far_excess_p_probes` is the same sign test with one vote per probe
    face (more pairs passed only protected than only clean, or fewer), the safer of the two.

    Beside the counts, the impostor scores themselves, which say why a FAR moved with far fewer
    faces than the counts need: their mean and std with each probe, and the least-squares slope of
    the protected score on the clean one. A slope above the genuine `cos_mean` means the protected
    probe kept more of its likeness to other people than of its own identity.

    And where the change comes from. Each protected embedding is a·(its clean one) + a residual
    orthogonal to it. `impostor_residual_common` is the length of the residuals' mean over that of
    one residual (0: they point every which way; 1: every face moved the same way, a signature of
    the protection), `far_protected_without_common` the FAR with that mean taken out of every
    probe, and `far_by_kept_cos` the FAR had every probe kept cos a to its clean self with its
    residual's direction unchanged, for each a of `KEPT_COS`: whether keeping more identity, or
    less, would bring the FAR back to clean."""
    n = {"pairs": 0, "protected": 0, "clean": 0, "protected_only": 0, "clean_only": 0, "more": 0, "fewer": 0,
         "without_common": 0}  # fmt: skip
    kept = torch.zeros(len(KEPT_COS), dtype=torch.long)
    sums = torch.zeros(5, dtype=torch.float64)  # clean, protected, clean^2, protected^2, clean*protected
    resid = protected - (protected * clean).sum(1, keepdim=True) * clean
    resid = resid * (resid.norm(dim=1, keepdim=True) > 1e-6)  # an unchanged probe's rounding: none
    common = resid.mean(0)
    unit, without = F.normalize(resid, dim=1), F.normalize(protected - common, dim=1)
    for start in range(0, len(clean), 1024):
        rows = slice(start, start + 1024)
        other = labels[rows, None] != labels[None, :]
        sp, sc = protected[rows] @ clean.T, clean[rows] @ clean.T
        sw, sr = without[rows] @ clean.T, unit[rows] @ clean.T
        p, c = (sp > threshold) & other, (sc > threshold) & other
        n["without_common"] += int(((sw > threshold) & other).sum())
        kept += torch.tensor(
            [int(((a * sc + (1 - a * a) ** 0.5 * sr > threshold) & other).sum()) for a in KEPT_COS]
        )
        p_only, c_only = p & ~c, c & ~p
        for key, mask in (("pairs", other), ("protected", p), ("clean", c), ("protected_only", p_only),
                          ("clean_only", c_only)):  # fmt: skip
            n[key] += int(mask.sum())
        net = p_only.sum(1) - c_only.sum(1)  # per probe face
        n["more"], n["fewer"] = n["more"] + int((net > 0).sum()), n["fewer"] + int((net < 0).sum())
        x, y = sc[other].double(), sp[other].double()
        sums += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])

    def excess_p(up: int, down: int) -> float:
        return float(binomtest(up, up + down, 0.5, alternative="greater").pvalue) if up + down else 1.0

    nan = float("nan")
    far_p = far_c = far_w = mean_c = mean_p = std_c = std_p = slope = nan  # no pairs: no FAR, no scores
    far_kept = {f"{a:.2f}": nan for a in KEPT_COS}
    if n["pairs"]:
        far_p, far_c, far_w = (n[k] / n["pairs"] for k in ("protected", "clean", "without_common"))
        far_kept = {f"{a:.2f}": int(k) / n["pairs"] for a, k in zip(KEPT_COS, kept, strict=True)}
        mean_c, mean_p, sq_c, sq_p, prod = (sums / n["pairs"]).tolist()
        var_c = sq_c - mean_c**2
        std_c, std_p = max(var_c, 0.0) ** 0.5, max(sq_p - mean_p**2, 0.0) ** 0.5
        if var_c > 1e-12:  # one clean score: no slope
            slope = (prod - mean_c * mean_p) / var_c
    return {
        "far_protected": far_p,
        "far_clean": far_c,
        "impostor_pairs": n["pairs"],
        "far_protected_only": n["protected_only"],
        "far_clean_only": n["clean_only"],
        "far_excess_p": excess_p(n["protected_only"], n["clean_only"]),
        "far_probes_more": n["more"],
        "far_probes_fewer": n["fewer"],
        "far_excess_p_probes": excess_p(n["more"], n["fewer"]),
        "impostor_cos_mean_clean": mean_c,
        "impostor_cos_mean_protected": mean_p,
        "impostor_cos_std_clean": std_c,
        "impostor_cos_std_protected": std_p,
        "impostor_cos_slope": slope,
        "impostor_residual_common": float(common.norm() / resid.norm(dim=1).mean()) if resid.any() else nan,
        "far_protected_without_common": far_w,
        "far_by_kept_cos": far_kept,
    }


def blackbox_metrics(
    clean: torch.Tensor,
    protected: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    pairs: torch.Tensor | None = None,
    issame: torch.Tensor | None = None,
    folds: torch.Tensor | None = None,
    threshold_far: float | None = None,
) -> dict[str, float]:
    """One black-box recognizer's view of a protected set (rows of `clean`/`protected` align).

    `pairs` index those rows. `match` is the share of faces with cos(f(X), f(X')) above the
    recognizer's calibrated best-accuracy threshold, `match_far` above its fixed-FAR threshold;
    the FARs compare protected and clean probes against clean images of other identities at the
    best-accuracy threshold (`impostor_accepts`).
    """
    cos = F.cosine_similarity(clean, protected, dim=1)
    out = {
        "match": float((cos > threshold).float().mean()),
        "cos_mean": float(cos.mean()),
        "threshold": threshold,
        **impostor_accepts(clean, protected, labels, threshold),
    }
    if threshold_far is not None:
        out["match_far"] = float((cos > threshold_far).float().mean())
        out["threshold_far"] = threshold_far
    if pairs is not None and min(int(issame.sum()), int((~issame).sum())) >= MIN_PAIRS_PER_CLASS:
        i, j = pairs[:, 0], pairs[:, 1]
        for name, a, b in (
            ("clean", clean, clean),
            ("protected_vs_clean", protected, clean),
            ("protected", protected, protected),
        ):
            scores = F.cosine_similarity(a[i], b[j], dim=1)
            out[f"pair_acc_{name}"] = verify(scores, issame, folds)["accuracy"]
    return out


# -- evaluation of a set --------------------------------------------------------------------------
def evaluate_set(
    cfg: DictConfig,
    run: Run,
    dm,
    protected_set: ProtectedSet,
    blackbox: list[Recognizer] | None = None,
) -> dict[str, Any]:
    """Measure the finished set `protected_set` of the data `dm` (see the module docstring).

    Never runs the protection method: the grid shows the PNGs stored with the set."""
    source = cfg.eval.threshold_source
    check_choice("eval.threshold_source", source, THRESHOLD_SOURCES)
    records = protected_set.manifest()
    check_records(cfg, dm, protected_set, records)
    device = device_of(cfg)
    if blackbox is None:
        blackbox = recognizers.from_config(list(cfg.eval.blackbox), cfg.recognizer)
    blackbox = [r.to(device) for r in blackbox]

    entries = {rec.name: calibration(cfg, rec) for rec in blackbox}
    flips = {
        name: entry["measured_on"]["flip"] if entry else bool(cfg.recognizer.flip)
        for name, entry in entries.items()
    }
    image, clean, prot = embed_sets(
        dm, records, protected_set.dir, blackbox, cfg.eval.batch_size, device, flip=flips
    )
    pairs, issame, folds = dm.pairs_within([r["index"] for r in records])
    labels = torch.tensor([r["label"] for r in records])

    per_model: dict[str, dict[str, Any]] = {}
    for rec in blackbox:
        entry = entries[rec.name]
        if entry is not None:
            threshold, threshold_far = entry["threshold"], entry[f"threshold_far_{FAR}"]
            where = "file" + (f" (nearest: {'; '.join(entry['differs'])})" if entry["differs"] else "")
        else:
            threshold, threshold_far, where = in_run_thresholds(
                cfg, rec.name, clean[rec.name], labels, pairs, issame
            )
        per_model[rec.name] = {
            **blackbox_metrics(
                clean[rec.name], prot[rec.name], labels, threshold, pairs, issame, folds, threshold_far
            ),
            "threshold_source": where,
            "flip": flips[rec.name],
        }
    matches = [m["match"] for m in per_model.values()]
    summary = {
        **image,
        "blackbox_match_mean": sum(matches) / len(matches),
        "blackbox_match_min": min(matches),
        f"blackbox_match_far_{FAR}_mean": sum(m["match_far"] for m in per_model.values()) / len(matches),
        "n_pairs": len(pairs),
    }
    columns, rows = metrics_table(per_model)
    print(f"SSIM(X', X) {image['ssim']:.4f}  PSNR {image['psnr']:.2f} dB  over {image['n_images']} images")
    print(format_table(columns, rows))
    for name, m in per_model.items():
        if m["threshold_source"] != "file":
            print(f"  {name}: threshold from {m['threshold_source']}")
    run.log_table("eval/blackbox", columns, rows)
    run.log_metrics({f"eval/{k}": v for k, v in summary.items()})
    run.log_metrics(
        {f"eval/{name}/{k}": v for name, m in per_model.items() for k, v in m.items() if isinstance(v, float)}
    )
    log_grid(run, dm, protected_set, records[: cfg.eval.grid])
    return {"eval": {"summary": summary, "blackbox": per_model}}


def metrics_table(per_model: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The black-box table: one row per recognizer; `nan` where too few pairs for pair accuracy."""
    columns = ["recognizer", "match", f"match@FAR{FAR}", "cos", "thr", f"thr@FAR{FAR}", "FAR prot",
               "FAR clean", "acc clean", "acc X'|X", "acc X'|X'"]  # fmt: skip
    nan = float("nan")
    rows = [
        [name, m["match"], m.get("match_far", nan), m["cos_mean"], m["threshold"], m.get("threshold_far", nan),
         m["far_protected"], m["far_clean"], m.get("pair_acc_clean", nan),
         m.get("pair_acc_protected_vs_clean", nan), m.get("pair_acc_protected", nan)]
        for name, m in per_model.items()
    ]  # fmt: skip
    return columns, rows


def calibration(cfg: DictConfig, rec: Recognizer) -> dict[str, Any] | None:
    """The calibration entry for `rec` on this data, or None when thresholds come from this run.

    file: the exact entry or an error; nearest: else the nearest entry, with a warning;
    auto: the exact entry, else this run's clean pairs (printed with what the file differs in)."""
    source = cfg.eval.threshold_source
    if source == "in_run":
        return None
    try:
        return find_calibration(cfg.calibration_file, measured_on(cfg, rec), fallback=source == "nearest")
    except ConfigError as err:
        if source != "auto":
            raise
        print(
            f"  {rec.name}: no calibrated threshold for this data ({err}); calibrating on this run's clean pairs"
        )
        return None


def _label_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every same-identity pair, and as many different-identity pairs (in a fixed order)."""
    i, j = torch.triu_indices(len(labels), len(labels), offset=1)
    same = labels[i] == labels[j]
    genuine, impostor = torch.nonzero(same).flatten(), torch.nonzero(~same).flatten()
    impostor = impostor[torch.linspace(0, len(impostor) - 1, min(len(genuine), len(impostor))).long()]
    keep = torch.cat([genuine, impostor])
    return torch.stack([i[keep], j[keep]], dim=1), same[keep]


def in_run_thresholds(
    cfg: DictConfig, name: str, clean: torch.Tensor, labels: torch.Tensor, pairs, issame
) -> tuple[float, float, str]:
    """Best-accuracy and fixed-FAR thresholds from clean pairs of this data (or same/different labels)."""
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
    return best_threshold(scores, issame)[0], tar_at_far(scores, issame, float(FAR))[1], where


# -- the set and the data -------------------------------------------------------------------------
def check_records(
    cfg: DictConfig, dm, protected_set: ProtectedSet, records: Sequence[dict[str, Any]]
) -> None:
    """Every image of the set is the same item of this run's data; else say which data made the set."""
    ids = dm.dataset.ids
    wrong = [r for r in records if r["index"] >= len(ids) or ids[r["index"]] != r["id"]]
    if not wrong:
        return
    first = wrong[0]
    here = (
        f"is {ids[first['index']]!r}" if first["index"] < len(ids) else f"does not exist ({len(ids)} images)"
    )
    made_from, where = set_data(protected_set.dir)
    this_run = describe(describe_data(cfg.data))
    if made_from is None:
        origin = f"the set does not record its data; this run uses {this_run}"
    else:
        origin = f"the set was made from {made_from} ({where}), this run uses {this_run}"
    raise DataError(
        f"{protected_set.dir / 'manifest.jsonl'}: the set was made from other data or another subset than "
        f"this run: {len(wrong)} of {len(records)} images differ (its image {first['id']!r} is item "
        f"{first['index']}, which here {here}); {origin}. Evaluate with the data config of the run that made it"
    )


def set_data(set_dir: Path) -> tuple[str | None, str]:
    """The data a set was made from, as its folder records it: meta.json `data`, else its run's config.yaml."""
    for path in (set_dir / "meta.json", set_dir.parent / "config.yaml"):
        try:
            text = path.read_text()
            node = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)).get("data")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if isinstance(node, Mapping) and node.get("name") and node.get("root"):
            return describe(describe_data(node)), str(path)
    return None, ""


def log_grid(
    run: Run, dm, protected_set: ProtectedSet, records: Sequence[dict[str, Any]], key: str = "eval/grid"
) -> None:
    """original | F | C | (other stored stages) | protected for the first records, from stored PNGs.

    The stages were written during generation as `<set_dir>/grid/<safe_name>.<stage>.png`; the
    protected column is the set's own PNG. Without stored stages: original | protected."""
    if not records:
        return
    grid = protected_set.dir / "grid"
    stored: list[dict[str, Path]] = []
    for r in records:
        safe = safe_name(r["id"])
        files = {p.name[len(safe) + 1 : -len(".png")]: p for p in grid.glob(f"{glob.escape(safe)}.*.png")}
        stored.append(
            {s: p for s, p in files.items() if s and "." not in s and s not in ("original", "protected")}
        )
    found = set().union(*stored)
    stages = [s for s in FIRST_STAGES if s in found] + sorted(found - set(FIRST_STAGES))
    images, captions = [], []
    for r, files in zip(records, stored, strict=True):
        original = dm.dataset[r["index"]]["image"]
        columns = {"original": original}
        for s in stages:  # a face without some stage gets a grey tile there
            columns[s] = load_png(files[s]) if s in files else torch.full_like(original, 0.5)
        columns["protected"] = load_png(protected_set.dir / r["path"])
        images += list(columns.values())
        captions += [f"{r['id']}: {s}" for s in columns]
    run.log_images(key, images, captions, nrow=len(stages) + 2)
