"""CelebA on disk as released: an image folder plus ``identity_CelebA.txt`` (and optionally
``list_eval_partition.txt`` for ``split``).

Paths are relative to ``root``. The official archive keeps the lists under ``Anno/`` and
``Eval/`` and images under ``Img/``; torchvision's copy puts everything flat in one folder (the
defaults). Set ``images_dir: img_celeba`` for the in-the-wild photos.

Pairs (optional, ``pairs_file``): LFW format where a name is a CelebA identity number and an
image is a CelebA file, written as its file name (``191411.jpg``, as in PRO-Face's
``dataset/CelebA/pairs.txt``) or its number (``191411``, zero-padded to six digits). Every named
file must carry the named identity in ``identity_CelebA.txt``.
"""

from __future__ import annotations

from pathlib import Path

from ppfr.errors import DataError, check_choice

from .base import DATAMODULES, FaceDataModule, Pair, Record, need_file
from .lfw import parse_lfw_pairs

SPLITS = {"train": "0", "val": "1", "test": "2"}


def read_two_columns(path: Path, what: str) -> dict[str, str]:
    """``file value`` lines (CelebA's list format) -> {file: value}, line-checked."""
    need_file(path, what)
    table: dict[str, str] = {}
    for number, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{path}: line {number}: expected '<file> <value>', got {text.strip()!r}")
        table[fields[0]] = fields[1]
    if not table:
        raise DataError(f"{path}: {what} is empty")
    return table


@DATAMODULES.register("celeba")
class CelebADataModule(FaceDataModule):
    """CelebA images with identity labels; ``split`` in train|val|test|all."""

    dataset_name = "celeba"

    def __init__(
        self,
        root: str | Path,
        images_dir: str = "img_align_celeba",
        identity_file: str = "identity_CelebA.txt",
        partition_file: str = "list_eval_partition.txt",
        split: str = "all",
        pairs_file: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(root, **kwargs)
        check_choice("data.split", split, ("all", *SPLITS))
        self.images_dir = images_dir
        self.identity_file = identity_file
        self.partition_file = partition_file
        self.split = split
        self.pairs_file = pairs_file

    def scan(self) -> tuple[list[Record], list[Pair]]:
        images = self.root / self.images_dir
        if not images.is_dir():
            raise DataError(f"{images}: CelebA image folder not found (set data.images_dir)")
        identity = read_two_columns(self.root / self.identity_file, "CelebA identity list")
        names = sorted(identity)
        if self.split != "all":
            partition = read_two_columns(self.root / self.partition_file, "CelebA partition list")
            names = [n for n in names if partition.get(n) == SPLITS[self.split]]
        records: list[Record] = []
        position: dict[str, int] = {}
        for name in names:
            path = images / name
            if not path.is_file():
                raise DataError(f"{path}: image listed in {self.root / self.identity_file} not found")
            position[name] = len(records)
            records.append(Record(path, identity[name], path.relative_to(self.root).as_posix()))
        if self.pairs_file is None:
            return records, []
        pairs_path = self.root / self.pairs_file
        pairs = []
        for line in parse_lfw_pairs(pairs_path):
            ends = []
            for person, image in ((line.name1, line.image1), (line.name2, line.image2)):
                file = f"{int(image):06d}.jpg" if image.isdigit() else image
                if file not in position:
                    raise DataError(
                        f"{pairs_path}: line {line.line}: image {file} is not in {images} "
                        f"(split {self.split!r})"
                    )
                if identity[file] != person:
                    raise DataError(
                        f"{pairs_path}: line {line.line}: {file} is identity {identity[file]} "
                        f"in {self.identity_file}, not {person}"
                    )
                ends.append(position[file])
            pairs.append(Pair(ends[0], ends[1], line.issame, line.fold))
        return records, pairs
