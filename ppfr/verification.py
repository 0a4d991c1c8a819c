"""Clean face verification on a pairs list, in the spirit of insightface arcface_torch's eval/verification.py.

Embeddings: each image plus its horizontal flip, summed, L2-normalised. Scores: cosine of the
pair. Accuracy: k-fold, the best-accuracy threshold chosen on the other folds and tested on the
held-out fold (mean and std over folds). A pair counts as "same person" when score > threshold.

The calibration file keeps the thresholds later experiments use, keyed by everything they were
measured on (`measured_on`: dataset, resolved root, pairs file, subset, flip, recognizer name and
sha256), so a run on a subset or with another flip setting never replaces another's threshold.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_auroc

from ppfr.errors import ConfigError, DataError, check_choice
from ppfr.io import write_atomic
from ppfr.recognizers import Recognizer

MAX_FOLDS = 10  # folds over pair order when the pairs file's own folds cannot be used
FARS = ("1e-2", "1e-3")  # the fixed false accept rates whose thresholds are calibrated


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


def cv_folds(issame: torch.Tensor, folds: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Folds for cross-validation and the protocol's name.

    The pairs file's own folds when there are several and each leaves genuine and impostor pairs
    to choose a threshold on; otherwise up to 10 folds balanced over pair order (the k-th
    genuine/impostor pair goes to fold k*n_folds//n), as many as the rarer kind of pair allows.
    None when that is fewer than 2: too few pairs to cross-validate.
    """
    ids = folds.unique()
    if len(ids) > 1 and all(issame[folds != f].any() and (~issame[folds != f]).any() for f in ids):
        return folds, f"{len(ids)}-fold (folds of the pairs file)"
    n_folds = min(MAX_FOLDS, int(issame.sum()), int((~issame).sum()))
    if n_folds < 2:
        return None, ""
    balanced = torch.empty_like(folds)
    for label in (True, False):
        where = (issame == label).nonzero().flatten()
        balanced[where] = torch.arange(len(where)) * n_folds // len(where)
    why = "the pairs file has a single fold" if len(ids) == 1 else "a fold of the pairs file leaves one kind"
    return balanced, f"{n_folds}-fold over pair order ({why})"


def verify(scores: torch.Tensor, issame: torch.Tensor, folds: torch.Tensor) -> dict[str, Any]:
    """Verification metrics of cosine `scores` of N pairs, `issame` labels, `folds` ids from the pairs file.

    With a single genuine or impostor pair no fold is left to choose a threshold on: accuracy is
    then that of the best threshold on all pairs (optimistic; the protocol says so, std is nan).
    """
    scores, issame, folds = scores.detach().float().cpu(), issame.bool().cpu(), folds.long().cpu()
    if not len(scores) == len(issame) == len(folds):
        raise ValueError(f"verify: {len(scores)} scores, {len(issame)} labels, {len(folds)} folds")
    n_same, n_diff = int(issame.sum()), int((~issame).sum())
    if not n_same or not n_diff:
        raise DataError(
            f"verification needs genuine and impostor pairs; got {n_same} genuine and {n_diff} impostor"
        )
    threshold, best_acc = best_threshold(scores, issame)
    cv, protocol = cv_folds(issame, folds)
    if cv is None:
        acc = torch.tensor([best_acc], dtype=torch.float64)
        std = float("nan")
        protocol = (
            f"no cross-validation ({n_same} genuine, {n_diff} impostor pairs): "
            "accuracy at the best threshold on all pairs, optimistic"
        )
    else:
        accuracies = []
        for f in cv.unique():
            train, test = cv != f, cv == f
            fold_threshold, _ = best_threshold(scores[train], issame[train])
            accuracies.append(float(((scores[test] > fold_threshold) == issame[test]).float().mean()))
        acc = torch.tensor(accuracies, dtype=torch.float64)
        std = float(acc.std(unbiased=False))
    result: dict[str, Any] = {
        "accuracy": float(acc.mean()),
        "accuracy_std": std,
        "auc": float(binary_auroc(((scores + 1) / 2).clamp(0, 1), issame.long())),
        "threshold": threshold,
    }
    for far in FARS:
        tar, far_threshold = tar_at_far(scores, issame, float(far))
        result[f"tar_at_far_{far}"] = tar
        result[f"threshold_far_{far}"] = far_threshold
    return {**result, "protocol": protocol, "n_pairs": len(scores)}


# -- the calibration file -------------------------------------------------------------------------
CALIBRATION_FORMAT = 2
CALIBRATION_KEYS = ("threshold", *(f"threshold_far_{f}" for f in FARS), "accuracy", "protocol", "n_pairs")


def describe_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """What a data config selects: dataset, resolved root (or .bin file), pairs file, subset (set keys only)."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=True)
    out: dict[str, Any] = {
        "dataset": data.get("name"),
        "root": str(Path(str(data.get("root"))).expanduser().resolve()),
    }
    if data.get("pairs_file") is not None:
        out["pairs_file"] = data["pairs_file"]
    out["subset"] = {k: v for k, v in sorted((data.get("subset") or {}).items()) if v is not None}
    return out


def measured_on(cfg: DictConfig, recognizer: Recognizer) -> dict[str, Any]:
    """The key of a threshold: the data of `cfg`, its flip setting, and the recognizer's name and weights."""
    return {
        **describe_data(cfg.data),
        "flip": bool(cfg.recognizer.flip),
        "recognizer": recognizer.name,
        "sha256": getattr(recognizer, "sha256", None),
    }


def show(field: str, value: Any) -> str:
    """A key field as users write it (a subset as `pairs=2`, the full data as `all`)."""
    if field == "subset":
        return ", ".join(f"{k}={v}" for k, v in value.items()) if value else "all"
    if field == "sha256" and isinstance(value, str):
        return value[:12]
    return str(value)


def differences(calibrated: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """The key fields that differ, as 'flip: calibrated True, here False'."""
    return [
        f"{k}: calibrated {show(k, calibrated.get(k))}, here {show(k, here.get(k))}"
        for k in dict.fromkeys([*here, *calibrated])
        if calibrated.get(k) != here.get(k)
    ]


def _read_calibration(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the calibration file ({err})") from err
    if isinstance(data, dict) and data.get("format") == CALIBRATION_FORMAT:
        return list(data.get("entries", []))
    if isinstance(data, dict) and "format" not in data:
        raise ConfigError(
            f"{path}: a calibration file of an older ppfr (thresholds keyed by dataset name alone); "
            "delete it and rerun experiment=verify"
        )
    raise ConfigError(f"{path}: not a ppfr calibration file (format {CALIBRATION_FORMAT})")


def save_calibration(path: str | Path, measured: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    """Store one recognizer's thresholds under what they were measured on (atomic rewrite).

    Replaces only an entry with exactly the same key: a run on a subset, another root or another
    flip setting adds its own entry beside the others."""
    path = Path(path)
    entries = _read_calibration(path) if path.exists() else []
    entry = {"measured_on": dict(measured), **{k: result[k] for k in CALIBRATION_KEYS}}
    entries = [e for e in entries if e["measured_on"] != entry["measured_on"]] + [entry]
    text = json.dumps({"format": CALIBRATION_FORMAT, "entries": entries}, indent=2, sort_keys=True)
    write_atomic(path, text + "\n")


def find_calibration(path: str | Path, measured: Mapping[str, Any], fallback: bool = False) -> dict[str, Any]:
    """The entry measured on exactly `measured`.

    Without one it is a ConfigError naming what the nearest entry differs in; with `fallback`,
    that nearest entry of the same recognizer is returned with a warning, and its `differs` lists
    the differences. The caller must embed with the entry's `measured_on["flip"]`."""
    path = Path(path)
    name = measured.get("recognizer")
    hint = (
        f"run `python -m ppfr.fit experiment=verify recognizer={name}` with this data "
        f"({describe(measured)}) first"
    )
    if not path.is_file():
        raise ConfigError(f"{path}: calibration file not found; {hint}")
    entries = _read_calibration(path)
    for entry in entries:
        if entry["measured_on"] == dict(measured):
            return {**entry, "differs": []}
    same_model = [e for e in entries if e["measured_on"].get("recognizer") == name]
    if not same_model:
        raise ConfigError(f"{path}: no threshold for recognizer {name!r}; {hint}")
    nearest = min(reversed(same_model), key=lambda e: len(differences(e["measured_on"], measured)))
    differs = differences(nearest["measured_on"], measured)
    message = f"{path}: no threshold for {name!r} measured on this data; the nearest differs in " + "; ".join(
        differs
    )
    if not fallback:
        raise ConfigError(
            f"{message}. {hint[0].upper()}{hint[1:]}, or accept the nearest (threshold_source=nearest)"
        )
    warnings.warn(f"{message}: using it anyway", stacklevel=2)
    return {**nearest, "differs": differs}


def load_threshold(
    cfg: DictConfig, recognizer: Recognizer, key: str = "threshold", fallback: bool = False
) -> float:
    """A calibrated threshold of `recognizer` for the data and flip setting of `cfg`, from `cfg.calibration_file`.

    `key`: "threshold" (best accuracy), "threshold_far_1e-2" or "threshold_far_1e-3"."""
    check_choice("threshold key", key, CALIBRATION_KEYS[: 1 + len(FARS)])
    return float(find_calibration(cfg.calibration_file, measured_on(cfg, recognizer), fallback)[key])


def describe(measured: Mapping[str, Any]) -> str:
    """A data description in one line: `lfw at /data/lfw (pairs.txt, subset pairs=2)`."""
    extra = [measured["pairs_file"]] if measured.get("pairs_file") else []
    extra.append(f"subset {show('subset', measured.get('subset') or {})}")
    if "flip" in measured:
        extra.append(f"flip {measured['flip']}")
    return f"{measured.get('dataset')} at {measured.get('root')} ({', '.join(extra)})"
