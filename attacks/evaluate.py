"""How much a protection leaks to a trained attacker, on the test set.

SSIM and PSNR of the reconstruction against X (and of X' itself, for reference); re-identification:
the share of reconstructions each black box matches to the original at its calibrated threshold,
next to the same share for X'. Streams over the test set; keeps only embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from attacks.pairs import stores_images
from ppfr.devices import device as device_of
from ppfr.evaluate import blackbox_metrics, calibration, in_run_thresholds
from ppfr.io import load_png
from ppfr.protect import ProtectionMethod
from ppfr.recognizers import Recognizer
from ppfr.run import Run, format_table
from ppfr.verification import embed_batch

FAR = "1e-3"


@torch.no_grad()
def evaluate(
    cfg: DictConfig,
    run: Run,
    attacker: torch.nn.Module,
    method: ProtectionMethod,
    test_dm,
    records: Sequence[Mapping[str, Any]],
    blackbox: Sequence[Recognizer],
) -> dict[str, Any]:
    """Reconstruct every test image from its X' (the records of the test protected set) and measure."""
    device = device_of(cfg)
    attacker = attacker.to(device).eval()
    method = method.to(device)
    blackbox = [r.to(device) for r in blackbox]
    entries = {r.name: calibration(cfg, r) for r in blackbox}
    flips = {n: e["measured_on"]["flip"] if e else bool(cfg.recognizer.flip) for n, e in entries.items()}
    by_index = {r["index"]: r for r in records}
    indices = [r["index"] for r in records]
    stored = stores_images(method)
    image: dict[str, list[torch.Tensor]] = {k: [] for k in ("ssim_x", "psnr_x", "ssim_r", "psnr_r")}
    emb: dict[str, dict[str, list[torch.Tensor]]] = {r.name: {"x": [], "xp": [], "r": []} for r in blackbox}
    grid: list[torch.Tensor] = []
    for batch in test_dm.predict_dataloader(indices=indices, batch_size=cfg.eval.batch_size):
        chunk = [by_index[i] for i in batch["index"].tolist()]
        x = batch["image"].to(device)
        xp = torch.stack([load_png(Path(r["file"])) for r in chunk]).to(device)
        if stored:
            given = xp
        else:  # the same X' as stored: the method is deterministic given the recorded seed
            seeds = torch.tensor([r["seed"] for r in chunk], dtype=torch.int64, device=device)
            with torch.enable_grad():
                given = method.attacker_input(x.clone(), seeds).detach()
        recon = attacker(given, x.shape[-2:]).float()
        for key, y in (("x", xp), ("r", recon)):
            image[f"ssim_{key}"].append(
                structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
            )
            image[f"psnr_{key}"].append(
                peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
            )
        for rec in blackbox:
            for key, y in (("x", x), ("xp", xp), ("r", recon)):
                emb[rec.name][key].append(embed_batch(rec, y, flips[rec.name]).float().cpu())
        grid += [torch.cat([a, b, c], dim=-1).cpu() for a, b, c in zip(xp, recon, x, strict=True)]
        grid = grid[: cfg.attack.grid]
    mean = {k: torch.cat(v).mean().item() for k, v in image.items()}
    labels = torch.tensor([r["label"] for r in records])
    pairs, issame, _ = test_dm.pairs_within(indices)
    reid: dict[str, dict[str, Any]] = {}
    for rec in blackbox:
        clean, xp_emb, r_emb = (torch.cat(emb[rec.name][k]) for k in ("x", "xp", "r"))
        entry = entries[rec.name]
        if entry is not None:
            thr, thr_far, source = entry["threshold"], entry[f"threshold_far_{FAR}"], "file"
        else:
            thr, thr_far, _ = in_run_thresholds(cfg, rec.name, clean, labels, pairs, issame)
            source = "clean pairs of this run"
        on_xp = blackbox_metrics(clean, xp_emb, labels, thr, threshold_far=thr_far)
        on_r = blackbox_metrics(clean, r_emb, labels, thr, threshold_far=thr_far)
        reid[rec.name] = {
            "match_recon": on_r["match"],
            "match_protected": on_xp["match"],
            f"match_far_{FAR}_recon": on_r["match_far"],
            f"match_far_{FAR}_protected": on_xp["match_far"],
            "cos_recon": on_r["cos_mean"],
            "cos_protected": on_xp["cos_mean"],
            "far_recon": on_r["far_protected"],
            "threshold": thr,
            f"threshold_far_{FAR}": thr_far,
            "threshold_source": source,
            "flip": flips[rec.name],
        }
    summary = {
        "n_images": len(records),
        "ssim_recon": mean["ssim_r"],
        "psnr_recon": mean["psnr_r"],
        "ssim_protected": mean["ssim_x"],
        "psnr_protected": mean["psnr_x"],
        "reid_recon_mean": sum(m["match_recon"] for m in reid.values()) / max(1, len(reid)),
        "reid_protected_mean": sum(m["match_protected"] for m in reid.values()) / max(1, len(reid)),
    }
    columns = [
        "recognizer",
        "thr",
        "match X'",
        "match recon",
        f"X'@FAR{FAR}",
        f"recon@FAR{FAR}",
        "cos X'",
        "cos recon",
    ]
    rows = [
        [n, m["threshold"], m["match_protected"], m["match_recon"], m[f"match_far_{FAR}_protected"],
         m[f"match_far_{FAR}_recon"], m["cos_protected"], m["cos_recon"]]
        for n, m in reid.items()
    ]  # fmt: skip
    print(
        f"attack: {summary['n_images']} test images: reconstruction SSIM {summary['ssim_recon']:.4f} "
        f"PSNR {summary['psnr_recon']:.2f} dB (X' itself: SSIM {summary['ssim_protected']:.4f} "
        f"PSNR {summary['psnr_protected']:.2f} dB)"
    )
    print(format_table(columns, rows))
    run.log_table("attack/reid", columns, rows)
    run.log_metrics({f"attack/{k}": float(v) for k, v in summary.items()})
    if grid:
        captions = [f"{r['id']}: X' | reconstruction | X" for r in records[: len(grid)]]
        run.log_images("attack/grid", grid, captions)
    return {"summary": summary, "reid": reid}
