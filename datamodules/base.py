"""What every face dataset shares: records -> aligned crops -> a Dataset, pair tensors and a report.

A format module only lists its images (``Record``) and verification pairs (``Pair``) in
``scan()``; subsetting, alignment through the cache, the no-face policy, labels, loaders and the
report live here, so every format behaves the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ppfr.align import ON_NO_FACE, Aligner, progress_bar, unreadable
from ppfr.errors import ConfigError, DataError, check_choice
from ppfr.registry import Registry

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SUBSET_KEYS = ("identities", "folds", "pairs")
AUGMENT_KEYS = ("hflip", "affine", "color_jitter")
ALIGN_CHUNK = 256  # images aligned per call, so a large dataset never holds all crops in memory
NO_IDENTITY = -1  # label of images whose identity the format does not say (insightface .bin)

DATAMODULES: Registry[type[FaceDataModule]] = Registry("dataset", key="data.name")


class Record(NamedTuple):
    """One source image: a file, or encoded bytes of an already aligned crop (.bin)."""

    source: Path | bytes
    identity: str | None
    id: str  # stable: path relative to the dataset root (posix), or "{i:06d}" for .bin


class Pair(NamedTuple):
    """A verification pair of record indices."""

    i: int
    j: int
    issame: bool
    fold: int


@dataclass(frozen=True)
class Item:
    """Where one aligned crop comes from: a cache PNG, an in-memory crop, or encoded bytes."""

    id: str
    label: int
    file: Path | None = None
    crop: np.ndarray | None = None
    data: bytes | None = None

    def load(self) -> np.ndarray:
        if self.crop is not None:
            return self.crop
        if self.file is not None:
            image = cv2.imread(str(self.file), cv2.IMREAD_COLOR)
            if image is None:
                raise DataError(f"{self.file}: cannot read aligned crop from the cache (delete it)")
            return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return decode_bytes(self.data or b"", self.id)


def decode_bytes(data: bytes, name: str) -> np.ndarray:
    """Decode encoded image bytes (JPEG/PNG) to RGB, as insightface's no-mxnet readers do."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{name}: cannot decode image bytes")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class FaceDataset(Dataset):
    """Aligned crops as dicts: image (3xHxW float in [0, 1]), label, index, id."""

    def __init__(self, items: Sequence[Item], transform: Any = None) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        """Stable image ids in dataset order (what protected sets and reports are keyed by)."""
        return [item.id for item in self.items]

    @property
    def labels(self) -> list[int]:
        return [item.label for item in self.items]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        crop = item.load()
        if self.transform is not None:
            crop = self.transform(image=crop)["image"]
        image = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255)
        return {"image": image, "label": item.label, "index": index, "id": item.id}


def build_augment(augment: Mapping[str, float] | None):
    """Training augmentation from ``{hflip: p, affine: p, color_jitter: p}``; None when all off."""
    if not augment:
        return None
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"data.augment: unknown key(s) {unknown}; valid keys: {list(AUGMENT_KEYS)}")
    import albumentations as A

    steps = []
    if augment.get("hflip"):
        steps.append(A.HorizontalFlip(p=float(augment["hflip"])))
    if augment.get("affine"):
        # Small moves only: the crop must stay close to the template the region masks assume.
        steps.append(
            A.Affine(
                translate_percent=(-0.04, 0.04),
                scale=(0.95, 1.05),
                rotate=(-8, 8),
                p=float(augment["affine"]),
            )
        )
    if augment.get("color_jitter"):
        steps.append(
            A.ColorJitter(
                brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=float(augment["color_jitter"])
            )
        )
    return A.Compose(steps) if steps else None


def natural_key(text: str) -> tuple:
    """Sort "9" before "10" (CelebA identity numbers) and names alphabetically."""
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted; hidden files are ignored."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    return path


def check_disjoint_identities(dm: FaceDataModule, other: FaceDataModule, key: str, why: str) -> None:
    """Refuse the set `dm` (config key `key`) when it shares an identity with `other` (or cannot say)."""
    names, other_names = set(dm.label_names), set(other.label_names)
    if not names or not other_names:
        raise ConfigError(
            f"{key}: cannot check that its identities and those of {other.root} are disjoint: "
            f"{dm.root if not names else other.root} has no identity labels"
        )
    shared = sorted(names & other_names)
    if shared:
        raise ConfigError(
            f"{key}.root={dm.root} shares {len(shared)} identities with {other.root} "
            f"(e.g. {', '.join(shared[:3])}); {why}"
        )


class FaceDataModule(L.LightningDataModule):
    """A face dataset aligned to 112x112 through the cache, with verification pairs if it has any.

    After ``setup()``: ``dataset`` (FaceDataset; ``train_dataset`` is the same with augmentation),
    ``pairs`` (LongTensor Nx2 of dataset indices), ``issame`` (BoolTensor N), ``folds`` (LongTensor
    N), ``label_names`` (identity of each label) and ``report`` (counts, fallbacks, timing).
    ``subset`` keeps the first ``identities`` identities (natural sort order), then the pairs of
    ``folds`` (numbered from 1 in the pairs file's order; LFW's folds are disjoint in people, so a
    later fold holds faces never used for tuning), then the first ``pairs`` pairs (folds in order,
    half genuine and half impostor); images are then limited to those identities / the images the
    chosen pairs name.
    """

    dataset_name = "faces"

    def __init__(
        self,
        root: str | Path,
        batch_size: int = 32,
        num_workers: int = 0,
        subset: Mapping[str, int | list[int] | None] | None = None,
        on_no_face: str = "error",
        cache_dir: str | Path | None = ".cache/ppfr/aligned",
        augment: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        subset = dict(subset or {})
        unknown = sorted(set(subset) - set(SUBSET_KEYS))
        if unknown:
            raise ConfigError(f"data.subset: unknown key(s) {unknown}; valid keys: {list(SUBSET_KEYS)}")
        for key, value in subset.items():
            if key == "folds":
                ok = isinstance(value, (list, tuple)) and value and all(positive(v) for v in value)
                kind = "a non-empty list of fold numbers (1 = the first)"
            else:
                ok, kind = positive(value), "a positive integer"
            if value is not None and not ok:
                raise ConfigError(f"data.subset.{key}: {value!r} must be {kind} or null")
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.subset = subset
        self.on_no_face = on_no_face
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.augment = dict(augment or {})
        self.train_transform = build_augment(self.augment)
        check_choice("data.on_no_face", on_no_face, ON_NO_FACE)
        # The cache keeps the detection outcome, so one aligner serves every no-face policy: it
        # always returns the centre crop, and setup() applies on_no_face to the whole dataset.
        self.aligner = Aligner(self.cache_dir, on_no_face="center_crop")
        self._index: tuple[list[Record], list[Pair]] | None = None
        self._aligned: list[dict[str, Any]] | None = None
        self._align_stats: dict[str, Any] = {}
        self._dataset: FaceDataset | None = None

    # -- what a format implements -------------------------------------------------------------
    def scan(self) -> tuple[list[Record], list[Pair]]:
        """List every image of the dataset and its verification pairs (empty list if none)."""
        raise NotImplementedError

    # -- index and subset ---------------------------------------------------------------------
    def index(self) -> tuple[list[Record], list[Pair]]:
        """The records and pairs after ``subset``, without aligning anything."""
        if self._index is None:
            if not self.root.exists():
                raise DataError(f"{self.root}: dataset root not found")
            records, pairs = self.scan()
            if not records:
                raise DataError(f"{self.root}: no images found for dataset {self.dataset_name!r}")
            self._index = self._select(records, pairs)
        return self._index

    def _select(self, records: list[Record], pairs: list[Pair]) -> tuple[list[Record], list[Pair]]:
        keep = np.ones(len(records), dtype=bool)
        n_ids = self.subset.get("identities")
        if n_ids is not None:
            names = sorted({r.identity for r in records if r.identity is not None}, key=natural_key)
            chosen = set(names[:n_ids])
            keep = np.array([r.identity in chosen for r in records])
            pairs = [p for p in pairs if keep[p.i] and keep[p.j]]
        folds = self.subset.get("folds")
        if folds is not None:
            present = sorted({p.fold + 1 for p in pairs})
            missing = sorted(set(folds) - set(present))
            if missing:
                raise ConfigError(
                    f"data.subset.folds: {self.root} has no pairs in fold(s) {missing}; its folds: {present}"
                )
            pairs = [p for p in pairs if p.fold + 1 in folds]
            keep = np.zeros(len(records), dtype=bool)
            for p in pairs:
                keep[p.i] = keep[p.j] = True
        n_pairs = self.subset.get("pairs")
        if n_pairs is not None:
            if not pairs:
                raise ConfigError(
                    f"data.subset.pairs: dataset {self.dataset_name!r} at {self.root} has no pairs"
                    + (" among the chosen identities" if n_ids is not None else "")
                )
            ordered = sorted(range(len(pairs)), key=lambda k: (pairs[k].fold, k))
            n_same = math.ceil(n_pairs / 2)
            same = [k for k in ordered if pairs[k].issame][:n_same]
            diff = [k for k in ordered if not pairs[k].issame][: n_pairs - len(same)]
            pairs = [pairs[k] for k in sorted(set(same + diff), key=lambda k: (pairs[k].fold, k))]
            keep = np.zeros(len(records), dtype=bool)
            for p in pairs:
                keep[p.i] = keep[p.j] = True
        return self._renumber(records, pairs, keep)

    @staticmethod
    def _renumber(
        records: list[Record], pairs: list[Pair], keep: np.ndarray
    ) -> tuple[list[Record], list[Pair]]:
        new_index = np.cumsum(keep) - 1
        kept = [r for r, k in zip(records, keep, strict=True) if k]
        moved = [
            Pair(int(new_index[p.i]), int(new_index[p.j]), p.issame, p.fold)
            for p in pairs
            if keep[p.i] and keep[p.j]
        ]
        return kept, moved

    # -- alignment ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Align every needed image into the cache (Lightning runs this on rank 0 only)."""
        self._align()

    def _align(self) -> list[dict[str, Any]]:
        """Per record: status (detected|no_face|prealigned), cache hit, and cache file or crop."""
        if self._aligned is not None:
            return self._aligned
        records, _ = self.index()
        start = time.perf_counter()
        out: list[dict[str, Any]] = [{"status": "prealigned", "hit": None}] * len(records)
        files, errors = [], []
        for k, record in enumerate(records):
            if isinstance(record.source, bytes):
                try:
                    decode_bytes(record.source, f"image {record.id}")  # fail early on bad bytes
                except DataError as err:
                    errors.append(err)
            else:
                files.append((k, record.source))
        with progress_bar(len(files), str(self.root)) as bar:
            for begin in range(0, len(files), ALIGN_CHUNK):
                chunk = files[begin : begin + ALIGN_CHUNK]
                found = self.aligner.align_many([p for _, p in chunk], errors=errors, progress=bar)
                for (k, _), res in zip(chunk, found, strict=True):
                    if res is not None:
                        out[k] = {
                            "status": "detected" if res.status == "detected" else "no_face",
                            "hit": res.cache_hit,
                            "file": res.cache_file,
                            "crop": res.crop if res.cache_file is None else None,  # no cache: keep in memory
                        }
        if errors:
            raise unreadable(errors, self.root)
        seconds = time.perf_counter() - start
        self._align_stats = {
            "cache_hits": sum(o["hit"] is True for o in out),
            "cache_misses": sum(o["hit"] is False for o in out),
            "seconds": round(seconds, 3),
            "images_per_s": round(len(records) / seconds, 1) if seconds > 0 else None,
            "torch_threads": torch.get_num_threads(),
        }
        self._aligned = out
        return out

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build dataset, pair tensors and report; aligns whatever prepare_data did not."""
        if self._dataset is not None:
            return
        all_records, all_pairs = self.index()
        aligned = self._align()
        no_face = [r.id for r, a in zip(all_records, aligned, strict=True) if a["status"] == "no_face"]
        if no_face and self.on_no_face == "error":
            shown = ", ".join(str(self.root / i) for i in no_face[:10])
            more = f" and {len(no_face) - 10} more" if len(no_face) > 10 else ""
            raise DataError(
                f"{self.root}: no face was detected in {len(no_face)} image(s): {shown}{more} "
                "(set data.on_no_face to center_crop or skip to accept them)"
            )
        keep = np.array([a["status"] != "no_face" or self.on_no_face == "center_crop" for a in aligned])
        dropped = [p for p in all_pairs if not (keep[p.i] and keep[p.j])]
        records, pairs = self._renumber(all_records, all_pairs, keep)
        aligned = [a for a, k in zip(aligned, keep, strict=True) if k]

        names = sorted({r.identity for r in records if r.identity is not None}, key=natural_key)
        label_of = {name: n for n, name in enumerate(names)}
        items = []
        for record, a in zip(records, aligned, strict=True):
            label = NO_IDENTITY if record.identity is None else label_of[record.identity]
            if isinstance(record.source, bytes):
                items.append(Item(record.id, label, data=record.source))
            else:
                items.append(Item(record.id, label, file=a["file"], crop=a["crop"]))
        self._train_dataset = FaceDataset(items, self.train_transform)
        self._pairs = torch.tensor([[p.i, p.j] for p in pairs], dtype=torch.long).reshape(-1, 2)
        self._issame = torch.tensor([p.issame for p in pairs], dtype=torch.bool)
        self._folds = torch.tensor([p.fold for p in pairs], dtype=torch.long)
        self._label_names = names
        skipped = no_face if self.on_no_face == "skip" else []
        self._report = {
            "dataset": self.dataset_name,
            "root": str(self.root),
            "images": len(items),
            "identities": len(names),
            "pairs": len(pairs),
            "genuine_pairs": int(self._issame.sum()),
            "detected": sum(a["status"] == "detected" for a in aligned),
            "prealigned": sum(a["status"] == "prealigned" for a in aligned),
            "no_face": len(no_face),
            "fallbacks": {
                "center_crop": no_face if self.on_no_face == "center_crop" else [],
                "skipped": skipped,
            },
            "pairs_dropped": len(dropped),
            "dropped_pairs": [[all_records[p.i].id, all_records[p.j].id] for p in dropped],
            **self._align_stats,
        }
        self._dataset = FaceDataset(items)  # last: it marks setup as done

    # -- what tasks read (each aligns and sets up on first use) ----------------------------------
    @property
    def dataset(self) -> FaceDataset:
        """The aligned images, in a fixed order (the ids protected sets and reports are keyed by)."""
        self.setup()
        return self._dataset  # type: ignore[return-value]

    @property
    def train_dataset(self) -> FaceDataset:
        """The same images with the training augmentation."""
        self.setup()
        return self._train_dataset

    @property
    def pairs(self) -> torch.Tensor:
        """N x 2 dataset indices of the verification pairs."""
        self.setup()
        return self._pairs

    @property
    def issame(self) -> torch.Tensor:
        self.setup()
        return self._issame

    @property
    def folds(self) -> torch.Tensor:
        self.setup()
        return self._folds

    @property
    def label_names(self) -> list[str]:
        """The identity of each label."""
        self.setup()
        return self._label_names

    @property
    def report(self) -> dict[str, Any]:
        """Counts, no-face fallbacks, dropped pairs and alignment timing."""
        self.setup()
        return self._report

    def pairs_within(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pairs, issame, folds) of the pairs whose two images are both in `indices`, re-indexed to
        positions in `indices` (e.g. the rows of embeddings computed for those images)."""
        row = {int(i): k for k, i in enumerate(indices)}
        keep = [n for n, (i, j) in enumerate(self.pairs.tolist()) if i in row and j in row]
        pairs = [[row[i], row[j]] for i, j in self.pairs[keep].tolist()]
        return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2), self.issame[keep], self.folds[keep]

    # -- loaders --------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, with the configured augmentation."""
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset)

    def predict_dataloader(
        self, indices: Sequence[int] | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """Batches (dicts of image, label, index, id; `index` is the dataset index) in dataset order,
        over every image or only `indices`, of `batch_size` (default: data.batch_size)."""
        dataset = self.dataset if indices is None else Subset(self.dataset, list(indices))
        return self._loader(dataset, batch_size=batch_size)
