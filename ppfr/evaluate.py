"""How well a protected set protects: image similarity to the original and black-box recognition.

Streams over the set in batches (memory does not grow with its size) and keeps only embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ppfr.generate import load_png
from ppfr.recognizers import Recognizer
from ppfr.verification import embed_batch, verify

MIN_PAIRS_PER_CLASS = 10  # below this, k-fold pair accuracy is not reported


@torch.no_grad()
def embed_sets(
    dataset: Dataset,
    records: Sequence[dict[str, Any]],
    root: Path,
    recognizers: Sequence[Recognizer],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    flip: bool = False,
) -> tuple[dict[str, float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SSIM/PSNR of X' against X, and clean/protected embeddings per recognizer (rows follow `records`).

    `flip` sums each embedding with that of the mirrored image, as the verification protocol
    does, so that thresholds calibrated there apply here."""
    ssim, psnr = [], []
    clean = {r.name: [] for r in recognizers}
    prot = {r.name: [] for r in recognizers}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        x = torch.stack([dataset[r["index"]]["image"] for r in chunk]).to(device)
        xp = torch.stack([load_png(root / r["path"]) for r in chunk]).to(device)
        ssim.append(structural_similarity_index_measure(xp, x, data_range=1.0, reduction="none"))
        psnr.append(peak_signal_noise_ratio(xp, x, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        for rec in recognizers:
            clean[rec.name].append(embed_batch(rec, x, flip).float().cpu())
            prot[rec.name].append(embed_batch(rec, xp, flip).float().cpu())
    image = {
        "ssim": torch.cat(ssim).mean().item(),
        "psnr": torch.cat(psnr).mean().item(),
        "n_images": len(records),
    }
    return image, {k: torch.cat(v) for k, v in clean.items()}, {k: torch.cat(v) for k, v in prot.items()}


def _cross_identity_far(
    probe: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor, threshold: float
) -> float:
    """Share of (a, b) with different identities whose cos(probe_a, gallery_b) passes the threshold."""
    accepted, total = 0, 0
    for start in range(0, len(probe), 1024):
        sims = probe[start : start + 1024] @ gallery.T
        other = labels[start : start + 1024, None] != labels[None, :]
        accepted += int((sims[other] > threshold).sum())
        total += int(other.sum())
    return accepted / total if total else float("nan")


def blackbox_metrics(
    clean: torch.Tensor,
    protected: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    pairs: torch.Tensor | None = None,
    issame: torch.Tensor | None = None,
    folds: torch.Tensor | None = None,
) -> dict[str, float]:
    """One black-box recognizer's view of a protected set (rows of `clean`/`protected` align).

    `pairs` index those rows. `match` is the share of faces with cos(f(X), f(X')) above the
    recognizer's calibrated threshold; the FARs compare protected and clean probes against clean
    images of other identities at that same threshold.
    """
    cos = F.cosine_similarity(clean, protected, dim=1)
    out = {
        "match": float((cos > threshold).float().mean()),
        "cos_mean": float(cos.mean()),
        "threshold": threshold,
        "far_protected": _cross_identity_far(protected, clean, labels, threshold),
        "far_clean": _cross_identity_far(clean, clean, labels, threshold),
    }
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
