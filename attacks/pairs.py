"""Training pairs (X', X) for an attacker: a protected set of training identities, written once and reused.

The set is written with the generation module (resumable: a rerun adds only what is missing, so
`attack.pairs.count` can grow across runs). Methods whose attacker input is not the visible image
X' (DCT channels) and `pairs.resample_each_epoch=true` write no set: the training step computes a
fresh X' per image and epoch instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from ppfr.config import to_dict
from ppfr.errors import ConfigError, DataError
from ppfr.generate import ProtectedSet, config_hash, generate
from ppfr.io import load_png
from ppfr.protect import ProtectionMethod
from ppfr.run import Run
from ppfr.verification import describe_data

AUGMENT_KEYS = ("hflip", "crop")


def stores_images(method: ProtectionMethod) -> bool:
    """True when the attacker sees the visible X' (what a protected set stores as PNG)."""
    return type(method).attacker_input is ProtectionMethod.attacker_input


def set_dir(
    configured: str | None, cfg: DictConfig, method_record: Mapping[str, Any], data_cfg: DictConfig, kind: str
) -> Path:
    """`configured`, else the protected set of one method config and data (training pairs, or the test
    set), shared by every attacker run that uses them: `<paths.outputs>/<kind>/<method>-<hash>`."""
    if configured:
        return Path(configured)
    key = config_hash({"method": dict(method_record), "data": describe_data(data_cfg), "seed": cfg.seed})
    return Path(cfg.paths.outputs) / kind / f"{method_record.get('name', 'method')}-{key}"


def protect_images(
    cfg: DictConfig,
    run: Run,
    method: ProtectionMethod,
    method_record: Mapping[str, Any],
    models: Mapping[str, str | None],
    dm,
    data_cfg: DictConfig,
    indices: Sequence[int],
    out_dir: Path,
) -> list[dict[str, Any]]:
    """Protect `dm.dataset[indices]` into the set at `out_dir` (resuming it); its records, in `indices` order,
    on every process (they all train on the pairs).

    The set is bound to all of `dm`'s ids, so a later run may add more of them. `models`: the
    method's surrogates' sha256 by name."""
    out = ProtectedSet(out_dir, cfg.generate.shard_size)
    ids = dm.dataset.ids
    digest = out.bind(dict(method_record), cfg.seed, ids, models, data=to_dict(data_cfg))
    generate(cfg, run, dm, method, out, digest, indices, curve_key=f"convergence_{out.dir.name}")
    done = out.records()
    missing = [ids[i] for i in indices if ids[i] not in done]
    if missing:
        raise DataError(f"{out.dir}: {len(missing)} images were not written (first: {missing[:3]}); rerun")
    return [{**done[ids[i]], "file": str(out.dir / done[ids[i]]["path"])} for i in indices]


def split_identities(names: Sequence[str], fraction: float) -> set[str]:
    """Validation identities: those whose name hashes below `fraction` (so an identity stays on its
    side as the pair count grows), at least one when fraction > 0, never all."""
    unique = sorted(set(names))
    if fraction <= 0 or len(unique) < 2:
        return set()
    score = {
        n: int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little") / 2**64
        for n in unique
    }
    val = {n for n in unique if score[n] < fraction} or {min(unique, key=score.__getitem__)}
    if len(val) == len(unique):
        val.remove(max(val, key=score.__getitem__))
    return val


def build_augment(augment: Mapping[str, Any] | None):
    """The same flip and crop on X' and X (applied to both stacked along channels)."""
    augment = dict(augment or {})
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"attack.augment: unknown key(s) {unknown}; valid keys: {list(AUGMENT_KEYS)}")
    import albumentations as A

    steps = []
    if augment.get("hflip"):
        steps.append(A.HorizontalFlip(p=float(augment["hflip"])))
    if augment.get("crop"):
        size = int(augment["crop"])
        steps.append(A.RandomCrop(height=size, width=size))
    return A.Compose(steps) if steps else None


class PairDataset(Dataset):
    """Items `{"input": X', "target": X, "id"}` (stored X') or `{"target": X, "id"}` (X' computed later).

    `files[k]` is the stored X' of `dataset[indices[k]]`, or None for X' on the fly."""

    def __init__(
        self, dataset: Dataset, indices: Sequence[int], files: Sequence[str | None], augment=None
    ) -> None:
        self.dataset, self.indices, self.files, self.augment = dataset, list(indices), list(files), augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        item = self.dataset[self.indices[k]]
        target = item["image"]
        protected = load_png(Path(self.files[k])) if self.files[k] is not None else None
        if self.augment is not None:
            stack = target if protected is None else torch.cat([protected, target])
            out = self.augment(image=np.ascontiguousarray(stack.permute(1, 2, 0).numpy()))["image"]
            stack = torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1)
            protected, target = (None, stack) if protected is None else (stack[:3], stack[3:])
        pair = {"target": target, "id": item["id"]}
        if protected is not None:
            pair["input"] = protected
        return pair


class PairData(L.LightningDataModule):
    """Shuffled training pairs and the validation pairs (identities held out of training)."""

    def __init__(self, train: Dataset, val: Dataset | None, batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.num_workers = batch_size, num_workers

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._loader(self.val, shuffle=False)


def training_pairs(
    cfg: DictConfig,
    run: Run,
    method: ProtectionMethod,
    method_record: Mapping[str, Any],
    models: Mapping[str, str | None],
    train_dm,
) -> tuple[PairData, dict[str, Any]]:
    """The attacker's data from `cfg.attack`: the first `pairs.count` training images, their X'
    (stored, or on the fly), a validation split by identity, and the paired augmentation."""
    acfg = cfg.attack
    n = len(train_dm.dataset)
    count = int(acfg.pairs.count)
    if count < 2:
        raise ConfigError(f"attack.pairs.count={count}: need at least 2 training pairs")
    indices = list(range(min(count, n)))
    if acfg.pairs.resample_each_epoch and not method.stochastic:
        raise ConfigError(
            f"attack.pairs.resample_each_epoch=true: protection {type(method).__name__} is deterministic, "
            "so every epoch would see the same X'; set it to false"
        )
    stored = stores_images(method) and not acfg.pairs.resample_each_epoch
    if stored:
        out_dir = set_dir(acfg.pairs.dir, cfg, method_record, acfg.train_data, "attack_pairs")
        written = protect_images(
            cfg, run, method, method_record, models, train_dm, cfg.attack.train_data, indices, out_dir
        )
        files = [r["file"] for r in written]
    else:
        out_dir, files = None, [None] * len(indices)
    labels = train_dm.dataset.labels
    names = [train_dm.label_names[labels[i]] for i in indices]
    val_names = split_identities(names, float(acfg.val_fraction))
    train_k = [k for k, name in enumerate(names) if name not in val_names]
    val_k = [k for k, name in enumerate(names) if name in val_names]
    # On the fly the augmentation moves X before the method computes X': the pair stays consistent.
    augment = build_augment(to_dict(acfg.augment))

    def subset(ks: list[int], aug) -> PairDataset:
        return PairDataset(train_dm.dataset, [indices[k] for k in ks], [files[k] for k in ks], aug)

    data = PairData(
        subset(train_k, augment),
        subset(val_k, None) if val_k else None,
        int(acfg.batch_size),
        int(acfg.num_workers),
    )
    report = {
        "pairs_requested": count,
        "pairs_available": n,
        "pairs_used": len(indices),
        "train_pairs": len(train_k),
        "val_pairs": len(val_k),
        "train_identities": len(set(names) - val_names),
        "val_identities": len(val_names),
        "pairs_dir": str(out_dir) if out_dir else None,
        "x_prime": "stored" if stored else "on the fly, fresh each epoch",
    }
    if count > n:
        print(f"attack: pairs.count={count} but the training data has {n} images: using {n}")
    return data, report
