"""BUPT-Balancedface / Globalface: ``<root>/race_per_7000/<race>/<identity>/*.jpg``, no pairs.

``root`` may be the dataset folder or ``race_per_7000`` itself; ids are relative to
``race_per_7000`` either way, and an identity is ``<race>/<identity folder>``. ``races`` keeps
only the named race folders (default: all of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ppfr.errors import ConfigError, DataError

from .base import DATAMODULES, FaceDataModule, Pair, Record, list_images


@DATAMODULES.register("bupt")
class BUPTDataModule(FaceDataModule):
    dataset_name = "bupt"

    def __init__(self, root: str | Path, races: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(root, **kwargs)
        self.races = None if races is None else list(races)

    def scan(self) -> tuple[list[Record], list[Pair]]:
        base = self.root / "race_per_7000" if (self.root / "race_per_7000").is_dir() else self.root
        found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DataError(f"{base}: no race folders (expected race_per_7000/<race>/<identity>/*.jpg)")
        races = found if self.races is None else self.races
        unknown = sorted(set(races) - set(found))
        if unknown:
            raise ConfigError(f"data.races: {unknown} not found under {base}; available: {found}")
        records = []
        for race in races:
            for person in sorted(p for p in (base / race).iterdir() if p.is_dir()):
                identity = f"{race}/{person.name}"
                for path in list_images(person):
                    records.append(Record(path, identity, path.relative_to(base).as_posix()))
        return records, []
