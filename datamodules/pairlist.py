"""Verification sets released as an image folder plus a pair list: CALFW, CPLFW and AgeDB-30.

- CALFW / CPLFW: ``pairs_CALFW.txt`` / ``pairs_CPLFW.txt`` hold ``filename label`` lines and two
  consecutive lines form a pair. The first half of the pairs is genuine, the second impostor, and
  fold k (of 10) is genuine pairs [k*n, (k+1)*n) plus the same slice of the impostor half, as
  FaceX-Zoo's ``CALFW_PairsParser`` / ``CPLFW_PairsParser`` read them. CPLFW labels are 1/0;
  CALFW writes an identity number for genuine pairs and 0 for impostors (non-zero -> genuine).
  Identity = the file name without its trailing ``_<number>`` (``Aaron_Eckhart_0001.jpg``).
- AgeDB-30: ``03_Protocol_Images/`` plus the MATLAB protocol ``04_FINAL_protocol_30_years.mat``:
  ``splits`` is 10 folds, each a struct whose first field is a 2 x n cell of image structs
  (first field: file name without ``.jpg``) and whose second field is n labels (1 / -1), read
  by position as FaceX-Zoo's ``AgeDB_PairsParser`` and insightface's packer do. Identity = the
  first token of the file name that holds a letter (``0_MariaCallas_35_f`` -> ``MariaCallas``).

Every image file under the image folder is in the dataset; pairs name some of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ppfr.errors import DataError

from .base import DATAMODULES, IMAGE_SUFFIXES, FaceDataModule, Pair, Record, need_file

TRAILING_NUMBER = re.compile(r"^(?P<name>.+?)_\d+$")


def images_under(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: image folder not found (set data.images_dir)")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def half_split_folds(issame: list[bool], n_folds: int) -> list[int]:
    """Fold of each pair when the first half is genuine and the second impostor (CALFW/CPLFW)."""
    half = len(issame) // 2
    return [min((k % half) * n_folds // half, n_folds - 1) if half else 0 for k in range(len(issame))]


class PairListDataModule(FaceDataModule):
    """An image folder plus a list of pairs by file name."""

    def __init__(self, root: str | Path, images_dir: str, pairs_file: str, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.images_dir = images_dir
        self.pairs_file = pairs_file

    def identity(self, path: Path) -> str:
        match = TRAILING_NUMBER.match(path.stem)
        return match["name"] if match else path.stem

    def read_pairs(self, path: Path) -> list[tuple[str, str, bool, int, str]]:
        """(file1, file2, issame, fold, where) per pair; files relative to the image folder."""
        raise NotImplementedError

    def scan(self) -> tuple[list[Record], list[Pair]]:
        folder = self.root / self.images_dir
        records: list[Record] = []
        position: dict[str, int] = {}
        for path in images_under(folder):
            position[path.relative_to(folder).as_posix()] = len(records)
            records.append(Record(path, self.identity(path), path.relative_to(self.root).as_posix()))
        pairs = []
        for file1, file2, issame, fold, where in self.read_pairs(self.root / self.pairs_file):
            ends = []
            for file in (file1, file2):
                if file not in position:
                    raise DataError(f"{where}: image {file} not found in {folder}")
                ends.append(position[file])
            pairs.append(Pair(ends[0], ends[1], issame, fold))
        return records, pairs


class LinePairsDataModule(PairListDataModule):
    """CALFW/CPLFW ``filename label`` lines, two per pair."""

    n_folds = 10

    def read_pairs(self, path: Path) -> list[tuple[str, str, bool, int, str]]:
        need_file(path, "pairs file")
        rows = []
        for number, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not text.strip():
                continue
            file, _, label = text.strip().rpartition(" ")
            if not file or not re.fullmatch(r"-?\d+", label):
                raise DataError(f"{path}: line {number}: expected '<filename> <label>', got {text.strip()!r}")
            rows.append((file.strip(), int(label), number))
        if not rows:
            raise DataError(f"{path}: pairs file is empty")
        if len(rows) % 2:
            raise DataError(f"{path}: {len(rows)} lines, but two consecutive lines form a pair (odd count)")
        issame = [rows[k][1] != 0 for k in range(0, len(rows), 2)]
        folds = half_split_folds(issame, self.n_folds)
        return [
            (rows[2 * p][0], rows[2 * p + 1][0], issame[p], folds[p], f"{path}: line {rows[2 * p][2]}")
            for p in range(len(issame))
        ]


@DATAMODULES.register("calfw")
class CALFWDataModule(LinePairsDataModule):
    dataset_name = "calfw"

    def __init__(
        self,
        root: str | Path,
        images_dir: str = "aligned images",
        pairs_file: str = "pairs_CALFW.txt",
        **kwargs,
    ) -> None:
        super().__init__(root, images_dir=images_dir, pairs_file=pairs_file, **kwargs)


@DATAMODULES.register("cplfw")
class CPLFWDataModule(LinePairsDataModule):
    dataset_name = "cplfw"

    def __init__(
        self,
        root: str | Path,
        images_dir: str = "aligned images",
        pairs_file: str = "pairs_CPLFW.txt",
        **kwargs,
    ) -> None:
        super().__init__(root, images_dir=images_dir, pairs_file=pairs_file, **kwargs)


def _mat_string(cell, where: str) -> str:
    """The first field of a MATLAB struct as loadmat returns it (nested 1x1 arrays)."""
    try:
        value = np.ravel(np.ravel(cell)[0][0])[0]
    except (IndexError, TypeError, ValueError) as err:
        raise DataError(f"{where}: unexpected structure for an image entry ({err})") from err
    if not isinstance(value, str):
        raise DataError(f"{where}: image entry holds {type(value).__name__}, not a file name")
    return value


@DATAMODULES.register("agedb")
class AgeDBDataModule(PairListDataModule):
    dataset_name = "agedb"

    def __init__(
        self,
        root: str | Path,
        images_dir: str = "03_Protocol_Images",
        pairs_file: str = "04_FINAL_protocol_30_years.mat",
        **kwargs,
    ) -> None:
        super().__init__(root, images_dir=images_dir, pairs_file=pairs_file, **kwargs)

    def identity(self, path: Path) -> str:
        return next((t for t in path.stem.split("_") if re.search(r"[A-Za-z]", t)), path.stem)

    def read_pairs(self, path: Path) -> list[tuple[str, str, bool, int, str]]:
        from scipy.io import loadmat

        need_file(path, "AgeDB protocol .mat")
        try:
            splits = loadmat(str(path))["splits"]
        except KeyError as err:
            raise DataError(f"{path}: no 'splits' variable in the AgeDB protocol file") from err
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{path}: not a readable MATLAB file ({err})") from err
        out = []
        for fold, split in enumerate(np.ravel(splits)):
            where = f"{path}: split {fold + 1}"
            try:
                fields = np.ravel(split)[0]
                names, labels = fields[0], np.ravel(fields[1])
            except (IndexError, TypeError, ValueError) as err:
                raise DataError(f"{where}: expected a struct of (pairs, labels) ({err})") from err
            if names.ndim != 2 or names.shape[0] != 2 or names.shape[1] != len(labels):
                raise DataError(f"{where}: pairs cell is {names.shape}, expected 2 x {len(labels)}")
            for c in range(names.shape[1]):
                at = f"{where}, pair {c + 1}"
                label = int(labels[c])
                if label not in (1, -1):
                    raise DataError(f"{at}: label {label}, expected 1 or -1")
                files = [_mat_string(names[r, c], at) for r in range(2)]
                files = [f if Path(f).suffix else f"{f}.jpg" for f in files]
                out.append((files[0], files[1], label == 1, fold, at))
        return out
