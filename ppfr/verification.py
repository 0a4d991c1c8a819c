"""Clean face verification on a pairs list, in the spirit of insightface arcface_torch's eval/verification.py.

Embeddings: each image plus its horizontal flip, summed, L2-normalised. Scores: cosine of the
pair. Accuracy: k-fold, the best-accuracy threshold chosen on the other folds and tested on the
held-out fold (mean and std over folds). A pair counts as "same person" when score > threshold.
The calibration file keeps, per recognizer and dataset, the thresholds later experiments use.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from ppfr.errors import ConfigError
from ppfr.recognizers import Recognizer
from ppfr.run import write_atomic

FALLBACK_FOLDS = 10


def embed_batch(recognizer: Recognizer, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """Embeddings of a batch; with `flip`, summed with those of the mirrored images and re-normalised."""
    emb = recognizer(x)
    if flip:
        emb = torch.nn.functional.normalize(emb + recognizer(x.flip(-1)), dim=1)
    return emb


@torch.no_grad()
def embed(
    recognizer: Recognizer,
    dataloader: DataLoader,
    flip: bool,
    device: str | torch.device,
) -> torch.Tensor:
    """N x D embeddings of a predict dataloader (dict batches with `image` and `index`), rows by index."""
    recognizer = recognizer.to(device)
    rows: dict[int, torch.Tensor] = {}
    for batch in dataloader:
        emb = embed_batch(recognizer, batch["image"].to(device, non_blocking=True), flip)
        for i, e in zip(batch["index"].tolist(), emb.cpu(), strict=True):
            rows[i] = e
    n = len(dataloader.dataset)
    if sorted(rows) != list(range(n)):
        raise ValueError(
            f"{recognizer.name}: the dataloader yielded {len(rows)} distinct indices, expected 0..{n - 1}"
        )
    return torch.stack([rows[i] for i in range(n)])


def best_threshold(scores: torch.Tensor, issame: torch.Tensor) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `score > threshold`; thresholds lie midway between scores."""
    s, order = scores.double().sort()
    same = issame[order].long()
    n = len(s)
    # Cut k: pairs [k:] are called same. Correct = genuine at or above k + impostors below k.
    genuine_above = torch.cat([same.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.long)])
    impostor_below = torch.cat([torch.zeros(1, dtype=torch.long), (1 - same).cumsum(0)])
    correct = genuine_above + impostor_below
    valid = torch.ones(n + 1, dtype=torch.bool)
    valid[1:n] = s[1:] > s[:-1]  # no cut between equal scores
    correct[~valid] = -1
    k = int(correct.argmax())
    if k == 0:
        threshold = float(s[0]) - 1e-6
    elif k == n:
        threshold = float(s[-1]) + 1e-6
    else:
        threshold = float(s[k - 1] + s[k]) / 2
    return threshold, float(correct[k]) / n


def tar_at_far(scores: torch.Tensor, issame: torch.Tensor, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the lowest threshold whose false accept rate is at most `far`."""
    impostor = scores[~issame].double().sort(descending=True).values
    genuine = scores[issame].double()
    allowed = math.floor(far * len(impostor) + 1e-9)  # accepted impostors: those strictly above the threshold
    threshold = float(impostor[allowed]) if allowed < len(impostor) else float(impostor[-1]) - 1e-6
    return float((genuine > threshold).double().mean()), threshold


def verify(scores: torch.Tensor, issame: torch.Tensor, folds: torch.Tensor) -> dict[str, Any]:
    """Verification metrics of cosine `scores` of N pairs, `issame` labels, `folds` ids from the pairs file."""
    scores, issame, folds = scores.detach().float().cpu(), issame.bool().cpu(), folds.long().cpu()
    if not (len(scores) == len(issame) == len(folds)) or not issame.any() or issame.all():
        raise ValueError("verify needs equal-length scores/issame/folds with both genuine and impostor pairs")
    fold_ids = folds.unique()
    if len(fold_ids) > 1:
        protocol = f"{len(fold_ids)}-fold (folds of the pairs file)"
    else:
        # Balanced split over pair order: the k-th genuine (impostor) pair goes to fold k*10//n_genuine.
        folds = torch.empty_like(folds)
        for label in (True, False):
            where = (issame == label).nonzero().flatten()
            folds[where] = torch.arange(len(where)) * FALLBACK_FOLDS // len(where)
        fold_ids = folds.unique()
        protocol = f"{len(fold_ids)}-fold over pair order (the pairs file has a single fold)"
    accuracies = []
    for f in fold_ids:
        train, test = folds != f, folds == f
        threshold, _ = best_threshold(scores[train], issame[train])
        accuracies.append(float(((scores[test] > threshold) == issame[test]).float().mean()))
    acc = torch.tensor(accuracies, dtype=torch.float64)
    threshold, _ = best_threshold(scores, issame)
    tar2, _ = tar_at_far(scores, issame, 1e-2)
    tar3, threshold3 = tar_at_far(scores, issame, 1e-3)
    return {
        "accuracy": float(acc.mean()),
        "accuracy_std": float(acc.std(unbiased=False)),
        "auc": float(binary_auroc(((scores + 1) / 2).clamp(0, 1), issame.long())),
        "tar_at_far_1e-2": tar2,
        "tar_at_far_1e-3": tar3,
        "threshold": threshold,
        "threshold_far_1e-3": threshold3,
        "protocol": protocol,
        "n_pairs": len(scores),
    }


CALIBRATION_KEYS = ("threshold", "threshold_far_1e-3", "accuracy", "protocol", "n_pairs")


def _read_calibration(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the calibration file ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a calibration file holds {{recognizer: {{dataset: {{...}}}}}}")
    return data


def save_calibration(
    path: str | Path, recognizer_name: str, dataset_name: str, result: dict[str, Any]
) -> None:
    """Merge one recognizer/dataset calibration into the JSON file (atomic rewrite)."""
    path = Path(path)
    data = _read_calibration(path) if path.exists() else {}
    data.setdefault(recognizer_name, {})[dataset_name] = {k: result[k] for k in CALIBRATION_KEYS}
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_threshold(
    path: str | Path, recognizer_name: str, dataset_name: str, key: str = "threshold"
) -> float:
    """A calibrated threshold (`key`: "threshold" = best accuracy, or "threshold_far_1e-3")."""
    path = Path(path)
    hint = "run `python -m ppfr.fit experiment=verify` on that dataset first"
    if not path.is_file():
        raise ConfigError(f"{path}: calibration file not found; {hint}")
    entry = _read_calibration(path).get(recognizer_name, {}).get(dataset_name)
    if entry is None or key not in entry:
        raise ConfigError(
            f"{path}: no {key} for recognizer {recognizer_name!r} on dataset {dataset_name!r}; {hint}"
        )
    return float(entry[key])
