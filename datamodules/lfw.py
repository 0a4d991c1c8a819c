"""LFW layout: ``<root>/<name>/<name>_NNNN.<ext>`` plus an optional View-2 ``pairs.txt``.

The same layout holds faces-mini's celeba/, deepface/ and bbt/ folders and lfw-train.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

from ppfr.errors import DataError

from .base import DATAMODULES, FaceDataModule, Pair, Record, list_images, need_file

NUMBERED = re.compile(r"^(?P<name>.+)_(?P<n>\d+)$")


class PairLine(NamedTuple):
    """One line of an LFW-format pairs file; ``image`` fields are as written (number or name)."""

    name1: str
    image1: str
    name2: str
    image2: str
    issame: bool
    fold: int
    line: int


def parse_lfw_pairs(path: Path) -> list[PairLine]:
    """Parse an LFW-format pairs file: header ``n_folds n_per_fold`` (or just ``n`` for one fold),
    then per fold n matched lines ``name i j`` and n mismatched lines ``name1 i name2 j``.

    Fields may be separated by tabs or spaces (PRO-Face's CelebA list uses a space in the header).
    """
    need_file(path, "pairs file")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{path}: line 1: empty pairs file, expected a header 'n_folds<TAB>n_per_fold'")
    head = lines[0].split()
    if len(head) not in (1, 2) or not all(h.isdigit() for h in head):
        raise DataError(f"{path}: line 1: bad header {lines[0]!r}, expected 'n_folds<TAB>n_per_fold'")
    n_folds, per_fold = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    out: list[PairLine] = []
    for number, text in enumerate(lines[1:], start=2):
        fields = text.split()
        if not fields:
            continue
        fold = len(out) // (2 * per_fold) if per_fold else 0
        if len(fields) == 3:
            out.append(PairLine(fields[0], fields[1], fields[0], fields[2], True, fold, number))
        elif len(fields) == 4:
            out.append(PairLine(fields[0], fields[1], fields[2], fields[3], False, fold, number))
        else:
            raise DataError(
                f"{path}: line {number}: expected 'name i j' or 'name1 i name2 j', got {text.strip()!r}"
            )
    if len(out) != n_folds * 2 * per_fold:
        raise DataError(
            f"{path}: header says {n_folds} folds x 2 x {per_fold} = {n_folds * 2 * per_fold} pairs, "
            f"but the file lists {len(out)}"
        )
    return out


@DATAMODULES.register("lfw")
class LFWDataModule(FaceDataModule):
    """LFW-style folders; identity = folder name; ``pairs_file`` (relative to root) or null."""

    dataset_name = "lfw"

    def __init__(self, root: str | Path, pairs_file: str | None = "pairs.txt", **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.pairs_file = pairs_file

    def scan(self) -> tuple[list[Record], list[Pair]]:
        records: list[Record] = []
        by_number: dict[tuple[str, int], int] = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in list_images(folder):
                match = NUMBERED.match(path.stem)
                if match and match["name"] == folder.name:
                    by_number[(folder.name, int(match["n"]))] = len(records)
                records.append(Record(path, folder.name, path.relative_to(self.root).as_posix()))
        if self.pairs_file is None:
            return records, []
        pairs_path = self.root / self.pairs_file
        if not pairs_path.is_file():
            raise DataError(
                f"{pairs_path}: pairs file not found (set data.pairs_file: null to load without pairs)"
            )
        pairs = []
        for line in parse_lfw_pairs(pairs_path):
            ends = []
            for name, image in ((line.name1, line.image1), (line.name2, line.image2)):
                if not image.isdigit():
                    raise DataError(f"{pairs_path}: line {line.line}: image number {image!r} is not a number")
                k = by_number.get((name, int(image)))
                if k is None:
                    raise DataError(
                        f"{pairs_path}: line {line.line}: image {name}/{name}_{int(image):04d}.* "
                        f"not found under {self.root}"
                    )
                ends.append(k)
            pairs.append(Pair(ends[0], ends[1], line.issame, line.fold))
        return records, pairs
